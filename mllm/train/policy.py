"""Trainable-parameter policies: which weights of a MultimodalLM a stage trains.

    model = apply_policy(model, cfg.policy)     # a PeftModel when LoRA or token rows are on
    print(trainable_summary(model))             # trainable 1.2M of 7.2B parameters (0.02%): lora 1.0M, ...
    plain = merge(model)                        # LoRA and token rows folded in: a MultimodalLM again

In order: everything is frozen; the language model gets LoRA (peft) on
`lora.target_modules`, or trains fully, or stays frozen; the rows of the added
media tokens train through peft's `trainable_token_indices` (only those rows
have gradients and optimizer state); projectors and heads train fully; then
the `train` globs unfreeze and the `freeze` globs freeze, by MultimodalLM
parameter name.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from fnmatch import fnmatchcase

import peft
from torch import nn

from mllm.config import ConfigError
from mllm.model import MultimodalLM
from mllm.train.recipe import PolicyConfig


def _peft_model(model: MultimodalLM, config: peft.PeftConfig) -> nn.Module:
    with warnings.catch_warnings():  # peft reads transformers 5's deprecated name: nothing for a user to mend
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return peft.get_peft_model(model, config)


def apply_policy(model: MultimodalLM, policy: PolicyConfig) -> nn.Module:
    """Freeze and wrap `model` as `policy` says; returns the module to train."""
    model.requires_grad_(False)
    layout = model.layout
    new_rows = list(range(layout.text_vocab_size, layout.vocab_size))
    rows = token_row_modules(model) if policy.new_token_rows and new_rows and policy.lm != "full" else []
    if rows:
        _declare_tied_embeddings(model)
    if policy.lm == "lora":
        lora = policy.lora
        config = peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            # a regex string is matched against full module names: LoRA goes into the LM only
            target_modules=rf"language_model\..*\.({'|'.join(map(re.escape, lora.target_modules))})",
            trainable_token_indices={name: new_rows for name in rows} or None,
        )
        try:
            trained: nn.Module = _peft_model(model, config)
        except ValueError as e:  # no module matches
            raise ConfigError("policy.lora.target_modules", f"{lora.target_modules}: {e}") from e
    elif rows:
        trained = _peft_model(model, peft.TrainableTokensConfig(target_modules=rows, token_indices=new_rows))
    else:
        trained = model
        model.language_model.requires_grad_(policy.lm == "full")
    model.projectors.requires_grad_(policy.projectors)
    model.heads.requires_grad_(policy.heads)
    model.queries.requires_grad_(policy.heads)  # a parallel head's input side
    params = dict(model.named_parameters())
    for key, patterns, trainable in (("policy.train", policy.train, True), ("policy.freeze", policy.freeze, False)):
        for pattern in patterns:
            matched = [p for name, p in params.items() if fnmatchcase(name, pattern)]
            if not matched:
                raise ConfigError(key, f"'{pattern}' matches no parameter of the model")
            for p in matched:
                p.requires_grad_(trainable)
    if not any(p.requires_grad for p in trained.parameters()):
        raise ConfigError("policy", "leaves no parameter to train")
    return trained


def token_row_modules(model: MultimodalLM) -> list[str]:
    """Full names of the embedding table and, unless tied to it, the output layer."""
    names = {module: name for name, module in model.named_modules()}
    modules = [names[model.get_input_embeddings()]]
    if not model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        modules.append(names[model.get_output_embeddings()])
    return modules


def _declare_tied_embeddings(model: MultimodalLM) -> None:
    """Tell peft that the LM's output layer shares the embedding table, so one set of token rows serves both.

    peft reads `_tied_weights_keys` from the model it wraps; the wrapper declares none of
    its own, so the LM's (a dict in transformers 5, a list in 4) is lifted to wrapper names.
    """
    lm_keys = model.language_model._tied_weights_keys
    if not model.config.tie_word_embeddings or model._tied_weights_keys is not None or not lm_keys:
        return
    if isinstance(lm_keys, dict):
        model._tied_weights_keys = {f"language_model.{k}": f"language_model.{v}" for k, v in lm_keys.items()}
    else:
        model._tied_weights_keys = [f"language_model.{k}" for k in lm_keys]


def unwrap(model: nn.Module) -> MultimodalLM:
    """The MultimodalLM inside a policy-wrapped model."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def merge(model: nn.Module) -> MultimodalLM:
    """A plain MultimodalLM with the LoRA weights and token rows folded into the base weights."""
    return model.merge_and_unload() if isinstance(model, peft.PeftModel) else model


def trainable_summary(model: nn.Module) -> str:
    """`trainable 1.2M of 7.2B parameters (0.02%): lora 1.0M, token rows 0.1M, projectors 0.1M`."""
    by_group: Counter[str] = Counter()
    total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            by_group[_group(name)] += p.numel()
    n = sum(by_group.values())
    groups = ", ".join(f"{g} {_count(c)}" for g, c in by_group.most_common())
    return f"trainable {_count(n)} of {_count(total)} parameters ({100 * n / max(total, 1):.3g}%): {groups}"


def _group(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    if ".lora_" in name:
        return "lora"
    if "trainable_tokens_delta" in name:
        return "token rows"
    groups = {"projectors": "projectors", "heads": "heads", "queries": "output queries", "language_model": "language model"}
    return groups.get(name.split(".")[0], "other")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
