"""Media containers, safe bounded loaders, and atomic writers.

Every image, sound and clip the rest of mllm sees passes through here, in one of three containers:

    Image  pixels  uint8   [H, W, 3]     RGB
    Audio  samples float32 [C, N]        C channels, N samples at sample_rate Hz
    Video  frames  uint8   [T, H, W, 3]  RGB, at fps frames per second

Loaders take a path or the encoded bytes and refuse anything over MediaLimits before decoding it
(file size, pixel count read from the header, duration, frame count); every decoder failure becomes
one MediaError naming the source. Writers go through a temporary file and os.replace, so a killed
process never leaves a half-written file behind.

PyAV (FFmpeg, a 36 MB wheel) is imported by the functions that decode or write clips and compressed sound,
so code that reads only images, WAV or FLAC, or text, runs without it.
"""

from __future__ import annotations

import io
import math
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import PIL.ImageOps
import soundfile as sf
import torch
from scipy.signal import resample_poly

from mllm.errors import InputError

if TYPE_CHECKING:
    import av

Source = str | os.PathLike | bytes  # a path, or the encoded file's bytes (errors then name "<bytes>")
Size = int | tuple[int, int]  # (height, width), or an int for a square


class MediaError(InputError, ValueError):
    """One error type for every bad medium. str(e) == f"{source}: {reason}"."""

    def __init__(self, source: str, reason: str):
        if len(source) > 200:  # e.g. base64 text taken for a path: name it, don't print it
            source = f"{source[:60]}…"
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # two-argument init: pickling (e.g. out of DataLoader workers) needs both
        return type(self), (self.source, self.reason)


@dataclass(frozen=True)
class MediaLimits:
    """Upper bounds the loaders enforce; anything over them raises MediaError."""

    max_bytes: int = 256 * 2**20  # encoded file/bytes size
    max_pixels: int = 40_000_000  # per image/frame, read from the header before decoding (decompression bombs)
    max_duration_s: float = 600.0  # audio and video, of what is decoded (after cropping)
    max_frames: int = 4096  # frames a loaded Video holds (after num_frames/fps sampling)
    max_samples: int = 64 * 2**20  # audio samples, all channels together (256 MiB as float32): duration alone
    # leaves a many-channel, high-rate file unbounded


DEFAULT_LIMITS = MediaLimits()


def _require(ok: bool, source: str, reason: str) -> None:
    if not ok:
        raise MediaError(source, reason)


def _resize(pixels: np.ndarray, size: Size) -> np.ndarray:
    """Bicubic resize of uint8 [H, W, 3] to size."""
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    if pixels.shape[:2] == (h, w):
        return pixels
    return np.array(PIL.Image.fromarray(pixels).resize((w, h), PIL.Image.Resampling.BICUBIC))


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()


def _torch_ready(a: np.ndarray) -> np.ndarray:
    """a, or a copy where torch.from_numpy cannot take it: negative strides (a flip) or read-only (np.asarray(PIL))."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite uint8 [..., 4] RGBA over a white background -> uint8 [..., 3] RGB."""
    rgb, alpha = rgba[..., :3].astype(np.float32), rgba[..., 3:].astype(np.float32) / 255
    return np.round(rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)


@dataclass
class Image:
    """An RGB image: pixels uint8 [H, W, 3]."""

    pixels: np.ndarray

    def __post_init__(self):
        p = self.pixels
        _require(isinstance(p, np.ndarray) and p.dtype == np.uint8, "<array>", "image pixels must be a uint8 array")
        _require(p.ndim == 3 and p.shape[2] == 3, "<array>", f"image pixels must be [H, W, 3], got {list(p.shape)}")
        _require(p.size > 0, "<array>", f"image is empty, shape {list(p.shape)}")

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    def resize(self, size: Size) -> Image:
        """Bicubic resize to size = (height, width); an int means a square."""
        return Image(_resize(self.pixels, size))

    def to_tensor(self) -> torch.FloatTensor:
        """[3, H, W] float32 in [0, 1]."""
        return torch.from_numpy(_torch_ready(self.pixels)).permute(2, 0, 1).float().div_(255)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Image:
        """Inverse of to_tensor: [3, H, W] float in [0, 1] (clamped)."""
        _require(t.ndim == 3 and t.shape[0] == 3, "<tensor>", f"expected [3, H, W], got {list(t.shape)}")
        return cls(_to_uint8(t.permute(1, 2, 0)))


