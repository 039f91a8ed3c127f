"""Audio tokenizers and de-tokenizers: token rates, shapes, round trips, HF codec adapters, bad input, recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mllm.config import ConfigError, from_dict
from mllm.detokenizers import load_detokenizer
from mllm.detokenizers.audio_codec import CodecDecoder
from mllm.detokenizers.diffusion_mel import MelDiffusionConfig, MelDiffusionDecoder
from mllm.detokenizers.hf_codec import HFCodecDecoder
from mllm.judges.spoken_digits import DIGIT_WORDS, JudgeConfig, SpokenDigitJudge
from mllm.errors import InputError
from mllm.media import Audio, MediaError, save_audio
from mllm.tokenize import commands
from mllm.tokenize.audio_recipes import AudioData, AudioMelDiffusionRecipe, CodecLoss, load_train_clips
from mllm.tokenizers import load_media_tokenizer
from mllm.tokenizers.audio_codec import CodecConfig, CodecTokenizer
from mllm.tokenizers.hf_codec import HFCodecConfig, HFCodecTokenizer
from mllm.tokenizers.mel_latent import MelLatentConfig, MelLatentTokenizer

RATES = [8000, 16000, 22050, 44100, 48000]
ROOT = Path(__file__).resolve().parents[1]


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, channels: int = 1, level: float = 0.5) -> Audio:
    t = np.arange(round(seconds * rate)) / rate
    wave = level * np.sin(2 * np.pi * freq * t)
    gains = 1 + np.arange(channels) - (channels - 1) / 2  # stereo: 0.5 and 1.5, whose mean is the mono tone
    return Audio((gains[:, None] * wave).astype(np.float32), rate)


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    cfg = CodecConfig(levels=[8, 5, 5, 5], encoder_channels=16, encoder_depth=1, decoder_channels=16, decoder_depth=1)
    return CodecTokenizer(cfg).eval(), CodecDecoder(cfg).eval()


@pytest.fixture(scope="module")
def mel_pair():
    torch.manual_seed(0)
    cfg = MelDiffusionConfig(latents=MelLatentConfig(channels=16, depth=1), channels=[16, 16], cond_channels=8,
                             steps=2, griffin_lim_iters=2)
    return MelLatentTokenizer(cfg.latents).eval(), MelDiffusionDecoder(cfg).eval()


# ---------------------------------------------------------------- rates and shapes


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("seconds", [0.01, 0.5, 1.013])
def test_codec_token_rate_and_shapes(codec, rate, seconds):
    tokenizer, decoder = codec
    audio = tone(seconds, rate, channels=2)
    codes = tokenizer.encode(audio)
    assert tokenizer.config.token_rate == 50
    assert codes.dtype == torch.long and codes.ndim == 1
    assert len(codes) == tokenizer.num_tokens(audio) == max(1, math.ceil(seconds * 50 - 1e-9))
    assert 0 <= int(codes.min()) and int(codes.max()) < tokenizer.codebook_size == 1000
    out = decoder.decode(codes)
    assert out.sample_rate == 16000 and out.samples.shape == (1, len(codes) * 320)


@pytest.mark.parametrize("rate", RATES)
def test_mel_latent_rate_and_shapes(mel_pair, rate):
    tokenizer, decoder = mel_pair
    audio = tone(0.61, rate, channels=2)
    latents = tokenizer.encode(audio)
    assert tokenizer.config.token_rate == 25 and tokenizer.spec.feature_dim == 16
    assert latents.shape == (tokenizer.num_tokens(audio), 16) == (math.ceil(0.61 * 25), 16)
    out = decoder.decode(latents, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.sample_rate == 16000 and out.samples.shape == (1, len(latents) * 640)


def test_resampling_matches_native_rate(codec):
    """The same tone at 44.1 kHz stereo and at 16 kHz mono gives (nearly) the same codes."""
    tokenizer, _ = codec
    native = tokenizer.encode(tone(0.5, 16000))
    resampled = tokenizer.encode(tone(0.5, 44100, channels=2))
    assert len(native) == len(resampled)
    assert (native == resampled).float().mean() > 0.8


# ---------------------------------------------------------------- round trips and determinism


def test_codec_save_load_round_trip(codec, tmp_path):
    tokenizer, decoder = codec
    tokenizer.save_pretrained(tmp_path / "media_tokenizer")
    decoder.save_pretrained(tmp_path / "detokenizer")
    audio = tone(0.3, 22050)
    codes = tokenizer.encode(audio)
    assert torch.equal(load_media_tokenizer(tmp_path / "media_tokenizer").encode(audio), codes)
    again = load_detokenizer(tmp_path / "detokenizer").decode(codes)
    np.testing.assert_array_equal(again.samples, decoder.decode(codes).samples)


def test_mel_diffusion_save_load_and_seeded_decode(mel_pair, tmp_path):
    tokenizer, decoder = mel_pair
    decoder.null_latent.copy_(torch.randn(16))
    tokenizer.save_pretrained(tmp_path / "media_tokenizer")
    decoder.save_pretrained(tmp_path / "detokenizer")
    latents = tokenizer.encode(tone(0.3))
    assert torch.equal(load_media_tokenizer(tmp_path / "media_tokenizer").encode(tone(0.3)), latents)
    loaded = load_detokenizer(tmp_path / "detokenizer")
    assert torch.equal(loaded.null_latent, decoder.null_latent)

    def render(module, seed, guidance=1.0):
        return module.decode(latents, guidance=guidance, steps=2, generator=torch.Generator().manual_seed(seed)).samples

    np.testing.assert_array_equal(render(loaded, 3), render(decoder, 3))
    np.testing.assert_array_equal(render(decoder, 3, guidance=2.0), render(decoder, 3, guidance=2.0))
    decoder.config.guidance = 2.0  # the saved default, used when decode is given none
    np.testing.assert_array_equal(render(load_detokenizer(decoder.save_pretrained(tmp_path / "guided")), 3, guidance=None),
                                  render(decoder, 3, guidance=2.0))
    assert not np.array_equal(render(decoder, 3), render(decoder, 4))


# ---------------------------------------------------------------- bad and odd input


def test_bad_audio_raises_media_error(codec, mel_pair):
    with pytest.raises(MediaError, match="NaN"):
        Audio(np.array([[0.0, np.nan]], np.float32), 16000)
    with pytest.raises(MediaError, match="no samples"):
        Audio(np.zeros((1, 0), np.float32), 16000)
    edited = tone(0.1)
    edited.samples[0, 3] = np.nan  # edited after construction
    for tokenizer in (codec[0], mel_pair[0]):
        with pytest.raises(MediaError, match="NaN"):
            tokenizer.encode(edited)
        with pytest.raises(MediaError, match="expected an Audio"):
            tokenizer.encode(np.zeros(100, np.float32))


def test_silence_clipping_and_one_sample(codec, mel_pair):
    tokenizer, decoder = codec
    silence = Audio(np.zeros((1, 8000), np.float32), 16000)
    assert len(tokenizer.encode(silence)) == 25 and np.isfinite(decoder.decode(tokenizer.encode(silence)).samples).all()
    assert mel_pair[0].encode(silence).isfinite().all()
    loud = Audio(np.clip(tone(0.2).samples * 4, -3, 3), 16000)  # clipping input is clipped to [-1, 1]
    clipped = Audio(np.clip(loud.samples, -1, 1), 16000)
    assert torch.equal(tokenizer.encode(loud), tokenizer.encode(clipped))
    one = Audio(np.full((1, 1), 0.1, np.float32), 48000)
    assert tokenizer.num_tokens(one) == len(tokenizer.encode(one)) == 1


@pytest.mark.parametrize("bad", [{"n_mels": 0}, {"floor": 0.0}, {"norm_std": 0.0}])
def test_mel_config_refuses_settings_that_break_the_log_mel(bad):
    with pytest.raises(ConfigError, match="need n_mels >= 1, floor > 0 and norm_std > 0"):
        from_dict(MelLatentConfig, {"mel": bad}, source="tokenizer.yaml")


@pytest.mark.parametrize("bad, match", [
    ({"channels": [12, 16]}, r"multiples of 8, got \[12, 16\]"), ({"cond_channels": 0}, "cond_channels >= 1"),
    ({"train_timesteps": 1}, "train_timesteps >= 2"), ({"griffin_lim_iters": -1}, "griffin_lim_iters >= 0"),
    ({"p_uncond": 1.0}, r"p_uncond < 1.*got \[96, 128, 192\], 1.0"),
])
def test_mel_diffusion_config_refuses_what_the_unet_cannot_build(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(MelDiffusionConfig, bad, source="detokenizer.yaml")


def test_mel_latent_config_says_which_value_is_wrong():
    with pytest.raises(ConfigError, match="must be >= 1 and depth >= 0, got 4, 0, 192, 3"):
        from_dict(MelLatentConfig, {"latent_dim": 0}, source="tokenizer.yaml")


def test_bad_tokens_raise_value_errors(codec, mel_pair):
    decoder = codec[1]
    for bad, match in [(torch.zeros(2, 3, dtype=torch.long), r"\(2, 3\)"), (torch.zeros(4), r"\(4,\)"),
                       (torch.zeros(0, dtype=torch.long), r"\(0,\)"), (torch.tensor([0, 1000]), r"\[0, 1000\)")]:
        with pytest.raises(ValueError, match=match):
            decoder.decode(bad)
    with pytest.raises(ValueError, match=r"\[N, 16\].*\(5, 8\)"):
        mel_pair[1].decode(torch.zeros(5, 8))
    with pytest.raises(ValueError, match="NaN"):
        mel_pair[1].decode(torch.full((5, 16), float("nan")))
    for steps in (0, -1):  # 0 is no default: it was taken for "not given"
        with pytest.raises(ValueError, match=f"steps must be >= 1, got {steps}"):
            mel_pair[1].decode(torch.zeros(5, 16), steps=steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoders_on_a_gpu_read_tokens_from_any_device(codec, mel_pair):
    codec_decoder, mel_decoder = codec[1], mel_pair[1]
    codes, latents = torch.tensor([3, 999, 0]), torch.randn(5, 16)
    want = [codec_decoder.decode(codes), mel_decoder.decode(latents, generator=torch.Generator().manual_seed(0))]
    try:
        codec_decoder.cuda(), mel_decoder.cuda()
        got = [codec_decoder.decode(codes),  # generation hands discrete codes over on the CPU
               mel_decoder.decode(latents.cuda(), generator=torch.Generator().manual_seed(0))]  # features on the GPU
    finally:
        codec_decoder.cpu(), mel_decoder.cpu()
    for w, g in zip(want, got):
        assert g.sample_rate == w.sample_rate and g.samples.shape == w.samples.shape and np.isfinite(g.samples).all()


# ---------------------------------------------------------------- pretrained codecs (tiny random configs)


def tiny_codec(kind: str):
    from transformers import DacConfig, DacModel, EncodecConfig, EncodecModel, MimiConfig, MimiModel

    torch.manual_seed(0)
    if kind == "encodec":
        return EncodecModel(EncodecConfig(hidden_size=16, num_filters=4, upsampling_ratios=[4, 4], num_lstm_layers=1,
                                          codebook_size=64, target_bandwidths=[3.0, 12.0], sampling_rate=8000)), 16, 4
    if kind == "dac":
        return DacModel(DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 4], decoder_hidden_size=16,
                                  n_codebooks=3, codebook_size=32, codebook_dim=4, sampling_rate=16000)), 8, 3
    return MimiModel(MimiConfig(hidden_size=16, num_filters=4, upsampling_ratios=[4, 4], codebook_size=32, codebook_dim=8,
                                num_quantizers=4, vector_quantization_hidden_dimension=8, num_semantic_quantizers=1,
                                upsample_groups=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8, sampling_rate=8000)), 32, 4


@pytest.mark.parametrize("kind", ["encodec", "dac", "mimi"])
def test_hf_codec_adapters(kind, tmp_path):
    model, hop, available = tiny_codec(kind)
    model.save_pretrained(tmp_path / kind)
    rate = model.config.sampling_rate
    audio = tone(0.1013, 44100, channels=2)
    for q in (1, 2):
        cfg = HFCodecConfig(path=str(tmp_path / kind), codebooks=q)
        tokenizer, decoder = HFCodecTokenizer(cfg), HFCodecDecoder(cfg)
        tokens = tokenizer.encode(audio)
        frames = math.ceil(math.ceil(audio.num_samples * rate / 44100) / hop)
        assert tokens.dtype == torch.long and tokens.shape == (tokenizer.num_tokens(audio),) == (q * frames,)
        assert tokenizer.codebook_size == q * model.config.codebook_size
        assert ((tokens // model.config.codebook_size) == torch.arange(q).repeat(frames)).all()  # frame-major
        out = decoder.decode(tokens)
        assert out.sample_rate == rate and out.samples.shape == (1, frames * hop)
        tokenizer.save_pretrained(tmp_path / f"saved{q}")
        assert not (tmp_path / f"saved{q}" / "model.safetensors").exists()  # the weights stay in the codec's directory
        assert torch.equal(load_media_tokenizer(tmp_path / f"saved{q}").encode(audio), tokens)
    with pytest.raises(ValueError, match="belongs to codebook 1, expected codebook 0"):
        decoder.decode(tokens.flip(0))  # two codebooks per frame, in the wrong order
    with pytest.raises(ValueError, match="whole frames"):
        decoder.decode(tokens[:-1])
    if torch.cuda.is_available():  # generation hands discrete codes over on the CPU
        assert decoder.cuda().decode(tokens).samples.shape == out.samples.shape
    with pytest.raises(InputError, match=f"^codebooks: .*the codec has {available}"):
        HFCodecTokenizer(HFCodecConfig(path=str(tmp_path / kind), codebooks=available + 1))


def test_hf_codec_refuses_a_missing_directory_and_other_models(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(FileNotFoundError, match="no such codec directory"):
        HFCodecTokenizer(HFCodecConfig(path=str(tmp_path / "nothing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        HFCodecTokenizer(HFCodecConfig(path=str(tmp_path / "empty")))
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(InputError, match="^path: .*gpt2: a 'gpt2' model, not one of the codecs"):  # one line in the CLI
        HFCodecTokenizer(HFCodecConfig(path=str(tmp_path / "gpt2")))


# ---------------------------------------------------------------- judge and recipes on a synthetic corpus


def write_corpus(root, seconds: float = 0.3) -> None:
    """speech/{train,test}.jsonl with one 'spoken digit' per digit (a tone per digit) and sounds with a noise burst."""
    for corpus in ("speech", "sounds"):
        for split in ("train", "validation", "test"):
            lines = []
            for d in range(10 if corpus == "speech" else 1):
                rel = f"media/{split}/{d:02d}.wav"
                clip = tone(seconds, freq=300 + 150 * d) if corpus == "speech" else Audio(
                    np.random.default_rng(d).uniform(-0.3, 0.3, (1, 4000)).astype(np.float32), 16000)
                save_audio(clip, root / corpus / rel)
                part = {"type": "audio", "path": rel}
                lines.append(json.dumps({"task": "asr", "meta": {"transcript": DIGIT_WORDS[d]},
                                         "messages": [{"role": "user", "content": [part]}]}))
            (root / corpus / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_judge_trains_once_and_is_cached(tmp_path):
    write_corpus(tmp_path / "corpora")
    cfg = JudgeConfig(epochs=2, batch_size=10)
    judge = SpokenDigitJudge.load_or_train(tmp_path / "corpora", cfg, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("spoken_digits-")
    again = SpokenDigitJudge.load_or_train(tmp_path / "corpora", cfg, cache_dir=tmp_path / "cache")
    clips = [tone(0.3, rate, freq=300 + 150 * d) for d, rate in zip(range(10), RATES * 2)]
    assert judge.predict(clips) == again.predict(clips) and all(0 <= d < 10 for d in judge.predict(clips))
    save_audio(tone(0.3, freq=1234), tmp_path / "corpora" / "speech" / "media" / "train" / "00.wav")  # new data
    SpokenDigitJudge.load_or_train(tmp_path / "corpora", cfg, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_judge_accuracy_needs_one_digit_per_clip():
    judge = SpokenDigitJudge(JudgeConfig()).eval()
    clips = [tone(0.3, freq=300 + 150 * d) for d in range(3)]
    with pytest.raises(ValueError, match="1 for 3 clips"):
        judge.accuracy(clips, [judge.predict(clips)[0]])  # one digit is not broadcast over the three clips
    assert math.isnan(judge.accuracy([], []))


def test_judge_killed_while_caching_leaves_no_half_judge(tmp_path, monkeypatch):
    import mllm.module

    write_corpus(tmp_path / "corpora")
    cfg = JudgeConfig(epochs=1, batch_size=10)

    def dies_mid_write(tensors, path):
        Path(path).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(mllm.module, "save_file", dies_mid_write)
        with pytest.raises(KeyboardInterrupt):
            SpokenDigitJudge.load_or_train(tmp_path / "corpora", cfg, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # neither the half-written judge nor its temporary directory
    judge = SpokenDigitJudge.load_or_train(tmp_path / "corpora", cfg, cache_dir=tmp_path / "cache")  # trained again
    assert len(judge.predict([tone(0.3)])) == 1


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpora")
    write_corpus(root)
    return root


@pytest.mark.parametrize("recipe, overrides", [
    ("audio_codec_tiny.yaml", ["model.encoder_channels=16", "model.encoder_depth=1", "model.decoder_channels=16",
                               "model.decoder_depth=1", "optim.steps=2", "optim.batch_size=2", "data.crop_seconds=0.2"]),
    ("audio_mel_diffusion_tiny.yaml", ["model.latents.channels=16", "model.latents.depth=1", "model.channels=[16, 16]",
                                       "model.cond_channels=8", "model.steps=2", "model.griffin_lim_iters=2",
                                       "autoencoder.steps=2", "diffusion.steps=2", "autoencoder.batch_size=2",
                                       "diffusion.batch_size=2", "data.crop_seconds=0.2", "transcripts=0.5",
                                       "transcript_batch=2"]),
])
def test_recipe_train_eval_encode_decode(recipe, overrides, corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_CACHE", str(corpora.parent / "cache"))  # one judge for both recipes
    out = tmp_path / "run"
    metrics = commands.train(ROOT / "tokenizers" / recipe, corpora, out, overrides)
    assert metrics["train_seconds"] > 0 and (out / "loss.png").is_file()
    assert ("final_autoencoder_ctc" in metrics) == ("mel" in recipe)  # the mel recipe reads the transcripts
    report = commands.evaluate(out, corpora, out / "report", limit=2)
    assert "mel" not in recipe or 0 <= report["transcript_probe_cer"]
    assert set(report) >= {"judge_accuracy_original", "judge_accuracy_reconstruction", "mel_distance_db",
                           "tokens_per_second"}
    assert (out / "report" / "spectrograms.png").is_file()
    written = sorted(p.name for p in (out / "report").glob("*.wav"))
    assert written[:2] == ["00_digit_original.wav", "00_digit_reconstruction.wav"]
    wavs = [corpora / "speech" / "media" / "test" / "03.wav"]
    tokens = commands.encode(out / "media_tokenizer", wavs, tmp_path / "tokens.safetensors")
    written = commands.decode(out / "detokenizer", tokens, tmp_path / "decoded", guidance=1.5, steps=2, seed=0)
    assert [p.name for p in written] == ["03.wav"]


@pytest.mark.parametrize("max_clips", [0, -1])
def test_audio_data_refuses_a_cap_below_one_clip(max_clips):
    with pytest.raises(ValueError, match=f"max_clips must be >= 1.*got {max_clips}"):
        AudioData(max_clips=max_clips)


@pytest.mark.parametrize("bad, match", [
    ({"stft_resolutions": []}, "one or more"), ({"stft_resolutions": [[256, 512]]}, "hop <= n_fft"),
    ({"floor": 0.0}, "floor > 0"), ({"mel_weight": -1.0}, "mel_weight >= 0"),
])
def test_codec_loss_refuses_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(CodecLoss, bad, source="recipe.yaml")


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, "steps >= 1"), ({"guidance": -1.0}, "guidance >= 0"), ({"kl_weight": -0.1}, "kl_weight must be >= 0"),
])
def test_mel_diffusion_recipe_refuses_bad_settings_before_training(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(AudioMelDiffusionRecipe, bad, source="recipe.yaml")


def test_no_train_audio_is_named(tmp_path):
    for corpus in ("speech", "sounds"):
        (tmp_path / corpus).mkdir()
        (tmp_path / corpus / "train.jsonl").write_text("")
    with pytest.raises(InputError, match="train splits of speech, sounds name no audio files"):
        load_train_clips(tmp_path, AudioData(), 16000)


def test_codec_decode_command_rejects_bad_tokens(codec, tmp_path):
    codec[1].save_pretrained(tmp_path / "detokenizer")
    save_file({"x.wav": torch.tensor([5, 2000])}, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        commands.decode(tmp_path / "detokenizer", tmp_path / "t.safetensors", tmp_path / "out", 1.0, None, 0)
