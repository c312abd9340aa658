"""GECO's one-step multi-view generator G(θ; z, y) (GECO §3, spec geco.md §2.1).

Zero123++ v1.1's UNet, initialised from the published weights, turned from a v-prediction denoiser into an
x0-prediction generator by evaluating it once, at a fixed timestep t* (default 999, the first step of the
teacher's own sampler), on the noise z:

- input: x* = √(1−ᾱ_t*)·z with z ~ N(0, I), the sample the teacher's one-step Euler-ancestral sampler feeds
  its UNet (the VP sample of a zero image at t*);
- output: x0 = √ᾱ_t*·x* − √(1−ᾱ_t*)·v (:func:`~microdreamer.distill.diffusion.predicted_x0`), in the model's
  latent space (a 3 × 2 grid of six views);
- local conditioning: GECO uses the self-attention tokens of the *clean* condition image instead of a
  noised one: the write pass sees the condition latent noise-free, as the VP sample at t = 0 (√ᾱ_0·latent);
- guidance: with scale s ≠ 1 the output is v_u + s·(v_c − v_u) of the two halves, so at initialisation G is
  exactly the teacher's one-step guided prediction with a clean reference. GECO's "guidance scale 4 for the
  generator" is read this way (the paper does not define it further).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..generators.zero123plus import Conditioning
from .denoiser import Denoiser
from .diffusion import alphas_at, predicted_x0

DEFAULT_TIMESTEP = 999


class OneStepGenerator(Denoiser):
    """G(θ; z, y): noise ``[B,4,h,w]`` and a batch conditioning → clean model latents ``[B,4,h,w]``."""

    def __init__(self, denoiser: Denoiser, timestep: int = DEFAULT_TIMESTEP, guidance: float = 4.0) -> None:
        super().__init__(denoiser.unet, denoiser.alphas_cumprod, denoiser.prediction)
        if not 0 <= timestep < self.alphas_cumprod.shape[0]:
            last = self.alphas_cumprod.shape[0] - 1
            raise ValueError(f"the generator's timestep must lie in 0..{last}, got {timestep}")
        self.timestep, self.guidance = timestep, guidance

    def forward(self, noise: Tensor, conditioning: Conditioning) -> Tensor:
        batch = noise.shape[0]
        t = torch.full((batch,), self.timestep, dtype=torch.long)
        alpha = alphas_at(self.alphas_cumprod, t, noise)
        x = (1 - alpha).sqrt() * noise
        clean = alphas_at(self.alphas_cumprod, torch.zeros(1, dtype=torch.long), conditioning.reference).sqrt()
        output = self.output(x, t, conditioning, clean * conditioning.reference, torch.zeros_like(t), self.guidance)
        return predicted_x0(output, x, alpha, self.prediction)