@dataclass
class Audio:
    """A waveform: samples float32 [C, N], nominally in [-1, 1], at sample_rate Hz. Other float dtypes are cast."""

    samples: np.ndarray
    sample_rate: int

    def __post_init__(self):
        s = self.samples
        is_float = isinstance(s, np.ndarray) and np.issubdtype(s.dtype, np.floating)
        _require(is_float, "<array>", "audio samples must be a float array")
        _require(s.ndim == 2 and s.shape[0] >= 1, "<array>", f"audio samples must be [C, N], got {list(s.shape)}")
        _require(s.shape[1] >= 1, "<array>", "audio has no samples")
        _require(bool(np.isfinite(s).all()), "<array>", "audio samples contain NaN or inf")
        _require(int(self.sample_rate) == self.sample_rate > 0, "<array>", f"bad sample rate {self.sample_rate}")
        self.samples = s.astype(np.float32, copy=False)
        self.sample_rate = int(self.sample_rate)

    @property
    def num_channels(self) -> int:
        return self.samples.shape[0]

    @property
    def num_samples(self) -> int:
        return self.samples.shape[1]

    @property
    def duration(self) -> float:  # seconds
        return self.num_samples / self.sample_rate

    def to_mono(self) -> Audio:
        """Mean over channels -> [1, N]."""
        return Audio(self.samples.mean(axis=0, keepdims=True), self.sample_rate)

    def resample(self, sample_rate: int) -> Audio:
        """Polyphase (anti-aliased) resampling to sample_rate Hz."""
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if sample_rate == self.sample_rate:
            return self
        g = math.gcd(self.sample_rate, sample_rate)
        return Audio(resample_poly(self.samples, sample_rate // g, self.sample_rate // g, axis=1), sample_rate)

    def to_tensor(self) -> torch.FloatTensor:
        """[C, N] float32."""
        return torch.from_numpy(_torch_ready(self.samples))


@dataclass
class Video:
    """An RGB clip: frames uint8 [T, H, W, 3], played at fps frames per second."""

    frames: np.ndarray
    fps: float

    def __post_init__(self):
        f = self.frames
        _require(isinstance(f, np.ndarray) and f.dtype == np.uint8, "<array>", "video frames must be a uint8 array")
        _require(f.ndim == 4 and f.shape[3] == 3, "<array>", f"video frames must be [T, H, W, 3], got {list(f.shape)}")
        _require(f.size > 0, "<array>", f"video is empty, shape {list(f.shape)}")
        _require(math.isfinite(self.fps) and self.fps > 0, "<array>", f"bad frame rate {self.fps}")
        self.fps = float(self.fps)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    @property
    def duration(self) -> float:  # seconds
        return self.num_frames / self.fps

    def resize(self, size: Size) -> Video:
        """Bicubic resize of every frame to size = (height, width); an int means a square."""
        return Video(np.stack([_resize(f, size) for f in self.frames]), self.fps)

    def to_tensor(self) -> torch.FloatTensor:
        """[T, 3, H, W] float32 in [0, 1]."""
        return torch.from_numpy(_torch_ready(self.frames)).permute(0, 3, 1, 2).float().div_(255)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, fps: float) -> Video:
        """Inverse of to_tensor: [T, 3, H, W] float in [0, 1] (clamped)."""
        _require(t.ndim == 4 and t.shape[1] == 3, "<tensor>", f"expected [T, 3, H, W], got {list(t.shape)}")
        return cls(_to_uint8(t.permute(0, 2, 3, 1)), fps)


def _source_name(source: Source) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)


