"""The Zero123++ UNet as a denoiser of a batch of condition images, each sample at its own timestep.

The teacher, the student and the one-step generator of Stage I are three copies of one UNet with reference
attention (:mod:`microdreamer.generators.reference_attention`); they differ only in their weights, in which
reference latent they write and in their guidance. Conditioning is batched as
:class:`~microdreamer.generators.zero123plus.Conditioning` with the unconditional halves of all B samples
first, then the conditional ones (``[uncond × B ; cond × B]``); without guidance only the conditional half is
used.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..generators.reference_attention import reference_bank, reference_call
from ..generators.zero123plus import Conditioning, Zero123PlusGenerator, ramped_context
from ..teachers.base import guide
from ..teachers.sd_parts import clip_pixel_values
from .diffusion import alphas_at, noised, predicted_noise


@torch.no_grad()
def condition_batch(
    model: Zero123PlusGenerator, images: list[Tensor], generators: list[torch.Generator]
) -> Conditioning:
    """The guided conditioning ``[uncond × B ; cond × B]`` of B condition images (each ``[1,3,H,W]`` in [0,1]
    on gray), as :meth:`Zero123PlusGenerator.condition` makes it for one: sample i draws its VAE latent and
    then its negative latent from ``generators[i]``, so B = 1 gives exactly that method's result."""
    if len(images) != len(generators) or not images:
        raise ValueError(f"{len(images)} condition images for {len(generators)} generators")
    device, dtype = model.device, model.dtype
    clip = torch.cat([clip_pixel_values(model.clip_processor, image) for image in images]).to(device, dtype)
    embeds = model.vision_encoder(clip).image_embeds
    empty = model.empty_prompt.expand(len(images), -1, -1)
    pixels = torch.cat([clip_pixel_values(model.vae_processor, image) for image in images]).to(device, dtype)
    posterior = model.vae.encode(pixels).latent_dist
    blank = model.vae.encode(torch.zeros_like(pixels[:1])).latent_dist
    references, negatives = [], []
    for i, g in enumerate(generators):
        for draws, dist in ((references, posterior), (negatives, blank)):
            mean, std = dist.mean[i if dist is posterior else 0], dist.std[i if dist is posterior else 0]
            noise = torch.randn(mean.shape, generator=g, device=g.device, dtype=torch.float32)
            draws.append(mean + std * noise.to(mean))
    context = torch.cat([empty, ramped_context(empty, embeds, model.ramp)])
    return Conditioning(context, torch.cat([torch.stack(negatives), torch.stack(references)]).float())


def conditional_half(conditioning: Conditioning) -> Conditioning:
    """The conditional half of a guided batch conditioning."""
    half = conditioning.context.shape[0] // 2
    return Conditioning(conditioning.context[half:], conditioning.reference[half:])


class Denoiser(nn.Module):
    """One Zero123++ UNet (with its reference attention) called on a batch at per-sample timesteps."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction: str) -> None:
        super().__init__()
        self.unet = unet
        self.bank = reference_bank(unet)
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.prediction = prediction

    @classmethod
    def copy_of(cls, model: Zero123PlusGenerator, trainable: bool) -> "Denoiser":
        """A float32 copy of ``model``'s UNet, trainable (train mode, gradients) or frozen."""
        unet = copy.deepcopy(model.unet).float().train(trainable).requires_grad_(trainable)
        return cls(unet, model.alphas_cumprod, model.prediction)

    def output(
        self,
        sample: Tensor,
        timesteps: Tensor,
        conditioning: Conditioning,
        reference: Tensor,
        reference_timesteps: Tensor,
        guidance: float,
    ) -> Tensor:
        """The network output for ``sample [B,…]`` at ``timesteps [B]``, writing ``reference`` (one latent per
        conditioning row) at ``reference_timesteps [B]``: guided, out_u + s·(out_c − out_u), when
        ``conditioning`` holds both halves and ``guidance`` ≠ 1, else the conditional output."""
        batch = sample.shape[0]
        conditioning, reference = _rows_for(conditioning, reference, batch, guidance)
        halves = conditioning.context.shape[0] // batch
        device = self.unet.conv_in.weight.device
        t = timesteps.to(device, torch.float32).repeat(halves)
        t_ref = reference_timesteps.to(device, torch.float32).repeat(halves)
        out = reference_call(self.unet, self.bank, sample.repeat(halves, 1, 1, 1), t, conditioning.context,
                             reference, t_ref)
        return guide(*out.float().chunk(2), guidance) if halves == 2 else out.float()

    def predicted_noise(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, reference_noise: Tensor, guidance: float
    ) -> Tensor:
        """ε predicted at x_t, the reference latents noised to each sample's timestep with ``reference_noise``
        (one per conditioning row), as Zero123++ samples."""
        conditioning, reference_noise = _rows_for(conditioning, reference_noise, x_t.shape[0], guidance)
        halves = conditioning.context.shape[0] // x_t.shape[0]
        alpha = alphas_at(self.alphas_cumprod, timesteps, x_t)
        reference = noised(conditioning.reference, reference_noise, alpha.repeat(halves, 1, 1, 1))
        output = self.output(x_t, timesteps, conditioning, reference, timesteps, guidance)
        return predicted_noise(output, x_t, alpha, self.prediction)


def _rows_for(conditioning: Conditioning, per_row: Tensor, batch: int, guidance: float) -> tuple[Conditioning, Tensor]:
    """The conditioning rows (and matching rows of ``per_row``) a call with ``guidance`` uses: both halves
    when guided, the conditional half otherwise."""
    rows = conditioning.context.shape[0]
    if rows not in (batch, 2 * batch) or per_row.shape[0] != rows:
        raise ValueError(f"{rows} conditioning rows and {per_row.shape[0]} reference rows for a batch of {batch}")
    if guidance == 1.0 and rows == 2 * batch:
        return conditional_half(conditioning), per_row[batch:]
    return conditioning, per_row
