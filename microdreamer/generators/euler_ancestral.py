"""Euler-ancestral sampling over a discrete ᾱ table, matching diffusers' EulerAncestralDiscreteScheduler with
``timestep_spacing="trailing"`` (how the Zero123++ README rebuilds its scheduler, spec §4.2).

The sampler works in the variance-exploding form x = x0 + σ·n with σ_t = sqrt((1 − ᾱ_t) / ᾱ_t); the network
sees x / sqrt(σ² + 1), which is the usual sample sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·n. From σ to the next σ' an
ancestral step moves deterministically along the probability-flow direction to σ_down and then adds fresh
noise of size σ_up, with σ_up = sqrt(σ'² (σ² − σ'²) / σ²) and σ_down² + σ_up² = σ'². Sigmas are computed in
float64 from the table; tensors are updated in float32. Noise comes from an explicit ``torch.Generator``, one
draw per step (also at the last step, where σ_up = 0), so a seeded run draws exactly what diffusers draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..sir.scheduler import randn_like

Prediction = Literal["epsilon", "v_prediction"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction")


def trailing_timesteps(steps: int, T: int = 1000) -> list[int]:
    """The ``trailing`` spacing: T, T − T/N, …, rounded half to even, minus 1 (N=4 → 999, 749, 499, 249).

    The grid is formed as numpy's ``arange`` forms it (first value + i·(second − first)), so halfway cases
    round as in diffusers (N=48: 937.4999… → 936). Deviation: for some N (61, 103, 121, …) diffusers' grid
    gains an (N+1)-th timestep −1 from a float residue; we keep exactly N.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"number of sampling steps must lie in 1..{T}, got {steps}")
    delta = (T - T / steps) - T
    return [round(T + i * delta) - 1 for i in range(steps)]


@dataclass(frozen=True)
class EulerAncestral:
    """The sampling path of one run: descending ``timesteps`` and their ``sigmas`` (one more: the final 0)."""

    timesteps: tuple[int, ...]
    sigmas: tuple[float, ...]
    prediction: Prediction

    @classmethod
    def trailing(cls, alphas_cumprod: Tensor, steps: int, prediction: Prediction) -> "EulerAncestral":
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r} (use {' or '.join(PREDICTIONS)})")
        table = alphas_cumprod.to(torch.float64)
        timesteps = trailing_timesteps(steps, table.shape[0])
        sigmas = [math.sqrt((1.0 - float(table[t])) / float(table[t])) for t in timesteps]
        return cls(tuple(timesteps), (*sigmas, 0.0), prediction)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def init_sigma(self) -> float:
        """Standard deviation of the starting noise: the first (largest) sigma."""
        return self.sigmas[0]

    def scale_input(self, x: Tensor, i: int) -> Tensor:
        """The network input at step ``i``: x / sqrt(σ_i² + 1)."""
        return x / math.sqrt(self.sigmas[i] ** 2 + 1.0)

    def add_noise(self, x0: Tensor, noise: Tensor, i: int) -> Tensor:
        """A clean sample noised to step ``i``: x0 + σ_i·noise (scale it with :meth:`scale_input` for the network)."""
        return x0 + self.sigmas[i] * noise

    def predicted_x0(self, output: Tensor, x: Tensor, i: int) -> Tensor:
        """x0 from the network output at step ``i``: x − σ·ε, or for v-prediction
        x / (σ² + 1) − v·σ / sqrt(σ² + 1) (i.e. sqrt(ᾱ)·z − sqrt(1 − ᾱ)·v with z the network input)."""
        sigma = self.sigmas[i]
        if self.prediction == "epsilon":
            return x - sigma * output
        return x / (sigma**2 + 1.0) - output * (sigma / math.sqrt(sigma**2 + 1.0))

    def step(self, output: Tensor, x: Tensor, i: int, generator: torch.Generator | None) -> Tensor:
        """x at step ``i + 1`` (float32) from x and the network output at step ``i``; draws one noise tensor.

        With ``generator=None`` the step is deterministic: straight to σ_{i+1} along the probability-flow
        direction with no fresh noise (σ_up = 0), which in this parametrisation is exactly DDIM with η = 0
        (x0 + σ'·ε with the ε the network implies); nothing is drawn."""
        x = x.float()
        output = output.float()
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        derivative = (x - self.predicted_x0(output, x, i)) / sigma
        if generator is None:
            return x + derivative * (sigma_next - sigma)
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        noise = randn_like(output, generator)
        return x + derivative * (sigma_down - sigma) + noise * sigma_up
