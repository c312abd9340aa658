"""DDIM numerics against diffusers' DDIMScheduler / DDIMInverseScheduler with the spec §0.2 config."""

from __future__ import annotations

import pytest
import torch

from microdreamer.sir.scheduler import (
    add_noise,
    ddim_step,
    ddim_timesteps,
    inverse_step,
    inverse_timesteps,
    inversion_pairs,
    sampling_timesteps,
    scaled_linear_alphas_cumprod,
)

from tolerances import ALPHAS32_RTOL, assert_within, calibrated_bound, printed

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)
SPOT = {0: 0.999150, 1: 0.998296, 51: 0.950524, 101: 0.892981, 201: 0.752143, 301: 0.588819, 401: 0.422882,
        501: 0.274999, 601: 0.159816, 701: 0.081917, 801: 0.036547, 901: 0.014005, 951: 0.008155,
        981: 0.005776, 999: 0.004660}


def _sampler(N: int):
    s = diffusers.DDIMScheduler(**CONFIG)
    s.set_timesteps(N)
    return s


def _inverter(N: int):
    s = diffusers.DDIMInverseScheduler(**CONFIG)
    s.set_timesteps(N)
    return s


def _fake_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for a noise network."""
    return torch.tanh(0.7 * x) + 0.001 * t - 0.4


def test_alphas_cumprod_spot_values():
    a = scaled_linear_alphas_cumprod()
    assert a.dtype == torch.float64 and a.shape == (1000,)
    for t, value in SPOT.items():
        assert float(a[t]) == pytest.approx(value, abs=printed(6))
    ref = diffusers.DDIMScheduler(**CONFIG).alphas_cumprod.double()
    assert torch.allclose(a, ref, rtol=ALPHAS32_RTOL, atol=0)


@pytest.mark.parametrize("N", [10, 20, 50])
def test_timesteps_match_diffusers(N):
    assert ddim_timesteps(N) == _sampler(N).timesteps.tolist()
    assert inverse_timesteps(N) == _inverter(N).timesteps.tolist()


def test_timesteps_known_values():
    assert ddim_timesteps(20)[:3] == [951, 901, 851] and ddim_timesteps(20)[-1] == 1
    assert ddim_timesteps(50)[0] == 981 and ddim_timesteps(10)[0] == 901
    assert inverse_timesteps(20)[:2] == [1, 51]


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sampling_trajectory_matches_diffusers(eta):
    N = 20
    ref = _sampler(N)
    alphas = scaled_linear_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours, theirs, exact = x.clone(), x.clone(), x.double()  # exact: ours in float64, the reference
    for t in ref.timesteps.tolist():
        z = torch.randn(x.shape, generator=g) if eta > 0 else None
        theirs = ref.step(_fake_eps(theirs, t), t, theirs, eta=eta, variance_noise=z).prev_sample
        ours = ddim_step(_fake_eps(ours, t), t, ours, alphas, N, eta, variance_noise=z)
        exact = ddim_step(_fake_eps(exact, t), t, exact, alphas, N, eta, variance_noise=None if z is None else z.double())
        assert ours.dtype == torch.float32
        assert_within(theirs, exact, calibrated_bound(ours, exact), f"step {t}")


def test_last_step_uses_alpha_bar_zero():
    """prev < 0 → ᾱ[0]: from t = 1 with eps = 0 the step rescales by sqrt(ᾱ[0] / ᾱ[1])."""
    alphas = scaled_linear_alphas_cumprod()
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    out = ddim_step(torch.zeros_like(x), 1, x, alphas, 20)
    assert torch.allclose(out, x * (alphas[0] / alphas[1]).sqrt(), atol=1e-12)


def test_eta_noise_from_generator():
    alphas = scaled_linear_alphas_cumprod()
    x = torch.linspace(-1, 1, 32).reshape(1, 2, 4, 4)
    eps = _fake_eps(x, 501)
    a = ddim_step(eps, 501, x, alphas, 20, 0.5, torch.Generator().manual_seed(3))
    b = ddim_step(eps, 501, x, alphas, 20, 0.5, torch.Generator().manual_seed(3))
    c = ddim_step(eps, 501, x, alphas, 20, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the same draw as an explicit variance noise taken from an identically seeded generator
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, ddim_step(eps, 501, x, alphas, 20, 0.5, variance_noise=z))
    with pytest.raises(ValueError, match="Generator"):
        ddim_step(eps, 501, x, alphas, 20, 0.5)


def test_inversion_trajectory_matches_diffusers():
    N = 20
    ref = _inverter(N)
    alphas = scaled_linear_alphas_cumprod()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours, theirs, exact = x.clone(), x.clone(), x.double()  # exact: ours in float64, the reference
    for t in ref.timesteps.tolist():
        theirs = ref.step(_fake_eps(theirs, t), t, theirs).prev_sample
        ours = inverse_step(_fake_eps(ours, t), t, ours, alphas, N)
        exact = inverse_step(_fake_eps(exact, t), t, exact, alphas, N)
        assert_within(theirs, exact, calibrated_bound(ours, exact), f"step {t}")


def test_inverse_step_source_rule():
    """Source step min(t − T//N, T − 1); ᾱ[0] below zero: checked against the closed form."""
    alphas = scaled_linear_alphas_cumprod()
    x = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64)
    eps = torch.full_like(x, -0.2)
    for target, source in [(551, 501), (1, 0)]:
        a_s, a_t = alphas[source], alphas[target]
        expected = a_t.sqrt() * (x - (1 - a_s).sqrt() * eps) / a_s.sqrt() + (1 - a_t).sqrt() * eps
        torch.testing.assert_close(inverse_step(eps, target, x, alphas, 20), expected)


def test_add_noise_matches_diffusers():
    ref = diffusers.DDIMScheduler(**CONFIG)
    alphas = scaled_linear_alphas_cumprod()
    g = torch.Generator().manual_seed(2)
    x0, n = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for t in (1, 301, 999):
        expected = ref.add_noise(x0, n, torch.tensor([t]))
        exact = add_noise(x0.double(), n.double(), t, alphas)
        assert_within(expected, exact, calibrated_bound(add_noise(x0, n, t, alphas), exact), f"t={t}")


def test_step_keeps_half_precision():
    alphas = scaled_linear_alphas_cumprod()
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5)).half()
    out = ddim_step(_fake_eps(x, 901), 901, x, alphas, 20, 0.5, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float16
    assert inverse_step(_fake_eps(x, 51), 51, x, alphas, 20).dtype == torch.float16


def test_path_helpers():
    assert inversion_pairs(501, 901, 20) == [(s - 50, s) for s in range(551, 902, 50)]
    assert inversion_pairs(901, 901, 20) == []
    assert inversion_pairs(0, 101, 20) == [(0, 1), (1, 51), (51, 101)]
    assert sampling_timesteps(901, 20) == list(range(901, 0, -50))
    assert sampling_timesteps(1000, 10) == ddim_timesteps(10)
