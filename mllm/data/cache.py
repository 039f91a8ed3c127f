"""Token cache: each medium is encoded once by its frozen media tokenizer, then read back.

    cache = TokenCache("runs/tokens", processor.media_tokenizers, batch_sizes={"video": 32})
    cache.encode_records(records)                            # encode what is not cached yet
    messages = cache.tokenize(record.messages, record.base_dir)  # media parts -> {"type", "tokens"}
    sample = processor.encode(messages, base_dir=record.base_dir)  # nothing is re-encoded

One directory per modality and tokenizer state:

    <root>/<modality>-<fingerprint[:16]>/
        index.json                  {"fingerprint", "tokenizer", "shards": {name: size}, "keys": {key: name}}
        shard-00000.safetensors     key -> tokens ([N] long codes or [N, D] features)

A key is the sha256 of the medium's encoded bytes (the file, or the record's
embedded bytes). The fingerprint hashes the tokenizer's registry name, config
and every weight, so a changed tokenizer looks in a new, empty directory.

Writes are crash-safe: a shard, then the index, each goes to a temp file that
is fsynced and `os.replace`d. Only shards the index names (with the size it
records) are trusted, so a killed build leaves at worst a temp file or an
unlisted shard; both are ignored, and removed by the next writer. Writers hold
an exclusive lock and merge with the index on disk, so ranks can share a cache.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mllm.config import to_dict
from mllm.data.records import BadRecordError, Record, check_record, media_path
from mllm.files import atomic_write
from mllm.media import MediaError, load_media
from mllm.processor import part_notes
from mllm.tokenizers import MediaTokenizer

logger = logging.getLogger(__name__)

INDEX = "index.json"
SHARD = re.compile(r"shard-(\d{5,})\.safetensors")


def fingerprint(tokenizer: MediaTokenizer) -> str:
    """sha256 over the tokenizer's registry name, its config and every state-dict tensor (sorted keys)."""
    h = hashlib.sha256(b"mllm-token-cache-v1\0")
    h.update(yaml.safe_dump({"name": tokenizer.name, "config": to_dict(tokenizer.config)}, sort_keys=True).encode())
    for key, tensor in sorted(tokenizer.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def media_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=1 << 16)
def _file_key(path: str, stat: tuple[int, ...]) -> str:  # a changed `stat` makes a changed file a new entry
    return media_key(Path(path).read_bytes())


def source_key(source: bytes | str | os.PathLike) -> str:
    """The cache key of a medium given as its bytes or a file path. A file's is hashed once per process while its
    size, inode, modification and status-change times stay: a rewrite that keeps size and modification time
    (cp -p, rsync -t, tar x) still changes the inode or ctime."""
    if isinstance(source, (bytes, bytearray)):
        return media_key(bytes(source))
    st = os.stat(source)
    return _file_key(os.path.abspath(source), (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))


