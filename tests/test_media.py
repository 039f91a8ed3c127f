"""Tests for mllm.media: containers, bounded loaders, atomic writers. All fixtures are generated in tmp_path."""

import dataclasses
import pickle
import re
import struct
import tracemalloc
import warnings
import zlib

import av
import numpy as np
import PIL.Image
import pytest
import soundfile as sf
import torch

from mllm.media import (
    DEFAULT_LIMITS,
    Audio,
    Image,
    MediaError,
    MediaLimits,
    Video,
    even_indices,
    load_audio,
    load_image,
    load_media,
    load_video,
    save_audio,
    save_image,
    save_video,
)

# ----------------------------------------------------------------------------- fixtures


def gradient(h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth uint8 [h, w, 3] image: survives lossy codecs nearly unchanged."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 128)], axis=-1).astype(np.uint8)


def sine(freq: float, sample_rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    """float32 [N]."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(samples: np.ndarray, sample_rate: int) -> float:
    """Frequency of the FFT magnitude peak of a 1-D signal."""
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * sample_rate / len(samples))


def levels_clip(num_frames: int = 30, h: int = 32, w: int = 48) -> np.ndarray:
    """uint8 [T, h, w, 3] where frame i is uniformly gray at level 8 * i, so a frame's mean names its index."""
    levels = np.arange(num_frames, dtype=np.uint8) * 8
    return np.broadcast_to(levels[:, None, None, None], (num_frames, h, w, 3)).copy()


def frame_indices(video: Video) -> list[int]:
    return [round(float(f.mean()) / 8) for f in video.frames]


def png_header(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_aac(path, samples: np.ndarray, sample_rate: int) -> None:
    """AAC in MP4 (.m4a) via PyAV: a format soundfile cannot read, exercising the FFmpeg fallback."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_frameless_webm(path) -> None:
    """A WebM with a video stream that holds no frames (and an audio stream, so the file gets written)."""
    with av.open(str(path), "w", format="webm") as container:
        video = container.add_stream("libvpx-vp9", rate=10)
        video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
        audio = container.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 48000
        container.mux(audio.encode(frame))
        container.mux(audio.encode(None))


def with_display_matrix(mp4: bytes, a: int, b: int, c: int, d: int) -> bytes:
    """The clip with its track header's display matrix set to [[a, b], [c, d]], as phones tag portrait video."""
    data = bytearray(mp4)
    at = data.find(b"tkhd") + 8  # past the box type, version and flags
    at += (32 if data[at - 4] == 1 else 20) + 16  # past the times, ids, duration, layer, volume and reserved fields
    data[at : at + 36] = struct.pack(">9i", a << 16, b << 16, 0, c << 16, d << 16, 0, 0, 0, 1 << 30)
    return bytes(data)


# ----------------------------------------------------------------------------- errors and containers


def test_media_error_format_and_pickle():
    e = MediaError("a.png", "empty input")
    assert isinstance(e, ValueError)
    assert str(e) == "a.png: empty input" and (e.source, e.reason) == ("a.png", "empty input")
    e2 = pickle.loads(pickle.dumps(e))
    assert (type(e2), e2.source, e2.reason, str(e2)) == (MediaError, e.source, e.reason, str(e))


def test_media_error_shortens_a_huge_source_name():
    with pytest.raises(MediaError) as e:
        load_image("iVBORw0KGgo" * 500)  # base64 text taken for a path
    assert e.value.source == ("iVBORw0KGgo" * 6)[:60] + "…" and e.value.reason.startswith("cannot read file")
    assert pickle.loads(pickle.dumps(e.value)).source == e.value.source


def test_reading_a_small_file_allocates_about_its_size_not_the_byte_limit(tmp_path):
    path = tmp_path / "small.png"
    PIL.Image.fromarray(gradient()).save(path)
    tracemalloc.start()
    try:
        load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20 < DEFAULT_LIMITS.max_bytes  # read(max_bytes + 1) had allocated 256 MiB first


def test_default_limits():
    assert DEFAULT_LIMITS == MediaLimits() and DEFAULT_LIMITS.max_pixels == 40_000_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.max_bytes = 1


@pytest.mark.parametrize(
    "make, word",
    [
        (lambda: Image(np.zeros((4, 4, 3), np.float32)), "uint8"),
        (lambda: Image(np.zeros((4, 4), np.uint8)), "[H, W, 3]"),
        (lambda: Image(np.zeros((0, 4, 3), np.uint8)), "empty"),
        (lambda: Audio(np.array([[0.0, np.nan]], np.float32), 16000), "NaN"),
        (lambda: Audio(np.array([[0.0, np.inf]], np.float32), 16000), "inf"),
        (lambda: Audio(np.zeros(10, np.float32), 16000), "[C, N]"),
        (lambda: Audio(np.zeros((1, 0), np.float32), 16000), "no samples"),
        (lambda: Audio(np.zeros((1, 10), np.int16), 16000), "float"),
        (lambda: Audio(np.zeros((1, 10), np.float32), 0), "sample rate"),
        (lambda: Video(np.zeros((2, 4, 4), np.uint8), 10), "[T, H, W, 3]"),
        (lambda: Video(np.zeros((0, 4, 4, 3), np.uint8), 10), "empty"),
        (lambda: Video(np.zeros((2, 4, 4, 3), np.uint8), 0), "frame rate"),
        (lambda: Image.from_tensor(torch.zeros(4, 4, 3)), "[3, H, W]"),
        (lambda: Video.from_tensor(torch.zeros(2, 4, 4, 3), fps=10), "[T, 3, H, W]"),
    ],
)
def test_containers_validate(make, word):
    with pytest.raises(MediaError) as e:
        make()
    assert e.value.source in ("<array>", "<tensor>") and word in e.value.reason


def test_image_tensor_round_trip_and_resize():
    image = Image(gradient(48, 64))
    t = image.to_tensor()
    assert t.shape == (3, 48, 64) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    assert np.array_equal(Image.from_tensor(t).pixels, image.pixels)
    assert np.array_equal(Image.from_tensor(torch.full((3, 2, 2), 7.0)).pixels, np.full((2, 2, 3), 255))  # clamped
    assert (image.resize(32).height, image.resize(32).width) == (32, 32)
    assert image.resize((24, 40)).pixels.shape == (24, 40, 3)
    assert np.abs(image.resize((96, 128)).resize((48, 64)).pixels.astype(int) - image.pixels).mean() < 2


def test_audio_and_video_tensors():
    audio = Audio(np.stack([sine(440, 16000), sine(880, 16000)]).astype(np.float64), 16000)
    assert audio.samples.dtype == np.float32  # float64 input is cast
    assert (audio.num_channels, audio.num_samples, audio.duration) == (2, 16000, 1.0)
    assert audio.to_tensor().shape == (2, 16000)
    video = Video(levels_clip(6), fps=3)
    assert (video.num_frames, video.height, video.width, video.duration) == (6, 32, 48, 2.0)
    t = video.to_tensor()
    assert t.shape == (6, 3, 32, 48) and t.max() <= 1
    assert np.array_equal(Video.from_tensor(t, fps=3).frames, video.frames)
    assert video.resize((16, 24)).frames.shape == (6, 16, 24, 3)


@pytest.mark.parametrize("flip", [lambda a: a[..., ::-1, :], lambda a: np.lib.stride_tricks.as_strided(a, writeable=False)])
def test_to_tensor_takes_flipped_and_read_only_arrays(flip):
    warnings.simplefilter("error")  # torch warns that it would share a read-only array
    image, video = gradient(4, 6), levels_clip(3, 4, 6)
    audio = np.stack([sine(440, 8000, 0.01), sine(880, 8000, 0.01)])
    assert torch.equal(Image(flip(image)).to_tensor(), Image(np.ascontiguousarray(flip(image))).to_tensor())
    assert torch.equal(Video(flip(video), fps=3).to_tensor(), Video(np.ascontiguousarray(flip(video)), fps=3).to_tensor())
    assert torch.equal(Audio(flip(audio), 8000).to_tensor(), torch.from_numpy(np.array(flip(audio))))


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("suffix, tolerance", [(".png", 0), (".jpg", 3), (".webp", 3), (".gif", 4)])
def test_image_round_trip(tmp_path, suffix, tolerance):
    image = Image(gradient())
    path = save_image(image, tmp_path / f"a{suffix}")
    loaded = load_image(path)
    assert loaded.pixels.shape == image.pixels.shape and loaded.pixels.dtype == np.uint8
    assert np.abs(loaded.pixels.astype(int) - image.pixels).mean() <= tolerance


def test_load_image_resize_and_from_bytes(tmp_path):
    path = save_image(Image(gradient()), tmp_path / "a.png")
    assert load_image(path, size=32).pixels.shape == (32, 32, 3)
    assert load_image(str(path), size=(24, 40)).pixels.shape == (24, 40, 3)
    assert np.array_equal(load_image(path.read_bytes()).pixels, load_image(path).pixels)


@pytest.mark.parametrize(
    "mode, pixel, expected",
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("LA", (0, 0), (255, 255, 255)),
        ("L", 100, (100, 100, 100)),
        ("I;16", 40000, (156, 156, 156)),  # 16-bit gray scaled to 8 bits, not clipped to 255
    ],
)
def test_load_image_any_mode_to_rgb(tmp_path, mode, pixel, expected):
    PIL.Image.new(mode, (5, 4), pixel).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.pixels.shape == (4, 5, 3)
    assert tuple(image.pixels[0, 0]) == expected


def test_load_image_16_bit_gray_transparency_is_white(tmp_path):
    values = np.array([[0, 40000], [1000, 65535]], np.uint16)
    PIL.Image.fromarray(values).save(tmp_path / "a.png", transparency=1000)  # tRNS: gray 1000 is transparent
    assert load_image(tmp_path / "a.png").pixels[..., 0].tolist() == [[0, 156], [255, 255]]


def test_load_image_palette_transparency_and_cmyk(tmp_path):
    p = PIL.Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.save(tmp_path / "t.png", transparency=1)
    assert tuple(load_image(tmp_path / "t.png").pixels[0, 0]) == (255, 255, 255)
    PIL.Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(tmp_path / "c.jpg").pixels[0, 0].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_load_image_first_gif_frame(tmp_path):
    frames = [PIL.Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100)
    assert tuple(load_image(tmp_path / "a.gif").pixels[0, 0]) == (255, 0, 0)


def test_load_image_applies_exif_orientation(tmp_path):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    PIL.Image.fromarray(gradient(20, 30)).save(tmp_path / "a.jpg", exif=exif)
    assert load_image(tmp_path / "a.jpg").pixels.shape == (30, 20, 3)


# ----------------------------------------------------------------------------- audio


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
def test_audio_round_trip(tmp_path, suffix):
    audio = Audio(np.stack([sine(440, 16000), sine(1000, 16000, amplitude=0.3)]), 16000)
    loaded = load_audio(save_audio(audio, tmp_path / f"a{suffix}"), mono=False)
    assert (loaded.num_channels, loaded.sample_rate) == (2, 16000)
    assert abs(loaded.duration - 1.0) < 0.1  # lossy codecs may pad
    assert abs(peak_hz(loaded.samples[0], 16000) - 440) < 2 and abs(peak_hz(loaded.samples[1], 16000) - 1000) < 2
    if suffix in (".wav", ".flac"):  # 16-bit PCM
        assert np.abs(loaded.samples - audio.samples).max() < 1e-3


def test_save_audio_clips_instead_of_wrapping(tmp_path):
    loaded = load_audio(save_audio(Audio(np.array([[1.5, -1.5, 0.5]], np.float32), 8000), tmp_path / "a.wav"))
    assert loaded.samples[0, 0] > 0.99 and loaded.samples[0, 1] < -0.99


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_to_16k_preserves_frequency(tmp_path, rate):
    sf.write(tmp_path / "a.wav", sine(440, rate), rate)
    audio = load_audio(tmp_path / "a.wav", sample_rate=16000)
    assert audio.sample_rate == 16000 and audio.num_samples == 16000
    assert abs(peak_hz(audio.samples[0], 16000) - 440) < 2
    assert 0.45 < np.abs(audio.samples[0, 100:-100]).max() < 0.55  # amplitude kept, no aliasing blow-up


def test_stereo_to_mono_and_crop(tmp_path):
    left, right = sine(440, 16000, 2.0), np.full(32000, 0.25, np.float32)
    sf.write(tmp_path / "a.flac", np.stack([left, right], axis=1), 16000)
    stereo = load_audio(tmp_path / "a.flac", mono=False)
    mono = load_audio(tmp_path / "a.flac")
    assert stereo.samples.shape == (2, 32000) and mono.samples.shape == (1, 32000)
    assert np.allclose(mono.samples[0], (stereo.samples[0] + stereo.samples[1]) / 2, atol=1e-6)
    cropped = load_audio(tmp_path / "a.flac", max_duration_s=0.5)
    assert cropped.num_samples == 8000 and np.allclose(cropped.samples, mono.samples[:, :8000])


def test_crop_lets_long_audio_under_the_limit(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(16000 * 3, np.float32), 16000)
    limits = MediaLimits(max_duration_s=2.0)
    with pytest.raises(MediaError, match="too long"):
        load_audio(tmp_path / "a.wav", limits=limits)
    assert load_audio(tmp_path / "a.wav", max_duration_s=1.5, limits=limits).duration == 1.5


def test_many_channels_at_a_high_rate_are_refused_by_sample_count(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros((48000, 8), np.float32), 48000)  # 1 s: far under max_duration_s
    write_aac(tmp_path / "a.m4a", sine(440, 22050), 22050)  # the PyAV path counts while decoding
    limits = MediaLimits(max_samples=100_000)
    with pytest.raises(MediaError, match=r"too many samples: 48000 samples × 8 channels exceed 100000"):
        load_audio(tmp_path / "a.wav", limits=limits)
    with pytest.raises(MediaError, match="too many samples: .* exceed 10000"):
        load_audio(tmp_path / "a.m4a", limits=MediaLimits(max_samples=10_000))
    assert load_audio(tmp_path / "a.wav", max_duration_s=0.2, limits=limits).num_samples == 9600  # cropped


def test_audio_pyav_fallback(tmp_path):
    write_aac(tmp_path / "a.m4a", sine(440, 22050), 22050)
    with pytest.raises(sf.LibsndfileError):
        sf.info(tmp_path / "a.m4a")
    audio = load_audio(tmp_path / "a.m4a", sample_rate=16000)
    assert audio.sample_rate == 16000 and audio.num_channels == 1 and 0.9 < audio.duration < 1.2
    assert abs(peak_hz(audio.samples[0], 16000) - 440) < 2
    assert load_audio((tmp_path / "a.m4a").read_bytes(), max_duration_s=0.25).num_samples == round(0.25 * 22050)
    with pytest.raises(MediaError, match="too long"):
        load_audio(tmp_path / "a.m4a", limits=MediaLimits(max_duration_s=0.5))


# ----------------------------------------------------------------------------- video


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_video_round_trip(tmp_path, suffix):
    video = Video(levels_clip(30), fps=10)
    loaded = load_video(save_video(video, tmp_path / f"a{suffix}"))
    assert loaded.frames.shape == video.frames.shape and loaded.fps == pytest.approx(10)
    assert frame_indices(loaded) == list(range(30))
    assert np.abs(loaded.frames.astype(int) - video.frames).mean() < 3


def test_video_odd_size_is_padded_for_yuv420(tmp_path):
    frames = np.repeat(gradient(33, 47)[None], 4, axis=0)
    loaded = load_video(save_video(Video(frames, fps=8), tmp_path / "a.mp4"))
    assert loaded.frames.shape == (4, 34, 48, 3)
    assert np.abs(loaded.frames[:, :33, :47].astype(int) - frames).mean() < 3


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_uniform_frame_picking(tmp_path, suffix):
    path = save_video(Video(levels_clip(30), fps=10), tmp_path / f"a{suffix}")
    video = load_video(path, num_frames=5)
    assert frame_indices(video) == [3, 9, 15, 21, 27]  # the centre of each sixth of the clip
    assert video.duration == pytest.approx(3.0)  # the picked frames still span the clip
    assert np.array_equal(load_video(path, num_frames=5).frames, video.frames)  # deterministic
    more = load_video(path, num_frames=45)  # more frames than the clip holds: frames repeat
    assert more.num_frames == 45 and frame_indices(more) == sorted(frame_indices(more))


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_even_frames_are_the_frames_a_video_tokenizer_takes_from_the_whole_clip(tmp_path, suffix):
    path = save_video(Video(levels_clip(30), fps=10), tmp_path / f"a{suffix}")
    whole = load_video(path)
    for count in (8, 1, 45):  # fewer frames than the clip, one, more (frames repeat)
        even = load_video(path, even_frames=count)
        assert np.array_equal(even.frames, whole.frames[even_indices(30, count)])
        assert even.duration == pytest.approx(whole.duration)
    assert frame_indices(load_video(path, even_frames=4)) == [0, 10, 19, 29]  # first and last included
    with pytest.raises(ValueError, match="at most one of num_frames, fps and even_frames"):
        load_video(path, even_frames=4, num_frames=4)
    with pytest.raises(ValueError, match="must be positive"):
        load_video(path, even_frames=0)
    with pytest.raises(MediaError, match="too many frames: even_frames=9, over the limit of 8"):
        load_video(path, even_frames=9, limits=MediaLimits(max_frames=8))


def test_even_frames_hold_only_their_frames(tmp_path):
    # a long clip's frames were all converted and held, though a video tokenizer reads 8 of them
    path = save_video(Video(np.zeros((600, 96, 96, 3), np.uint8), fps=30), tmp_path / "long.mp4")
    tracemalloc.start()
    try:
        load_video(path, even_frames=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 96 * 96 * 3 * 8 + 2**20, peak  # the whole clip is 16 MiB


def test_fps_resampling(tmp_path):
    path = save_video(Video(levels_clip(30), fps=10), tmp_path / "a.webm")
    down = load_video(path, fps=5)
    assert down.fps == 5 and frame_indices(down) == list(range(0, 30, 2))
    up = load_video(path, fps=20)
    assert up.num_frames == 60 and frame_indices(up) == [i // 2 for i in range(60)]
    assert load_video(path, fps=3).num_frames == 9


def test_load_video_resize_and_from_bytes(tmp_path):
    path = save_video(Video(levels_clip(6), fps=6), tmp_path / "a.mp4")
    assert load_video(path, size=16).frames.shape == (6, 16, 16, 3)
    assert load_video(path.read_bytes(), num_frames=2, size=(8, 12)).frames.shape == (2, 8, 12, 3)
    with pytest.raises(ValueError):
        load_video(path, num_frames=2, fps=2)


@pytest.mark.parametrize("matrix, red", [((0, 1, -1, 0), "top"), ((0, -1, 1, 0), "bottom"), ((-1, 0, 0, -1), "right")])
def test_video_rotation_tag_is_applied_like_a_player(tmp_path, matrix, red):
    frames = np.zeros((3, 16, 32, 3), np.uint8)
    frames[:, :, :16, 0] = frames[:, :, 16:, 2] = 255  # left half red, right half blue
    plain = save_video(Video(frames, fps=10), tmp_path / "plain.mp4")
    assert load_video(plain).frames.shape == (3, 16, 32, 3)  # no tag: as stored
    # 90 degrees clockwise (a portrait phone clip), counterclockwise, and 180: the red half moves like this
    rotated = with_display_matrix(plain.read_bytes(), *matrix)
    video = load_video(rotated, num_frames=4)
    h, w = video.frames.shape[1:3]
    assert (h, w) == ((16, 32) if red == "right" else (32, 16))
    half = {"top": video.frames[:, : h // 2], "bottom": video.frames[:, h // 2 :], "right": video.frames[:, :, w // 2 :]}
    assert (half[red][..., 0] > 200).all() and (half[red][..., 2] < 50).all()
    assert load_video(rotated, size=(8, 4)).frames.shape == (3, 8, 4, 3)  # resized after turning


def test_video_frames_are_decoded_into_one_array(tmp_path):
    import tracemalloc

    data = save_video(Video(levels_clip(200, 64, 64), fps=25), tmp_path / "a.mp4").read_bytes()
    tracemalloc.start()
    try:
        video = load_video(data, size=(32, 48))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert video.frames.shape == (200, 32, 48, 3) and peak < 1.5 * video.frames.nbytes  # not a list, then a stack


@pytest.mark.parametrize("kwargs, named", [({"num_frames": 10**11}, "num_frames=100000000000"), ({"fps": 1e11}, "fps=1e+11")])
def test_huge_frame_requests_are_refused_before_allocating(tmp_path, kwargs, named):
    path = save_video(Video(levels_clip(4), fps=10), tmp_path / "a.mp4")
    with pytest.raises(MediaError, match=re.escape(f"too many frames: {named}") + ".* over the limit of 4096"):
        load_video(path, **kwargs)
    with pytest.raises(ValueError, match="positive and finite"):
        load_video(path, fps=float("inf"))


def test_transparent_gif_frames_are_white_like_images(tmp_path):
    frames = [PIL.Image.new("RGBA", (8, 8), c) for c in [(255, 0, 0, 0), (255, 0, 0, 255)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, disposal=2)
    video = load_video(tmp_path / "a.gif")
    assert tuple(video.frames[0, 0, 0]) == (255, 255, 255) == tuple(load_image(tmp_path / "a.gif").pixels[0, 0])
    assert tuple(video.frames[1, 0, 0]) == (255, 0, 0)


# ----------------------------------------------------------------------------- load_media


def test_load_media_dispatch(tmp_path):
    image = save_image(Image(gradient()), tmp_path / "a.png")
    audio = save_audio(Audio(sine(440, 16000)[None], 16000), tmp_path / "a.wav")
    video = save_video(Video(levels_clip(4), fps=4), tmp_path / "a.gif")
    assert isinstance(load_media(image, "image", size=8), Image)
    assert load_media(audio.read_bytes(), "audio", sample_rate=8000).sample_rate == 8000
    assert load_media(video, "video", num_frames=2).num_frames == 2


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """A directory of broken, hostile and mismatched files, built once for the bad-input tests."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    png = save_image(Image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), d / "ok.png")
    flac = save_audio(Audio(rng.uniform(-1, 1, (1, 16000)).astype(np.float32), 16000), d / "ok.flac")
    mp4 = save_video(Video(levels_clip(30), fps=10), d / "ok.mp4")
    save_audio(Audio(sine(440, 16000, 2.0)[None], 16000), d / "ok.wav")
    (d / "text.png").write_text("this is not an image")
    PIL.Image.new("RGB", (8, 8)).save(d / "a.tiff")
    (d / "text.wav").write_text("this is not a sound at all")
    (d / "empty.png").touch()
    (d / "adir.png").mkdir()
    (d / "truncated.png").write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    (d / "truncated.flac").write_bytes(flac.read_bytes()[:200])
    (d / "truncated.mp4").write_bytes(mp4.read_bytes()[: len(mp4.read_bytes()) // 2])  # index (moov) is at the end
    (d / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (d / "warnbomb.png").write_bytes(png_header(10_000, 10_000))  # between PIL's warning and error sizes
    (d / "bigger.png").write_bytes(png_header(7_000, 7_000))  # under PIL's own guard, over max_pixels
    sf.write(d / "zero.wav", np.zeros((0, 1), np.float32), 16000)
    sf.write(d / "nan.wav", np.array([0.0, np.nan, 0.0], np.float32), 16000, subtype="FLOAT")
    write_frameless_webm(d / "frameless.webm")
    return d


BAD_INPUTS = [  # (id, file in bad_dir, loader, kwargs, a word of the reason)
    ("missing", "missing.png", load_image, {}, "not found"),
    ("directory", "adir.png", load_image, {}, "directory"),
    ("empty", "empty.png", load_image, {}, "empty"),
    ("truncated-image", "truncated.png", load_image, {}, "truncated"),
    ("text-as-image", "text.png", load_image, {}, "unsupported image format"),
    ("tiff-refused", "a.tiff", load_image, {}, "unsupported image format"),  # a large, CVE-prone decoder
    ("truncated-audio", "truncated.flac", load_audio, {}, "corrupt"),
    ("image-as-audio", "ok.png", load_audio, {}, "no audio stream"),
    ("text-as-audio", "text.wav", load_audio, {}, "unsupported or corrupt audio"),
    ("audio-as-video", "ok.wav", load_video, {}, "no video stream"),
    ("no-frames", "frameless.webm", load_video, {}, "no video frames"),
    ("truncated-video", "truncated.mp4", load_video, {}, "corrupt video"),
    ("too-many-bytes", "ok.png", load_image, {"limits": MediaLimits(max_bytes=100)}, "too large"),
    ("bomb", "bomb.png", load_image, {}, "too many pixels"),
    ("bomb-pil-warning", "warnbomb.png", load_image, {}, "too many pixels"),
    ("bomb-own-check", "bigger.png", load_image, {}, "decompression bomb"),
    ("video-pixels", "ok.mp4", load_video, {"limits": MediaLimits(max_pixels=1000)}, "too many pixels"),
    ("long-audio", "ok.wav", load_audio, {"limits": MediaLimits(max_duration_s=1.0)}, "too long"),
    ("long-video", "ok.mp4", load_video, {"limits": MediaLimits(max_duration_s=1.0)}, "too long"),
    ("many-frames", "ok.mp4", load_video, {"limits": MediaLimits(max_frames=10)}, "too many frames"),
    ("many-picked", "ok.mp4", load_video, {"num_frames": 11, "limits": MediaLimits(max_frames=10)}, "too many frames"),
    ("zero-samples", "zero.wav", load_audio, {}, "no samples"),
    ("nan-samples", "nan.wav", load_audio, {}, "NaN"),
    ("bad-modality", "ok.png", load_media, {"modality": "smell"}, "modality"),
]


@pytest.mark.parametrize("file, load, kwargs, word", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_media_error(bad_dir, file, load, kwargs, word):
    source = bad_dir / file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing (e.g. PIL's DecompressionBombWarning) may leak out either
        with pytest.raises(MediaError) as e:
            load(source, **kwargs)
    assert e.value.source == str(source) and str(e.value).startswith(f"{source}: ")
    assert file in str(e.value) and word in e.value.reason


BAD_BYTES = ["empty", "truncated-image", "text-as-audio", "bomb", "truncated-video", "nan-samples"]


@pytest.mark.parametrize("case", BAD_BYTES)
def test_bad_bytes_raise_media_error(bad_dir, case):
    _, file, load, kwargs, word = next(c for c in BAD_INPUTS if c[0] == case)
    with pytest.raises(MediaError) as e:
        load((bad_dir / file).read_bytes(), **kwargs)
    assert e.value.source == "<bytes>" and str(e.value).startswith("<bytes>: ") and word in e.value.reason


# ----------------------------------------------------------------------------- writers


def test_writers_are_atomic_and_leave_no_temp_files(tmp_path):
    out = tmp_path / "nested" / "dir"
    save_image(Image(gradient()), out / "a.webp")
    save_audio(Audio(sine(440, 16000)[None], 16000), out / "a.ogg")
    save_video(Video(levels_clip(4), fps=4), out / "a.webm")
    save_image(Image(gradient(8, 8)), out / "a.webp")  # overwrite in place
    assert sorted(p.name for p in out.iterdir()) == ["a.ogg", "a.webm", "a.webp"]
    assert load_image(out / "a.webp").pixels.shape == (8, 8, 3)


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = save_image(Image(gradient()), tmp_path / "a.png")
    before = target.read_bytes()

    def half_write_then_die(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk on fire")

    monkeypatch.setattr(PIL.Image.Image, "save", half_write_then_die)
    with pytest.raises(MediaError, match="disk on fire") as e:
        save_image(Image(gradient(8, 8)), target)
    assert e.value.source == str(target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.png"]


@pytest.mark.parametrize(
    "save, medium",
    [
        (save_image, Image(gradient())),
        (save_audio, Audio(sine(1, 8000)[None], 8000)),
        (save_video, Video(levels_clip(2), fps=2)),
    ],
)
def test_writers_refuse_unknown_suffix(tmp_path, save, medium):
    with pytest.raises(MediaError, match="unsupported suffix"):
        save(medium, tmp_path / "a.xyz")
    assert list(tmp_path.iterdir()) == []
