"""`mllm demo`: every stage of the stack, end to end, on real handwritten digits, in a few minutes on a laptop.

    corpora (mllm data build) -> SentencePiece text tokenizer -> tiny Llama + patch image tokens
    -> train on image questions and captions -> save, reload -> answer held-out test questions
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from mllm.checkpoint import MediaConfig, ModelConfig, build_model, load_checkpoint, save_checkpoint
from mllm.data.corpora.build import is_complete
from mllm.generation import greedy_generate
from mllm.sequence import pad_collate
from mllm.tokenizers.text import train_text_tokenizer

TINY_LLAMA = dict(
    model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, vocab_size=1000,
)
BATCH, LR, WARMUP = 16, 2e-3, 20


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_demo(corpora: Path, out: Path, steps: int = 300, seed: int = 0) -> int:
    if not is_complete(corpora):
        print(f"no built corpora at {corpora}: run `mllm data build` first (see the README)")
        return 2
    random.seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    digits = corpora / "digits"
    train = [r for r in read_records(digits / "train.jsonl") if r["task"] in ("image_qa", "image_caption")]
    test = [r for r in read_records(digits / "test.jsonl") if r["meta"].get("question_type") == "digit"]

    texts = [r["text"] for r in read_records(corpora / "text" / "train.jsonl")]
    tokenizer_dir = train_text_tokenizer(texts, out / "text_tokenizer", vocab_size=TINY_LLAMA["vocab_size"])
    model, processor = build_model(ModelConfig(
        base_config=TINY_LLAMA,
        tokenizer=str(tokenizer_dir),
        media={"image": MediaConfig(tokenizer="patch", options={"image_size": 32, "patch_size": 8})},
        seed=seed,
    ))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: tiny Llama + patch image tokens, {n_params / 1e6:.2f}M parameters; {len(train)} training conversations")

    samples = [processor.encode(r["messages"], base_dir=digits) for r in tqdm(train, desc="tokenize", leave=False)]
    losses = train_steps(model, samples, processor.pad_id, steps)
    plot_losses(losses, out / "loss.png")

    save_checkpoint(model, processor, out / "checkpoint")
    model, processor = load_checkpoint(out / "checkpoint")
    prompts = [r["messages"][:1] for r in test]
    batch = processor(prompts, add_generation_prompt=True, padding_side="left", base_dir=digits)
    answers = greedy_generate(model, batch, max_new_tokens=6, eos_token_id=processor.tokenizer.eos_token_id)
    answers = [processor.decode_text(a).strip() for a in answers]
    correct = sum(a == r["meta"]["answer"] for a, r in zip(answers, test))
    for r, a in list(zip(test, answers))[:5]:
        print(f"  {r['messages'][0]['content'][-1]['text']!r:32} -> {a!r:6} (truth {r['meta']['answer']!r})")
    print(f"held-out digit questions: {correct}/{len(test)} correct ({correct / max(len(test), 1):.0%})")
    print(f"final training loss {losses[-1]:.3f}; checkpoint in {out / 'checkpoint'}, loss curve in {out / 'loss.png'}")
    return 0


def train_steps(model, samples, pad_id: int, steps: int) -> list[float]:
    """AdamW with linear warm-up and cosine decay; batches drawn by shuffling epochs."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    order: list[int] = []
    losses = []
    bar = tqdm(range(steps), desc="train")
    for _ in bar:
        if len(order) < BATCH:
            order += random.sample(range(len(samples)), len(samples))
        batch = pad_collate([samples[order.pop()] for _ in range(BATCH)], pad_id)
        loss = model(**batch.model_inputs()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def plot_losses(losses: list[float], path: Path) -> None:
    fig = Figure(figsize=(6, 3.5), layout="tight")
    ax = fig.add_subplot()
    ax.plot(losses, lw=1)
    ax.set(xlabel="step", ylabel="loss", title="mllm demo: training loss", yscale="log")
    fig.savefig(path, dpi=120)
