"""Output heads: each learns a known distribution, follows the one protocol, and saves and loads exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from mllm.config import ConfigError
from mllm.heads import build_head, list_heads, load_head
from mllm.losses import gmm_nll, mixture_mean, mixture_mean_mse

H, D = 8, 2
SMALL = {"gmm": {"width": 32, "num_components": 3}, "diffusion": {"width": 32, "depth": 1, "steps": 8},
         "regression": {"width": 32}}


def head(name: str, **options):
    torch.manual_seed(0)
    return build_head(name, {"hidden_size": H, "feature_dim": D, **SMALL[name], **options})


def train(model, draw, steps: int, lr: float, batch: int) -> None:
    """AdamW on `draw(batch)` -> (hidden, target) with a one-cycle schedule."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for _ in range(steps):
        loss = model.loss(*draw(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def test_list_heads():
    assert list_heads() == ["diffusion", "gmm", "regression"]


def test_gmm_recovers_the_nll_of_a_known_mixture():
    torch.manual_seed(0)
    true = MixtureSameFamily(
        Categorical(torch.tensor([0.5, 0.3, 0.2])),
        Independent(Normal(torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
                           torch.tensor([[0.5, 0.8], [0.7, 0.4], [0.6, 0.6]])), 1),
    )
    cond = torch.ones(1, H)
    model = head("gmm", num_components=4, width=64, depth=1)
    train(model, lambda n: (cond.expand(n, -1), true.sample((n,))), steps=300, lr=1e-2, batch=512)
    held_out = true.sample((8000,))
    true_nll = -true.log_prob(held_out).mean()
    with torch.no_grad():
        nll = model.nll(cond.expand(len(held_out), -1), held_out).mean()
    assert abs(nll - true_nll) / true_nll < 0.05, f"head NLL {nll:.3f} vs true {true_nll:.3f} nats"


@pytest.mark.parametrize("sampler,steps", [("ddim", 300), ("flow", 250)])
def test_diffusion_samples_match_mean_and_covariance(sampler, steps):
    """Tolerance: each mean within 0.1, and ‖Σ̂ − Σ‖_F within 20 % of ‖Σ‖_F, from 4000 samples at 50 steps."""
    mean = torch.tensor([1.0, -2.0])
    chol = torch.tensor([[1.0, 0.0], [0.6, 0.5]])
    cov = chol @ chol.T
    cond = torch.randn(1, H, generator=torch.Generator().manual_seed(2))
    model = head("diffusion", sampler=sampler, width=64, depth=2)
    train(model, lambda n: (cond.expand(n, -1), mean + torch.randn(n, D) @ chol.T), steps=steps, lr=5e-3, batch=128)
    samples = model.sample(cond.expand(4000, -1), steps=50, generator=torch.Generator().manual_seed(1))
    assert (samples.mean(0) - mean).abs().max() < 0.1, samples.mean(0)
    assert torch.linalg.matrix_norm(torch.cov(samples.T) - cov) < 0.2 * torch.linalg.matrix_norm(cov), torch.cov(samples.T)


def test_regression_is_mse_on_its_prediction():
    model = head("regression")
    hidden, target = torch.randn(5, H), torch.randn(5, D)
    prediction = model.sample(hidden)
    assert torch.allclose(model.loss(hidden, target), ((prediction - target) ** 2).mean())
    assert torch.equal(model.sample(hidden, temperature=0.1), prediction)  # the mean has nothing to scale


@pytest.mark.parametrize("name", list_heads())
def test_guided_batches_return_the_sample_for_both_streams(name):
    model = head(name)
    cond, uncond = torch.randn(4, H), torch.randn(4, H)
    out = model.sample(torch.cat([cond, uncond]), cfg=3.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, D) and torch.equal(out[:4], out[4:])
    with pytest.raises(ValueError, match="odd batch"):
        model.sample(torch.randn(3, H), cfg=2.0)


@pytest.mark.parametrize("name,options", [("regression", {}), ("gmm", {"mode": "mean"}), ("gmm", {"mode": "mode"}),
                                          ("diffusion", {"sampler": "ddim", "eta": 1.0}), ("diffusion", {"sampler": "flow"})])
def test_guidance_between_equal_streams_changes_nothing(name, options):
    model = head(name, **options)
    hidden = torch.randn(4, H)
    plain = model.sample(hidden, generator=torch.Generator().manual_seed(0))
    guided = model.sample(torch.cat([hidden, hidden]), cfg=4.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(guided[:4], plain, atol=1e-5)


def test_guidance_extrapolates_the_prediction():
    model = head("regression")
    cond, uncond = torch.randn(3, H), torch.randn(3, H)
    c, u = model.sample(cond), model.sample(uncond)
    assert torch.allclose(model.sample(torch.cat([cond, uncond]), cfg=2.5)[:3], u + 2.5 * (c - u), atol=1e-6)


def test_gmm_density_guidance_picks_the_guided_mode():
    model = head("gmm", mode="mode")
    cond, uncond = torch.randn(5, H), torch.randn(5, H)
    out = model.sample(torch.cat([cond, uncond]), cfg=3.0)[:5]
    c, u = model.mixture(cond), model.mixture(uncond)
    means = c[1].transpose(0, 1)  # [k, M, D]
    score = 3.0 * -gmm_nll(*c, means) - 2.0 * -gmm_nll(*u, means)
    assert torch.equal(out, means[score.argmax(0), torch.arange(5)])


def test_gmm_modes():
    model = head("gmm")
    hidden = torch.randn(6, H)
    logits, means, _ = model.mixture(hidden)
    weighted = (logits.softmax(-1)[..., None] * means).sum(1)
    assert torch.allclose(model.sample(hidden, mode="mean"), weighted, atol=1e-6)
    mode = model.sample(hidden, mode="mode")
    assert ((means - mode[:, None]).abs().sum(-1) == 0).any(-1).all(), "the mode is one of the component means"


def test_gmm_temperature_and_variance_scale_shrink_sigma():
    model = head("gmm", num_components=1)
    hidden = torch.randn(1, H).expand(20000, -1)
    _, means, stds = model.mixture(hidden[:1])

    def spread(**kwargs) -> torch.Tensor:
        draws = model.sample(hidden, generator=torch.Generator().manual_seed(0), **kwargs)
        return (draws - means[0, 0]).std(0) / stds[0, 0]  # [D], 1 at temperature 1

    assert torch.allclose(spread(), torch.ones(D), atol=0.03)
    assert torch.allclose(spread(temperature=0.5), torch.full((D,), 0.5), atol=0.02)
    scaled = head("gmm", num_components=1, variance_scale=0.25)
    draws = scaled.sample(hidden, generator=torch.Generator().manual_seed(0))
    assert torch.allclose((draws - means[0, 0]).std(0) / stds[0, 0], torch.full((D,), 0.5), atol=0.02)


def test_gmm_nll_stays_finite_far_from_every_component():
    model = head("gmm")
    model.train()
    hidden = torch.randn(4, H)
    loss = model.loss(hidden, torch.full((4, D), 1e4))
    loss.backward()
    assert torch.isfinite(loss) and loss > 1e3
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert math.isclose(model.loss(hidden, torch.zeros(4, D)).item() * D, model.nll(hidden, torch.zeros(4, D)).mean().item(), rel_tol=1e-5)


def test_gmm_mean_weight_adds_the_error_of_the_mean_it_is_read_out_by():
    hidden, target = torch.randn(6, H), torch.randn(6, D)
    plain, weighted = head("gmm"), head("gmm", mean_weight=0.5)
    weighted.load_state_dict(plain.state_dict())
    logits, means, stds = plain.mixture(hidden)
    expected = gmm_nll(logits, means, stds, target).mean() / D + 0.5 * (mixture_mean(logits, means) - target).pow(2).mean()
    assert math.isclose(weighted.loss(hidden, target).item(), expected.item(), rel_tol=1e-5)
    assert not math.isclose(plain.loss(hidden, target).item(), expected.item(), rel_tol=1e-3)

    # Two equal components at ±1: the NLL of 0 is poor, yet the mean (what `mode: mean` writes) is exactly 0.
    logits, means = torch.zeros(1, 2), torch.tensor([[[1.0] * D, [-1.0] * D]])
    assert mixture_mean_mse(logits, means, torch.zeros(1, D)).item() == 0.0
    assert mixture_mean_mse(logits, means, torch.ones(1, D)).item() == 1.0
    with pytest.raises(ValueError, match="mean_weight"):
        head("gmm", mean_weight=-1.0)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("flow", 1.0)])
def test_diffusion_sampling_steps_and_temperature(sampler, eta):
    model = head("diffusion", sampler=sampler, eta=eta)
    train(model, lambda n: (torch.randn(n, H), torch.randn(n, D)), steps=3, lr=1e-2, batch=8)  # leave the zero init
    hidden = torch.randn(3, H)

    def draw(temperature: float = 1.0, steps: int = 5) -> torch.Tensor:
        return model.sample(hidden, temperature, generator=torch.Generator().manual_seed(0), steps=steps)

    assert torch.equal(draw(), draw())
    assert not torch.equal(draw(), draw(steps=7))
    # Temperature scales DDIM's per-step noise (none at eta 0) and the flow's starting noise.
    assert torch.equal(draw(), draw(0.5)) == (sampler == "ddim" and eta == 0.0)
    if sampler == "ddim":
        with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
            draw(steps=2000)


def test_per_call_sampling_options_are_checked():
    """A misspelt mode or a step count below 1 is an error, not a silent default or a sample of pure noise."""
    hidden = torch.randn(2, H)
    with pytest.raises(ValueError, match=r"mode must be one of \['sample', 'mean', 'mode'\], got 'Mean'"):
        head("gmm").sample(hidden, mode="Mean")
    for steps in (0, -1):  # 0 is no request for the config's default
        with pytest.raises(ValueError, match=rf"steps must be in \[1, 1000\], got {steps}"):
            head("diffusion", sampler="ddim").sample(hidden, steps=steps)
        with pytest.raises(ValueError, match=rf"steps must be >= 1, got {steps}"):
            head("diffusion", sampler="flow").sample(hidden, steps=steps)
    for sampler in ("ddim", "flow"):  # 2.5 passed the range checks, then failed indexing the schedule
        with pytest.raises(ValueError, match=r"steps must be a whole number, got 2\.5"):
            head("diffusion", sampler=sampler).sample(hidden, steps=2.5)


@pytest.mark.parametrize("name", ["gmm", "diffusion"])
def test_a_temperature_must_be_finite_and_not_negative(name):
    """NaN passed the `< 0` checks (a NaN sample, refused later as NaN features) and a GMM head read a
    negative call temperature as 0: its σ, scaled below zero, was clamped up to the floor."""
    hidden = torch.randn(2, H)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"temperature must be a finite number >= 0, got {bad}"):
            head(name).sample(hidden, bad)
        with pytest.raises(ConfigError, match="temperature"):
            head(name, temperature=bad)
    for key in ("min_variance", "variance_scale") if name == "gmm" else ():
        with pytest.raises(ConfigError, match="min_variance and variance_scale positive, all finite, got 2, 1.0, "):
            head("gmm", **{key: float("nan")})


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("flow", 1.0)])
def test_a_bf16_diffusion_head_runs_its_process_in_fp32(sampler, eta):
    """bf16 rounds ᾱ(0) = 0.99996 to 1: DDIM's last step was 0/0, and t near 0 had nothing to learn."""
    model = head("diffusion", sampler=sampler, eta=eta)
    train(model, lambda n: (torch.randn(n, H), torch.randn(n, D)), steps=3, lr=1e-2, batch=8)
    hidden = torch.randn(3, H)
    full = model.sample(hidden, generator=torch.Generator().manual_seed(0), steps=10)
    model.to(torch.bfloat16)
    half = model.sample(hidden.bfloat16(), generator=torch.Generator().manual_seed(0), steps=10)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert torch.allclose(half.float(), full, atol=0.1, rtol=0.05)  # the same draw, through a bf16 net
    assert torch.isfinite(model.loss(hidden.bfloat16(), torch.randn(3, D)))


