"""Training batches: records -> (token cache) -> Sample -> packed or padded MultimodalBatch.

    records = read_records("data/corpora", streaming=True, rank=rank, world_size=world_size)
    loader = MultimodalLoader(records, processor, max_length=2048, batch_size=8, cache=cache,
                              attn_implementation=model.language_model.config._attn_implementation)
    for batch in loader:
        loss = model(**batch.to(device).model_inputs()).loss

Each row is checked (`check_record`), its media swapped for cached tokens when
a cache is given (the media of user turns perturbed afresh instead, with `augment`:
`mllm.data.input_augment`), and encoded by the processor. A record that fails any step
is a bad record: invalid JSON, a malformed message, a missing or corrupt
medium, or a sample longer than `max_length` (never truncated). Under policy
"skip" it is logged with its file:line and counted in `loader.bad`; under
"fail" it raises. The counts are logged at the end of every pass.

Shuffle the records before they come here (`Dataset.shuffle(seed)`, or
`IterableDataset.shuffle(buffer_size=..., seed)` with `set_epoch` per epoch).
With `packing`, a batch is `batch_size` rows of `max_length` tokens (see
`mllm.data.packing`); without, it is `batch_size` samples padded to the longest.
The work runs in the calling process: media encoding, the costly part, is done
once by the token cache, except for the user media `augment` perturbs, which are
encoded afresh on each pass (short clips: no measurable cost in the default build).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice

import torch

from mllm.data.cache import TokenCache
from mllm.data.input_augment import InputAugment
from mllm.data.packing import collate_rows, pack_stream
from mllm.data.records import BadRecordError, BadRecordPolicy, BadRecords, iter_records
from mllm.media import MediaError
from mllm.processor import MessageError, Processor, SequenceTooLongError
from mllm.sequence import MultimodalBatch, Sample, pad_collate

logger = logging.getLogger(__name__)


class MultimodalLoader:
    """An iterable of MultimodalBatch over record rows (a `read_records` dataset, or any iterable of its rows)."""

    def __init__(
        self,
        records: Iterable[dict],
        processor: Processor,
        *,
        max_length: int,
        batch_size: int,
        packing: bool = True,
        cache: TokenCache | None = None,
        augment: InputAugment | None = None,
        policy: BadRecordPolicy = "skip",
        attn_implementation: str = "sdpa",
        dtype: torch.dtype = torch.float32,
        buffer_size: int | None = None,
        seed: int = 0,
        transcripts: bool = False,
    ):
        self.records, self.processor, self.cache, self.augment = records, processor, cache, augment
        self.max_length, self.batch_size, self.packing = max_length, batch_size, packing
        # packing sorts this many samples at a time into rows: 1024, or a few per row for very large batches
        self.buffer_size = buffer_size if buffer_size is not None else max(1024, 4 * batch_size)
        self.seed = seed  # of the packed rows' order within a batch round
        self.transcripts = transcripts  # fill Sample.transcripts, for a CTC term (`Processor.encode`)
        self.collate = partial(collate_rows, max_length=max_length, pad_id=processor.pad_id,
                               attn_implementation=attn_implementation, dtype=dtype)
        self.bad = BadRecords(policy)

    def samples(self) -> Iterator[Sample]:
        """The encoded samples of every good record; bad ones go to `self.bad`."""
        for record in iter_records(self.records, self.bad):
            try:
                messages = record.messages
                if self.augment is not None:
                    messages = self.augment(messages, record.base_dir)
                if self.cache is not None:
                    messages = self.cache.tokenize(messages, record.base_dir)
                sample = self.processor.encode(messages, base_dir=record.base_dir, transcripts=self.transcripts)
            except MediaError as e:
                self.bad(BadRecordError("corrupt_media", record.where, str(e)))
                continue
            except MessageError as e:
                self.bad(BadRecordError("malformed_message", record.where, str(e)))
                continue
            except SequenceTooLongError as e:
                self.bad(BadRecordError("too_long", record.where, str(e)))
                continue
            except ValueError as e:  # e.g. codes out of range
                self.bad(BadRecordError("invalid_sample", record.where, str(e)))
                continue
            if len(sample) > self.max_length:
                self.bad(BadRecordError("too_long", record.where, f"{len(sample)} tokens, over max_length {self.max_length}"))
                continue
            yield sample

    def lazy_batches(self) -> Iterator[Callable[[], MultimodalBatch]]:
        """One pass as batches that collate when called: a caller that skips a batch (another rank's,
        or one before a resume point) does not pay for its attention mask. Resets `self.bad`."""
        self.bad = BadRecords(self.bad.policy)  # counts are per pass
        samples = self.samples()
        if self.packing:
            for rows in pack_stream(samples, self.max_length, self.batch_size, self.buffer_size, self.seed):
                yield partial(self.collate, rows)
        else:
            while chunk := list(islice(samples, self.batch_size)):
                yield partial(pad_collate, chunk, self.processor.pad_id)

    def __iter__(self) -> Iterator[MultimodalBatch]:
        for batch in self.lazy_batches():
            yield batch()
        (logger.warning if self.bad.skipped else logger.info)("data pass done: %s", self.bad.summary())
