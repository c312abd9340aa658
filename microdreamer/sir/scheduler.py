"""DDIM numerics over an ᾱ table, matching diffusers' DDIMScheduler / DDIMInverseScheduler (spec §0.2).

The reference configuration is assumed throughout: ``leading`` timestep spacing with ``steps_offset`` 1,
``set_alpha_to_one`` false (a step that lands below t = 0 uses ᾱ[0]), no clipping, epsilon prediction.
Step coefficients are computed from the table as Python (float64) scalars and applied to tensors in
their own dtype; noise is drawn from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

STEPS_OFFSET = 1


def scaled_linear_alphas_cumprod(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """ᾱ_t for t = 0..T-1 (float64) of the ``scaled_linear`` betas: linear in sqrt(beta), then squared."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def step_ratio(N: int, T: int = 1000) -> int:
    """Distance between consecutive DDIM timesteps for N steps (``T // N``)."""
    if not 1 <= N <= T:
        raise ValueError(f"number of DDIM steps must lie in 1..{T}, got {N}")
    return T // N


def ddim_timesteps(N: int, T: int = 1000) -> list[int]:
    """The N sampling timesteps, descending (N=20 → 951, 901, …, 1)."""
    ratio = step_ratio(N, T)
    return [i * ratio + STEPS_OFFSET for i in reversed(range(N))]


def inverse_timesteps(N: int, T: int = 1000) -> list[int]:
    """The N inversion timesteps, ascending (N=20 → 1, 51, …, 951)."""
    return ddim_timesteps(N, T)[::-1]


def _alpha(alphas_cumprod: Tensor, t: int) -> float:
    """ᾱ_t as a float64 scalar; timesteps below 0 use ᾱ[0] (``set_alpha_to_one`` false)."""
    return float(alphas_cumprod[max(int(t), 0)])


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x`` (its dtype and device), drawn on the generator's device."""
    if generator is None:
        raise ValueError("drawing noise needs an explicit torch.Generator")
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def add_noise(x0: Tensor, noise: Tensor, t: int, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion to timestep t: sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) noise."""
    a = _alpha(alphas_cumprod, t)
    return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise


def ddim_step(
    eps: Tensor,
    t: int,
    x: Tensor,
    alphas_cumprod: Tensor,
    N: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    variance_noise: Tensor | None = None,
) -> Tensor:
    """One DDIM sampling step from t to t − T//N (DDIM paper eq. 12, σ_t = eta · sqrt(variance)).

    With ``eta > 0`` the fresh Gaussian comes from ``variance_noise`` when given, else from ``generator``.
    """
    T = alphas_cumprod.shape[0]
    a_t = _alpha(alphas_cumprod, t)
    a_prev = _alpha(alphas_cumprod, t - step_ratio(N, T))
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - sigma**2) * eps
    if eta > 0:
        z = variance_noise if variance_noise is not None else randn_like(x, generator)
        x_prev = x_prev + sigma * z
    return x_prev


def inverse_step(eps: Tensor, t_target: int, x: Tensor, alphas_cumprod: Tensor, N: int) -> Tensor:
    """One deterministic DDIM inversion step up to ``t_target`` from its source step t_target − T//N.

    The source is capped at T − 1 and uses ᾱ[0] below 0, as diffusers' DDIMInverseScheduler does.
    """
    T = alphas_cumprod.shape[0]
    source = min(t_target - step_ratio(N, T), T - 1)
    a_s = _alpha(alphas_cumprod, source)
    a_target = _alpha(alphas_cumprod, t_target)
    x0 = (x - math.sqrt(1.0 - a_s) * eps) / math.sqrt(a_s)
    return math.sqrt(a_target) * x0 + math.sqrt(1.0 - a_target) * eps


def inversion_pairs(t1: int, t2: int, N: int, T: int = 1000) -> list[tuple[int, int]]:
    """(source, target) steps of the DDIM inversion from t1 up to t2: every grid target in (t1, t2].

    The noise prediction of a pair is taken at its source (the previous grid point, 0 before the first).
    """
    ratio = step_ratio(N, T)
    return [(max(s - ratio, 0), s) for s in inverse_timesteps(N, T) if t1 < s <= t2]


def sampling_timesteps(t2: int, N: int, T: int = 1000) -> list[int]:
    """The DDIM timesteps at or below t2, descending: the sampling path t2 → 0."""
    return [t for t in ddim_timesteps(N, T) if t <= t2]