def _read(source: Source, limits: MediaLimits) -> tuple[str, bytes]:
    """(name for errors, encoded bytes); refuses missing, empty and oversized input."""
    name, too_large = _source_name(source), f"too large: over {limits.max_bytes} bytes"
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        try:
            with open(name, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                _require(size <= limits.max_bytes, name, too_large)
                # the file's size, not the limit: read(n) allocates n bytes first; +1 catches a file that grew
                data = f.read(min(size, limits.max_bytes) + 1)
        except FileNotFoundError as e:
            raise MediaError(name, "file not found") from e
        except IsADirectoryError as e:
            raise MediaError(name, "is a directory, not a file") from e
        except OSError as e:
            raise MediaError(name, f"cannot read file ({e.strerror or e})") from e
    _require(len(data) > 0, name, "empty input (0 bytes)")
    _require(len(data) <= limits.max_bytes, name, too_large)
    return name, data


@contextmanager
def _media_errors(name: str, problem: str) -> Iterator[None]:
    """Re-raise any codec exception as MediaError(name, f"{problem} ({detail})")."""
    try:
        yield
    except MediaError:
        raise
    except Exception as e:  # codecs raise a zoo of types on bad input: OSError, SyntaxError, struct.error, ...
        raise MediaError(name, f"{problem} ({getattr(e, 'strerror', None) or e})") from e


def _build(cls: type, name: str, *args):
    """Construct a container, blaming invalid content on the source it came from."""
    try:
        return cls(*args)
    except MediaError as e:
        raise MediaError(name, e.reason) from None


def _check_pixels(name: str, width: int, height: int, limits: MediaLimits) -> None:
    reason = f"too many pixels: {width}x{height} is over the limit of {limits.max_pixels} (decompression bomb?)"
    _require(width * height <= limits.max_pixels, name, reason)


def _check_duration(name: str, what: str, seconds: float, limits: MediaLimits) -> None:
    _require(seconds <= limits.max_duration_s, name, f"too long: {what} exceeds {limits.max_duration_s:g} s")


def _check_samples(name: str, frames: int, channels: int, limits: MediaLimits) -> None:
    _require(frames * channels <= limits.max_samples, name,
             f"too many samples: {frames} samples × {channels} channels exceed {limits.max_samples}")


_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def _pil_to_rgb(img: PIL.Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]; transparency is composited on white."""
    if img.mode.startswith("I"):  # 16-bit grayscale PNG: convert("RGB") would clip it to 255
        values = np.asarray(img)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        if isinstance(key := img.info.get("transparency"), int):  # tRNS: the one fully transparent gray value
            gray[values == key] = 255  # composited on white
        return np.repeat(gray[..., None], 3, axis=2)
    if img.has_transparency_data:
        return _over_white(np.asarray(img.convert("RGBA")))
    return np.array(img.convert("RGB"))


def load_image(source: Source, *, size: Size | None = None, limits: MediaLimits = DEFAULT_LIMITS) -> Image:
    """Decode a PNG/JPEG/WebP/GIF (first frame)/BMP to RGB, upright per its EXIF orientation; size -> resize."""
    name, data = _read(source, limits)
    with _media_errors(name, "corrupt or truncated image"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
                img = PIL.Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)  # lazy: parses the header only
        except PIL.UnidentifiedImageError as e:
            raise MediaError(name, f"unsupported image format, expected one of {', '.join(_IMAGE_FORMATS)}") from e
        except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
            raise MediaError(name, f"too many pixels ({e})") from e  # PIL's own guard, for the grossest headers
        _check_pixels(name, img.width, img.height, limits)
        img.load()
        PIL.ImageOps.exif_transpose(img, in_place=True)
        image = Image(_pil_to_rgb(img))
    return image.resize(size) if size is not None else image


def _decode_audio_sf(name: str, file: sf.SoundFile, crop_s: float | None, limits: MediaLimits):
    rate = file.samplerate
    n = file.frames if crop_s is None else min(file.frames, round(crop_s * rate))
    _check_duration(name, "audio", n / rate, limits)
    _check_samples(name, n, file.channels, limits)
    chunks = []
    while n > 0:  # in blocks: never allocate more than the data holds, whatever the header claims
        chunk = file.read(min(n, 2**16), dtype="float32", always_2d=True)  # [n_i, C]
        if not len(chunk):
            break
        chunks.append(chunk)
        n -= len(chunk)
    _require(len(chunks) > 0, name, "audio has no samples")
    return np.concatenate(chunks).T, rate


def _decode_audio_av(name: str, data: bytes, crop_s: float | None, limits: MediaLimits):
    import av

    with av.open(io.BytesIO(data)) as container:
        _require(len(container.streams.audio) > 0, name, "no audio stream")
        stream = container.streams.audio[0]
        rate, keep = stream.rate, None if crop_s is None else round(crop_s * stream.rate)
        resampler = av.AudioResampler(format="fltp")  # planar float32: to_ndarray() -> [C, n]
        chunks, n = [], 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
                n += chunks[-1].shape[1]
            if keep is not None and n >= keep:
                break
            _check_duration(name, "audio", n / rate, limits)  # while decoding: the header may lie or be silent
            _check_samples(name, n, chunks[-1].shape[0] if chunks else 1, limits)
    _require(n > 0, name, "audio has no samples")
    return np.concatenate(chunks, axis=1)[:, :keep], rate


def load_audio(
    source: Source,
    *,
    sample_rate: int | None = None,
    mono: bool = True,
    max_duration_s: float | None = None,
    limits: MediaLimits = DEFAULT_LIMITS,
) -> Audio:
    """Decode WAV/FLAC/OGG/MP3 (soundfile), else anything FFmpeg reads (PyAV).

    max_duration_s crops to the first max_duration_s seconds; limits.max_duration_s instead rejects
    input whose decoded length would exceed it. mono averages channels; sample_rate resamples.
    """
    if max_duration_s is not None and max_duration_s <= 0:
        raise ValueError(f"max_duration_s must be positive, got {max_duration_s}")
    name, data = _read(source, limits)
    try:
        file = sf.SoundFile(io.BytesIO(data))
    except Exception:  # not a format libsndfile knows (AAC, Opus in WebM, ...): let FFmpeg try
        with _media_errors(name, "unsupported or corrupt audio"):
            samples, rate = _decode_audio_av(name, data, max_duration_s, limits)
    else:
        with file, _media_errors(name, "unsupported or corrupt audio"):
            samples, rate = _decode_audio_sf(name, file, max_duration_s, limits)
    audio = _build(Audio, name, samples, rate)
    if mono and audio.num_channels > 1:
        audio = audio.to_mono()
    return audio.resample(sample_rate) if sample_rate is not None else audio


def _video_stream(container: av.container.InputContainer, name: str) -> av.VideoStream:
    import av

    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    _require(len(streams) > 0, name, "no video stream")  # cover art in an audio file does not count
    return streams[0]


def _frame_times(name: str, data: bytes, limits: MediaLimits) -> tuple[np.ndarray, float]:
    """Presentation times (s, from 0, ascending) of every frame and the nominal fps, from packets alone."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = _video_stream(container, name)
        _check_pixels(name, stream.codec_context.width, stream.codec_context.height, limits)
        pts = [p.pts for p in container.demux(stream) if p.size]  # demux ends with an empty flush packet
        rate, time_base = stream.average_rate or stream.guessed_rate, stream.time_base
    _require(len(pts) > 0, name, "no video frames")
    _require(bool(rate), name, "unknown frame rate")
    if None in pts or not time_base:  # raw streams without timestamps: assume a constant frame rate
        return np.arange(len(pts)) / float(rate), float(rate)
    times = np.sort(np.array(pts, dtype=np.float64)) * float(time_base)  # decode order -> presentation order
    return times - times[0], float(rate)


def even_indices(n: int, count: int) -> np.ndarray:
    """`count` indices evenly spaced over a clip of `n` frames, its first and last included (repeating when the
    clip is shorter): how the video tokenizers sample a clip."""
    return np.linspace(0, n - 1, count).round().astype(int)


def _pick_frames(
    name: str,
    times: np.ndarray,
    fps: float,
    num_frames: int | None,
    target_fps: float | None,
    even_frames: int | None,
    limits: MediaLimits,
):
    """Indices (ascending, may repeat) of the frames to keep, and the frame rate they play at."""
    duration = times[-1] + 1 / fps  # the last frame stays on screen for one frame period
    if num_frames is not None:
        count, asked = num_frames, f"num_frames={num_frames}"
    elif even_frames is not None:
        count, asked = even_frames, f"even_frames={even_frames}"
    elif target_fps is not None:
        count = math.ceil(duration * target_fps - 1e-6)
        asked = f"fps={target_fps:g} over {duration:g} s gives {count}"
    else:
        count, asked = len(times), f"the clip has {len(times)}"
    reason = f"too many frames: {asked}, over the limit of {limits.max_frames}"
    _require(count <= limits.max_frames, name, reason)  # before any array of that length is made
    if even_frames is not None:
        return even_indices(len(times), even_frames), even_frames / duration
    if num_frames is not None:  # the centre of each of num_frames equal segments
        targets, out_fps = (np.arange(num_frames) + 0.5) * duration / num_frames, num_frames / duration
    elif target_fps is not None:
        targets, out_fps = np.arange(count) / target_fps, target_fps
    else:
        return np.arange(len(times)), fps
    # the frame on screen at each target time; 1e-6 absorbs float error in the timestamps
    indices = np.searchsorted(times, targets + 1e-6, side="right") - 1
    return np.clip(indices, 0, len(times) - 1), out_fps


def _decode_frames(name: str, data: bytes, indices: np.ndarray, size: Size | None, limits: MediaLimits) -> np.ndarray:
    """Decode in presentation order, keeping the frames at indices -> uint8 [len(indices), H, W, 3]."""
    import av

    last, out, reached = int(indices[-1]), None, False
    with av.open(io.BytesIO(data)) as container:
        stream = _video_stream(container, name)
        if stream.codec_context.width * stream.codec_context.height > 128 * 128:
            stream.thread_type = "AUTO"  # decoding threads pay for their start-up only on bigger frames (2 cores)
        for k, frame in enumerate(container.decode(stream)):
            lo, hi = np.searchsorted(indices, k, side="left"), np.searchsorted(indices, k, side="right")
            if lo < hi:
                _check_pixels(name, frame.width, frame.height, limits)
                if any(c.is_alpha for c in frame.format.components):  # e.g. GIF: composite on white, as for images
                    rgb = _over_white(frame.to_ndarray(format="rgba"))
                else:
                    rgb = frame.to_ndarray(format="rgb24")
                # the display matrix (phone videos): players turn the frame `rotation` degrees counterclockwise
                if turns := round(getattr(frame, "rotation", 0) / 90) % 4:
                    rgb = np.rot90(rgb, k=turns)
                rgb = _resize(rgb, size) if size is not None else rgb
                if out is None:  # filled in place: no second copy of the frames
                    out = np.empty((len(indices), *rgb.shape), np.uint8)
                _require(rgb.shape == out.shape[1:], name, "frame size changes mid-stream")
                out[lo:hi] = rgb
            if k >= last:
                reached = True
                break
    _require(reached, name, f"corrupt or truncated video: frame {last} could not be decoded")
    return out


def load_video(
    source: Source,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    even_frames: int | None = None,
    size: Size | None = None,
    limits: MediaLimits = DEFAULT_LIMITS,
) -> Video:
    """Decode an MP4/WebM/animated GIF (anything FFmpeg reads) to RGB frames.

    num_frames picks that many frames uniformly over the clip (the centre of each of num_frames equal
    segments; frames repeat if the clip has fewer). fps resamples to that frame rate (sample-and-hold
    on the real timestamps). even_frames keeps the frames `even_indices` picks, as a video tokenizer
    would from the whole clip; only those are converted and held. Give at most one of the three.
    size resizes every frame.
    """
    if sum(x is not None for x in (num_frames, fps, even_frames)) > 1:
        raise ValueError("pass at most one of num_frames, fps and even_frames")
    counts = [n for n in (num_frames, even_frames) if n is not None]
    if any(n < 1 for n in counts) or (fps is not None and not 0 < fps < math.inf):
        raise ValueError(f"num_frames, even_frames and fps must be positive and finite, got {num_frames}, "
                         f"{even_frames}, {fps}")
    name, data = _read(source, limits)
    with _media_errors(name, "unsupported or corrupt video"):
        times, src_fps = _frame_times(name, data, limits)
        _check_duration(name, "video", times[-1] + 1 / src_fps, limits)  # as _pick_frames measures it
        indices, out_fps = _pick_frames(name, times, src_fps, num_frames, fps, even_frames, limits)
        frames = _decode_frames(name, data, indices, size, limits)
    return _build(Video, name, frames, out_fps)


_LOADERS = {"image": load_image, "audio": load_audio, "video": load_video}


def load_media(source: Source, modality: str, **kwargs) -> Image | Audio | Video:
    """load_image / load_audio / load_video by modality name; kwargs go to that loader."""
    reason = f"unknown modality {modality!r}, expected one of {', '.join(_LOADERS)}"
    _require(modality in _LOADERS, _source_name(source), reason)
    return _LOADERS[modality](source, **kwargs)


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of path to write; on success it replaces path in one step, else it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)  # atomic within one filesystem, hence a sibling
    finally:
        tmp.unlink(missing_ok=True)


