"""Token cache: a data epoch reading cached media tokens against one that encodes every medium.

Both epochs run the real loader (records -> processor -> packed batches) over the
same train rows of the built corpora; one is given a warm `TokenCache`, the other
none, so its processor loads and encodes each medium (image patches, the audio
codec) again. Only the data side is timed: the training step is the same for both.
"""

from __future__ import annotations

from mllm.bench import corpus
from mllm.bench.profile import top_ops
from mllm.bench.report import Figure, rate_figure
from mllm.bench.settings import Settings
from mllm.bench.timing import alternate
from mllm.data.loader import MultimodalLoader

SECTION = "4. token cache"


def run(s: Settings) -> list[Figure]:
    data = corpus.real_data(s, 512)
    rows = data.rows[: s.pick(64, 512)]
    attn = data.model.language_model.config._attn_implementation

    def epoch(cache):
        loader = MultimodalLoader(rows, data.processor, max_length=512, batch_size=2, cache=cache,
                                  attn_implementation=attn)
        return lambda: sum(1 for _ in loader)

    cached, encoding = epoch(data.cache), epoch(None)
    times = alternate({"cached": cached, "encoding": encoding}, max(s.repeats // 2, 2))
    media = sorted(data.processor.media_tokenizers.items())
    where = (f"{len(rows)} train records, tokenizers "
             + ", ".join(f"{m}: {t.name}" for m, t in media) + f"; epoch without cache: {top_ops(encoding, 3)}")
    return [rate_figure(SECTION, "data epoch with cached tokens", "records/s", len(rows), times["cached"],
                        "epoch encoding media", times["encoding"], note=where)]
