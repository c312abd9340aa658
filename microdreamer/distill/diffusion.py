"""The variance-preserving diffusion quantities of Stage I, per batch element (each sample has its own t).

With ᾱ_t from the teacher's table, a clean sample x0 is noised to x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, which is what the
UNet sees (Euler-ancestral's scaled input is the same tensor). A v-prediction network outputs
v = √ᾱ_t·ε − √(1−ᾱ_t)·x0, so x0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v and ε = √(1−ᾱ_t)·x_t + √ᾱ_t·v; an ε-prediction network
outputs ε, so x0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t. ᾱ is taken in float64 and the square roots are applied in the
tensors' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def alphas_at(alphas_cumprod: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
    """ᾱ of each sample's timestep as ``[B,1,1,1]`` in ``like``'s dtype and device (``timesteps`` ``[B]``)."""
    alpha = alphas_cumprod.to(torch.float64)[timesteps.long().cpu()]
    return alpha.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noised(x0: Tensor, noise: Tensor, alpha: Tensor) -> Tensor:
    """x_t = √ᾱ·x0 + √(1−ᾱ)·noise."""
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def predicted_x0(output: Tensor, x_t: Tensor, alpha: Tensor, prediction: str) -> Tensor:
    """The clean sample the network predicts at x_t (v- or ε-prediction, see the module docstring)."""
    if prediction == "v_prediction":
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * output
    return (x_t - (1 - alpha).sqrt() * output) / alpha.sqrt()


def predicted_noise(output: Tensor, x_t: Tensor, alpha: Tensor, prediction: str) -> Tensor:
    """The noise ε the network predicts at x_t (v- or ε-prediction, see the module docstring)."""
    if prediction == "v_prediction":
        return (1 - alpha).sqrt() * x_t + alpha.sqrt() * output
    return output


def timestep_range(t_min: float, t_max: float, steps: int) -> tuple[int, int]:
    """The integer timesteps (inclusive) of the fractions [t_min, t_max] of a ``steps``-step schedule
    (GECO's U[0.02, 0.98] of 1000 steps → 20..980; 1.0 is the last timestep, steps − 1)."""
    return min(round(t_min * steps), steps - 1), min(round(t_max * steps), steps - 1)
