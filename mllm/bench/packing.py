"""Packing: the non-pad share of packed batches, and packed over pad-to-longest training throughput.

The train split of every built-in corpus goes through the real pipeline (records ->
token cache -> processor -> packed or padded batches) into a tiny Llama (`build_model`).
The share is over 512 records of the mix; the train passes (forward, backward, AdamW
over every batch, packed and padded alternately) over the first 48 of them with --quick.
Both kinds of batch come from the same samples. Throughput counts real tokens only.
Targets: non-pad share ≥ 0.95; packed / pad-to-longest ≥ 1.5×.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm.bench import corpus
from mllm.bench.training import stepper
from mllm.bench.profile import top_ops
from mllm.bench.report import Figure, rate_figure
from mllm.bench.settings import Settings
from mllm.bench.timing import alternate
from mllm.data.loader import MultimodalLoader
from mllm.sequence import MultimodalBatch

SECTION = "3. packing"
SHARE_TARGET, SPEEDUP_TARGET = 0.95, 1.5
MAX_LENGTH, ROWS, BATCH = 512, 2, 16  # a packed row, rows per packed batch, samples per padded batch


@dataclass
class Batches:
    """Packed and pad-to-longest batches of the same samples."""

    packed: list[MultimodalBatch]
    padded: list[MultimodalBatch]
    lengths: list[int]  # tokens of each sample, sorted

    @property
    def tokens(self) -> int:  # real tokens, the same in both kinds of batch
        return sum(self.lengths)

    def share(self, kind: str) -> float:
        return self.tokens / sum(b.input_ids.numel() for b in getattr(self, kind))


def batches(data: corpus.RealData, rows: list[dict]) -> Batches:
    attn = data.model.language_model.config._attn_implementation
    common = dict(max_length=MAX_LENGTH, cache=data.cache, attn_implementation=attn)
    packed = MultimodalLoader(rows, data.processor, batch_size=ROWS, packing=True, **common)
    padded = MultimodalLoader(rows, data.processor, batch_size=BATCH, packing=False, **common)
    return Batches(list(packed), list(padded), sorted(len(x) for x in packed.samples()))


def run(s: Settings) -> list[Figure]:
    data = corpus.real_data(s, 512)
    mix, timed = batches(data, data.rows), batches(data, data.rows[: s.pick(48, 512)])
    where = (f"{len(data.rows)} train records of the built corpora, {mix.tokens} real tokens: {len(mix.packed)} "
             f"packed batches of {ROWS}×{MAX_LENGTH}, {len(mix.padded)} padded batches of {BATCH} samples")
    share = Figure(SECTION, "non-pad share, packed", "", mix.share("packed"), None, "pad-to-longest",
                   mix.share("padded"), target=SHARE_TARGET, target_on="value", note=where)
    if share.met is False:
        n = mix.lengths
        share.note += f"; samples are {n[0]}–{n[-1]} tokens, median {n[len(n) // 2]}: too few short ones to fill the rows' tails"
    passes = {kind: stepper(data.model, [b.model_inputs() for b in getattr(timed, kind)]) for kind in ("packed", "padded")}
    times = alternate(passes, s.repeats)
    speed = rate_figure(SECTION, "packed train throughput (real tokens)", "tok/s", timed.tokens, times["packed"],
                        "pad-to-longest", times["padded"], target=SPEEDUP_TARGET,
                        note=f"train passes over the first {len(timed.lengths)} samples ({timed.tokens} tokens)")
    if speed.met is False:
        speed.note += (f"; packed pass: {top_ops(passes['packed'])}; padded pass: {top_ops(passes['padded'])}; "
                       f"the padded batches are already {timed.share('padded'):.0%} real tokens")
    return [share, speed]