class ShardStore:
    """The shards and index of one modality + tokenizer fingerprint."""

    def __init__(self, path: Path, fingerprint: str, tokenizer_name: str):
        self.path, self.fingerprint, self.tokenizer_name = path, fingerprint, tokenizer_name
        self.path.mkdir(parents=True, exist_ok=True)
        self._handles: dict[str, object] = {}  # shard name -> open safetensors file (memory-mapped)
        self.reload()

    def reload(self) -> None:
        """Read the index on disk; a listed shard whose size differs is dropped (its media become misses)."""
        try:
            index = json.loads((self.path / INDEX).read_text())
        except FileNotFoundError:
            index = {"fingerprint": self.fingerprint, "tokenizer": self.tokenizer_name, "shards": {}, "keys": {}}
        if index["fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.path}: index is for fingerprint {index['fingerprint']}, not {self.fingerprint}")
        broken = {n for n, size in index["shards"].items() if _size(self.path / n) != size}
        for name in sorted(broken):
            logger.warning("%s: shard %s is missing or has the wrong size; its media will be encoded again", self.path, name)
        index["shards"] = {n: s for n, s in index["shards"].items() if n not in broken}
        index["keys"] = {k: n for k, n in index["keys"].items() if n not in broken}
        self.index = index
        self._handles = {n: h for n, h in self._handles.items() if n in index["shards"]}

    def __contains__(self, key: str) -> bool:
        return key in self.index["keys"]

    def get(self, key: str) -> torch.Tensor | None:
        name = self.index["keys"].get(key)
        if name is None:
            return None
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.path / name), framework="pt")
        return self._handles[name].get_tensor(key)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add `tensors` (key -> tokens) as one new shard, then list it in the index."""
        with self._lock():
            self.reload()  # another writer may have added shards since we last looked
            self._remove_untrusted()
            new = {k: t.detach().cpu().clone() for k, t in tensors.items() if k not in self}  # clone: no shared storage
            if not new:
                return
            numbers = [int(SHARD.fullmatch(n).group(1)) for n in self.index["shards"]]
            name = f"shard-{max(numbers, default=-1) + 1:05d}.safetensors"
            atomic_write(self.path / name, lambda tmp: save_file(new, str(tmp)))
            self.index["shards"][name] = _size(self.path / name)
            self.index["keys"].update(dict.fromkeys(new, name))
            atomic_write(self.path / INDEX, lambda tmp: tmp.write_text(json.dumps(self.index)))

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.path / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _remove_untrusted(self) -> None:
        """Under the lock: delete temp files and shards the index does not list (left by killed writers)."""
        for f in self.path.iterdir():
            if f.name.endswith(".tmp") or (SHARD.fullmatch(f.name) and f.name not in self.index["shards"]):
                logger.info("removing %s, left by an interrupted cache write", f)
                f.unlink(missing_ok=True)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


@dataclass
class CacheStats:
    cached: int = 0  # media found in the cache
    encoded: int = 0  # media encoded and written by this call
    failed: int = 0  # media that would not load; their records are reported when read for training
    bad_records: int = 0  # records that failed `check_record`; likewise reported when read


def bad_batch_sizes(sizes: dict[str, object]) -> dict[str, object]:
    """The entries of `sizes` (modality -> media per tokenizer call) that are not whole numbers from 1."""
    return {m: b for m, b in sizes.items() if isinstance(b, bool) or not isinstance(b, int) or b < 1}


class TokenCache:
    """Media tokens of several modalities, one `ShardStore` each, keyed by the media bytes."""

    def __init__(
        self, root: str | os.PathLike, tokenizers: dict[str, MediaTokenizer], *, shard_bytes: int = 256 * 2**20,
        batch_sizes: dict[str, int] | None = None,
    ):
        self.root, self.tokenizers, self.shard_bytes = Path(root), dict(tokenizers), shard_bytes
        self.batch_sizes = dict(batch_sizes or {})  # modality -> media per tokenizer call (`encode_many`); default 1
        if bad := bad_batch_sizes(self.batch_sizes):
            raise ValueError(f"encode batch sizes must be whole numbers from 1: {bad}")
        self.stores = {}
        for modality, tok in self.tokenizers.items():
            fp = fingerprint(tok)
            self.stores[modality] = ShardStore(self.root / f"{modality}-{fp[:16]}", fp, tok.name)

    def reload(self) -> None:
        """See what other processes (e.g. the other ranks) have written since this cache was opened."""
        for store in self.stores.values():
            store.reload()

    def lookup(self, modality: str, source: bytes | str | os.PathLike) -> torch.Tensor | None:
        """The cached tokens of a medium (its bytes or a file path), or None."""
        store = self.stores.get(modality)
        return None if store is None else store.get(source_key(source))

    def encode_records(self, records: Iterable[Record | dict], *, progress: bool = True) -> CacheStats:
        """Encode every medium of `records` (Records, or rows of `read_records`) that is not cached yet,
        `batch_sizes[modality]` media per tokenizer call.

        Media that fail to load are counted and left out: the loader reports
        their records with file and line when it reads them.
        """
        stats = CacheStats()
        queued: dict[str, dict[str, object]] = {m: {} for m in self.stores}  # key -> loaded medium, not yet encoded
        pending: dict[str, dict[str, torch.Tensor]] = {m: {} for m in self.stores}  # encoded, not yet written
        pending_bytes = 0
        for record in tqdm(records, desc="encoding media", unit="record", disable=not progress):
            if isinstance(record, dict):
                try:
                    record = check_record(record)
                except BadRecordError:
                    stats.bad_records += 1
                    continue
            for part in _media_parts(record.messages):
                modality = part["type"]
                source = _source(part, record.base_dir) if modality in self.stores else None
                if source is None:
                    continue
                try:
                    key = source_key(source)
                    if key in self.stores[modality] or key in pending[modality] or key in queued[modality]:
                        stats.cached += 1
                        continue
                    queued[modality][key] = load_media(source, modality, **self.tokenizers[modality].load_options)
                except (OSError, MediaError) as e:
                    stats.failed += 1
                    logger.debug("%s: cannot encode: %s", record.where, e)
                    continue
                if len(queued[modality]) >= self.batch_sizes.get(modality, 1):
                    pending_bytes += self._encode(modality, queued[modality], pending[modality], stats)
                    if pending_bytes >= self.shard_bytes:
                        self._flush(pending)
                        pending_bytes = 0
        for modality in self.stores:  # the last, partial batches
            self._encode(modality, queued[modality], pending[modality], stats)
        self._flush(pending)
        logger.info(
            "token cache %s: %d media cached, %d encoded, %d failed to load, %d bad records",
            self.root, stats.cached, stats.encoded, stats.failed, stats.bad_records,
        )
        return stats

    def _encode(self, modality: str, queued: dict[str, object], pending: dict[str, torch.Tensor], stats: CacheStats) -> int:
        """Encode `queued` (key -> medium) into `pending`, empty it, and return the bytes added. A batch that
        fails on a bad medium is encoded again one medium at a time, so only that medium is left out."""
        if not queued:
            return 0
        tokenizer = self.tokenizers[modality]
        try:
            encoded = dict(zip(queued, tokenizer.encode_many(list(queued.values()))))
        except (OSError, MediaError):
            encoded = {}
        added = 0
        for key, medium in queued.items():
            if key not in encoded:
                try:
                    encoded[key] = tokenizer.encode(medium)
                except (OSError, MediaError) as e:
                    stats.failed += 1
                    logger.debug("%s medium %s: cannot encode: %s", modality, key[:12], e)
                    continue
            pending[key] = encoded[key].cpu()
            stats.encoded += 1
            added += pending[key].numel() * pending[key].element_size()
        queued.clear()
        return added

    def _flush(self, pending: dict[str, dict[str, torch.Tensor]]) -> None:
        for modality, tensors in pending.items():
            if tensors:
                self.stores[modality].write(tensors)
                tensors.clear()

    def tokenize(self, messages: list[dict], base_dir: str | os.PathLike) -> list[dict]:
        """`messages` with every cached medium replaced by `{"type": m, "tokens": tensor}`; media that
        are not cached stay as they are (the processor encodes them, or reports them if they are bad)."""
        out = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                content = [self._tokenized(part, base_dir) for part in content]
            out.append({**message, "content": content})
        return out

    def _tokenized(self, part: dict, base_dir: str | os.PathLike) -> dict:
        store = self.stores.get(part.get("type"))
        source = None if store is None else _source(part, base_dir)
        if source is None:
            return part
        try:
            tokens = store.get(source_key(source))
        except OSError:  # a missing file: left for the processor to report
            return part
        return part if tokens is None else {"type": part["type"], "tokens": tokens} | part_notes(part)


def _media_parts(messages: list[dict]) -> Iterator[dict]:
    for message in messages:
        if isinstance(message["content"], list):
            yield from (p for p in message["content"] if p["type"] != "text")


def _source(part: dict, base_dir: str | os.PathLike) -> bytes | Path | None:
    """What a media part's key is computed from: its embedded bytes or its file; None for other sources."""
    if isinstance(part.get("bytes"), str):
        try:
            return base64.b64decode(part["bytes"], validate=True)
        except ValueError:
            return None  # not base64: the processor reports it
    if isinstance(part.get("bytes"), (bytes, bytearray)):
        return bytes(part["bytes"])
    return media_path(part, base_dir)