@pytest.mark.parametrize("name,options", [("gmm", {"temperature": 0.3}), ("gmm", {"temperature": 0.3, "mode": "mean"}),
                                          ("diffusion", {"temperature": 0.2, "sampler": "flow"})])
def test_the_saved_readout_is_the_default(name, options, tmp_path):
    """A head samples with its config's temperature (and mode) unless the call names one, also after loading."""
    model = head(name, **options)
    train(model, lambda n: (torch.randn(n, H), torch.randn(n, D)), steps=3, lr=1e-2, batch=8)
    loaded = load_head(model.save_pretrained(tmp_path / name))
    hidden = torch.randn(4, H)

    def draw(module, temperature=None):
        return module.sample(hidden, temperature, generator=torch.Generator().manual_seed(0))

    assert torch.equal(draw(loaded), draw(model, options["temperature"]))
    assert torch.equal(draw(model), draw(model, 1.0)) == (options.get("mode") == "mean")  # the mean has no noise
    with pytest.raises(ConfigError, match="temperature"):
        build_head(name, {"hidden_size": H, "feature_dim": D, "temperature": -1.0})


@pytest.mark.parametrize("name", list_heads())
def test_save_load_round_trip(name, tmp_path):
    model = head(name)
    model.save_pretrained(tmp_path / name)
    loaded = load_head(tmp_path / name)
    assert type(loaded) is type(model) and loaded.config == model.config
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    hidden = torch.randn(4, H)
    samples = [m.sample(hidden, generator=torch.Generator().manual_seed(3)) for m in (model, loaded)]
    assert torch.equal(samples[0], samples[1])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="num_components"):
        build_head("gmm", {"hidden_size": H, "feature_dim": D, "num_components": "many"})
    with pytest.raises(ConfigError, match="sampler"):
        build_head("diffusion", {"hidden_size": H, "feature_dim": D, "sampler": "euler"})
    with pytest.raises(ConfigError, match="required key is missing"):
        build_head("regression", {"hidden_size": H})