def _suffix(path: Path, known) -> str:
    suffix = path.suffix.lower()
    _require(suffix in known, str(path), f"unsupported suffix {suffix!r}, expected one of {', '.join(known)}")
    return suffix


_IMAGE_WRITERS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF"}
_AUDIO_WRITERS = {  # suffix -> (soundfile format, subtype)
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


def save_image(image: Image, path: str | os.PathLike) -> Path:
    """Write image in the format its suffix names (.png/.jpg/.jpeg/.webp/.gif)."""
    path = Path(path)
    fmt = _IMAGE_WRITERS[_suffix(path, _IMAGE_WRITERS)]
    with _atomic(path) as tmp, _media_errors(str(path), "cannot encode image"):
        PIL.Image.fromarray(image.pixels).save(tmp, format=fmt, quality=95)  # quality: JPEG/WebP only
    return path


def save_audio(audio: Audio, path: str | os.PathLike) -> Path:
    """Write audio in the format its suffix names (.wav/.flac 16-bit PCM, .ogg Vorbis, .mp3)."""
    path = Path(path)
    fmt, subtype = _AUDIO_WRITERS[_suffix(path, _AUDIO_WRITERS)]
    with _atomic(path) as tmp, _media_errors(str(path), "cannot encode audio"):
        # clip first: libsndfile wraps out-of-range floats around when converting to integer PCM
        sf.write(tmp, np.clip(audio.samples, -1, 1).T, audio.sample_rate, format=fmt, subtype=subtype)
    return path


def _encode_av(video: Video, tmp: Path, suffix: str) -> None:
    """H.264 in MP4, or VP9 (VP8 if FFmpeg lacks it) in WebM; yuv420p, so odd sides are edge-padded to even."""
    import av

    if suffix == ".mp4":
        # no-mbtree: with it, libx264 may encode identical tiny clips differently from run to run
        codec, options = "libx264", {"crf": "18", "x264-params": "no-mbtree=1"}
    else:
        codec = "libvpx-vp9" if "libvpx-vp9" in av.codecs_available else "libvpx"
        options = {"crf": "30", "b": "0", "cpu-used": "4"}  # b=0: constant quality
    frames = np.pad(video.frames, ((0, 0), (0, video.height % 2), (0, video.width % 2), (0, 0)), mode="edge")
    with av.open(str(tmp), "w", format=suffix[1:]) as container:
        stream = container.add_stream(codec, rate=Fraction(video.fps).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())  # flush delayed frames


def save_video(video: Video, path: str | os.PathLike) -> Path:
    """Write video as .mp4 (H.264), .webm (VP9/VP8) or .gif (delays in 1/100 s, so fps is rounded)."""
    path = Path(path)
    suffix = _suffix(path, (".mp4", ".webm", ".gif"))
    with _atomic(path) as tmp, _media_errors(str(path), "cannot encode video"):
        if suffix == ".gif":  # Pillow quantizes each frame to its own palette (and merges identical neighbours)
            images = [PIL.Image.fromarray(f) for f in video.frames]
            duration_ms = 1000 / video.fps
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
        else:
            _encode_av(video, tmp, suffix)
    return path
