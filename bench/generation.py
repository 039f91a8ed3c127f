"""Generation benchmark: tokens/s of each kind of span, as a ratio to plain HF `generate` on text.

    python bench/generation.py                   # CPU, fp32, about five minutes on 2 cores
    python bench/generation.py --repeats 5 --tokens 64 --device cuda

One randomly initialised Llama-style model (hidden 512, 8 layers, 32k text
vocabulary) carries three media modalities: audio as 1024 discrete codes,
image features (64-d) with a GMM head, video features (64-d) with a MAR-style
diffusion head. Each measurement generates `--tokens` positions from the same
16-token prompt:

    hf text          language_model.generate, greedy, KV cache: the reference
    text             the engine on text
    discrete span    a prompt ending in <audio>: N codes, restricted and forced
    gmm span         a prompt ending in <image>: N features, each from head.sample and fed back
    diffusion span   a prompt ending in <video>, at 10, 50 and 100 DDIM steps per feature
    text, no cache   the engine recomputing the whole sequence every step

All variants run alternately, one after another in each repeat, in one
process; the table gives the best and the median tokens/s over the repeats
and each median as a ratio to the median of HF generate. The diffusion cost
per step is the slope of seconds per feature over the number of steps.
Targets: discrete >= 0.8x, gmm >= 0.7x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mllm.generation import GenerationConfig, HeadSampling, generate
from mllm.model import MultimodalLM
from mllm.sequence import MultimodalBatch
from mllm.vocab import ModalitySpec, VocabLayout

LM = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
          num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
CODES, FEATURE_DIM, PROMPT = 1024, 64, 16
HEADS = {
    "image": {"name": "gmm", "options": {"num_components": 16, "width": 512, "depth": 2}},
    "video": {"name": "diffusion", "options": {"width": 512, "depth": 3}},
}
TARGETS = {"discrete span": 0.8, "gmm span": 0.7}


class CountingVocab:
    """The part of a HF tokenizer that VocabLayout.extend uses: a plain 32k text vocabulary."""

    def __init__(self, size: int):
        self.vocab = {f"t{i}": i for i in range(size)}

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self):
        return self.vocab

    def add_tokens(self, tokens, special_tokens):
        for t in tokens:
            self.vocab.setdefault(t.content, len(self.vocab))

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab[t] for t in tokens]


def build(tokens: int, device: str) -> MultimodalLM:
    torch.manual_seed(0)
    config = dict(LM)
    text_config = AutoConfig.for_model(config.pop("model_type"), **config)
    lm = AutoModelForCausalLM.from_config(text_config, attn_implementation="sdpa")
    specs = [
        ModalitySpec("image", "continuous", feature_dim=FEATURE_DIM),
        ModalitySpec("video", "continuous", feature_dim=FEATURE_DIM),
        ModalitySpec("audio", "discrete", codebook_size=CODES),
    ]
    layout = VocabLayout.extend(CountingVocab(LM["vocab_size"]), specs)
    per_item = {"image": tokens, "video": tokens, "audio": tokens}
    return MultimodalLM.from_base(lm, layout, heads=HEADS, tokens_per_item=per_item).to(device).eval()


def prompt(model: MultimodalLM, opening: str | None, device: str) -> MultimodalBatch:
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    if opening is not None:
        ids[0, -1] = model.layout[opening].begin_id
    return MultimodalBatch(ids.to(device), torch.ones_like(ids).to(device))


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="positions generated per measurement (N per item)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    n, device = args.tokens, args.device
    model = build(n, device)
    text, audio, image, video = (prompt(model, m, device) for m in (None, "audio", "image", "video"))

    def ours(batch: MultimodalBatch, steps: int | None = None, use_cache: bool = True):
        options = {"video": {"steps": steps}} if steps else {}
        config = GenerationConfig(
            max_new_tokens=n, use_cache=use_cache, continuous=HeadSampling(options=options), seed=0
        )
        return lambda: generate(model, batch, config)

    def hf():
        model.language_model.generate(
            text.input_ids, attention_mask=text.attention_mask, max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0,
        )

    variants = {
        "hf text": hf,
        "text": ours(text),
        "discrete span": ours(audio),
        "gmm span": ours(image),
        "diffusion span, 10 steps": ours(video, 10),
        "diffusion span, 50 steps": ours(video, 50),
        "diffusion span, 100 steps": ours(video, 100),
        "text, no cache": ours(text, use_cache=False),
    }
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        seconds = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                seconds[name].append(timed(fn))

    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in model.language_model.parameters()) / 1e6
    print(f"{params:.0f}M-parameter LM, {device_name}, {n} positions per run after a {PROMPT}-token prompt, "
          f"{args.repeats} repeats")
    reference = statistics.median(seconds["hf text"])
    print(f"{'variant':28} {'best tok/s':>10} {'median tok/s':>12} {'ratio':>6}  target")
    for name, times in seconds.items():
        ratio = reference / statistics.median(times)
        target = f">= {TARGETS[name]}x {'ok' if ratio >= TARGETS[name] else 'MISSED'}" if name in TARGETS else ""
        print(f"{name:28} {n / min(times):10.1f} {n / statistics.median(times):12.1f} {ratio:5.2f}x  {target}")
    per_feature = {s: statistics.median(seconds[f"diffusion span, {s} steps"]) / n for s in (10, 50, 100)}
    slope = (per_feature[100] - per_feature[10]) / 90
    ms = " / ".join(f"{per_feature[s] * 1e3:.1f}" for s in (10, 50, 100))
    print(f"diffusion head: {slope * 1e3:.3f} ms per denoising step per feature "
          f"(batch of 1; {ms} ms per feature at 10 / 50 / 100 steps)")
    gain = statistics.median(seconds["text, no cache"]) / statistics.median(seconds["text"])
    print(f"KV cache: {gain:.1f}x faster than recomputing the sequence at every step")


if __name__ == "__main__":
    main()
