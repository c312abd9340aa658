"""Stable Zero123 and Zero123-XL as SIR teachers (spec §1).

Hybrid conditioning: the UNet's input is the noisy latent concatenated on channels with the VAE latent of
the reference image (unscaled), and its cross-attention context is one token, the projection of
[CLIP image embedding ; T], where T encodes the target view relative to the reference view.
Classifier-free guidance zeroes both the projected token and the concatenated latent (spec §1.7).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..sir.cameras import Cameras
from .base import Branch, Condition, Teacher, guide
from .catalog import open_model
from .sd_parts import clip_pixel_values, posterior_draw, reference_image
from .loading import (
    build_model,
    load_image_processor,
    load_module,
    noise_schedule,
    read_json,
    weights_file,
)

Variant = Literal["stable", "xl"]
VARIANTS: tuple[str, ...] = ("stable", "xl")
#: catalog entry (default weights) of each variant
CATALOG_NAMES = {"stable": "stable-zero123", "xl": "zero123-xl"}

#: model_index.json classes of a Zero123 pipeline folder (spec §1.1)
COMPONENTS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "image_encoder": "CLIPVisionModelWithProjection",
    "feature_extractor": "CLIPImageProcessor",
    "clip_camera_projection": "CLIPCameraProjection",
}


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UserError(f"unknown Zero123 variant '{variant}' (use {' or '.join(VARIANTS)})")


def camera_embedding(
    elevation_delta: Tensor, azimuth_delta: Tensor, variant: Variant, reference_elevation: float = 0.0
) -> Tensor:
    """T ``[B,4]`` (float64) for view offsets in degrees (spec §1.6).

    T = [rad(Δel), sin(rad(Δaz)), cos(rad(Δaz)), x] with x = rad(90 + reference elevation), the polar
    angle of the reference view, for Stable Zero123, and x = Δradius = 0 for Zero123-XL.
    """
    check_variant(variant)
    d_el = torch.deg2rad(torch.as_tensor(elevation_delta, dtype=torch.float64).reshape(-1))
    d_az = torch.deg2rad(torch.as_tensor(azimuth_delta, dtype=torch.float64).reshape(-1))
    if variant == "stable":
        last = torch.full_like(d_el, np.deg2rad(90.0 + reference_elevation))
    else:
        last = torch.zeros_like(d_el)
    return torch.stack([d_el, d_az.sin(), d_az.cos(), last], dim=-1)


class CameraProjection(nn.Module):
    """``clip_camera_projection``: Linear(embedding_dim + 4 → embedding_dim) over [CLIP embedding ; T]."""

    def __init__(self, embedding_dim: int = 768, additional_embeddings: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(embedding_dim + additional_embeddings, embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)

    @classmethod
    def from_folder(cls, folder: Path, *, device: torch.device | str, dtype: torch.dtype) -> "CameraProjection":
        """Build from ``config.json`` (embedding_dim, additional_embeddings) and load its safetensors."""
        config = read_json(folder / "config.json")
        dims = int(config.get("embedding_dim", 768)), int(config.get("additional_embeddings", 4))
        return load_module(lambda: cls(*dims), weights_file(folder), device=device, dtype=dtype)


class Zero123Teacher(Teacher):
    """Zero123-family noise prediction for B views of one object, conditioned on one reference image.

    Cameras handed to :meth:`predict_noise` are absolute; the reference view sits at azimuth 0 and at
    the elevation given in the :class:`Condition`, so Δel = el − reference el and Δaz = az.
    The reference-image latent is a VAE posterior sample drawn with the run's generator given to
    :meth:`prepare` (as MicroDreamer does), or the posterior mean when none is given.
    """

    reference_azimuth = 0.0

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        image_encoder: nn.Module,
        image_processor: Any,
        camera_projection: CameraProjection,
        alphas_cumprod: Tensor,
        variant: Variant = "stable",
    ) -> None:
        super().__init__()
        check_variant(variant)
        latent = int(vae.config.latent_channels)
        if unet.config.in_channels != 2 * latent or unet.config.out_channels != latent:
            raise UserError(
                f"not a Zero123 UNet: it takes {unet.config.in_channels} channels and returns "
                f"{unet.config.out_channels}, expected {2 * latent} and {latent}"
            )
        width = int(image_encoder.config.projection_dim)
        proj = camera_projection.proj
        if proj.in_features != width + 4 or proj.out_features != unet.config.cross_attention_dim:
            raise UserError(
                f"clip_camera_projection maps {proj.in_features}→{proj.out_features}, expected "
                f"{width + 4}→{unet.config.cross_attention_dim}"
            )
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.image_processor = image_processor
        self.camera_projection = camera_projection
        self.variant: Variant = variant
        self._alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_size = int(unet.config.sample_size)
        self.resolution = self.latent_size * 2 ** (len(vae.config.block_out_channels) - 1)
        self._image_embeds: Tensor | None = None  # [1, D] CLIP image_embeds (not normalised)
        self._image_latent: Tensor | None = None  # [1, 4, h, w] unscaled VAE latent of the reference
        self._reference_elevation = 0.0

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path | None = None,
        variant: Variant = "stable",
        device: torch.device | str = "cpu",
        dtype: str = "auto",
        allow_download: bool = True,
        cache_dir: str | Path | None = None,
    ) -> "Zero123Teacher":
        """Load a Zero123 pipeline folder (or Hugging Face id) in the diffusers layout of spec §1.1.

        Without ``model_id_or_path`` the variant's catalog weights are used.
        """
        check_variant(variant)
        root, device, torch_dtype = open_model(
            model_id_or_path, CATALOG_NAMES[variant], COMPONENTS,
            device=device, dtype=dtype, allow_download=allow_download, cache_dir=cache_dir,
        )
        _, alphas_cumprod = noise_schedule(root)
        return cls(
            unet=build_model(root, "unet", device=device, dtype=torch_dtype),
            vae=build_model(root, "vae", device=device, dtype=torch_dtype),
            image_encoder=build_model(root, "image_encoder", device=device, dtype=torch_dtype),
            image_processor=load_image_processor(root),
            camera_projection=CameraProjection.from_folder(
                root / "clip_camera_projection", device=device, dtype=torch_dtype
            ),
            alphas_cumprod=alphas_cumprod,
            variant=variant,
        )

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._alphas_cumprod

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, int(self.unet.config.out_channels), self.latent_size, self.latent_size)

    @torch.no_grad()
    def prepare(self, condition: Condition, generator: torch.Generator | None = None) -> None:
        """CLIP image embedding and VAE latent of the reference image, resized bilinearly to ``resolution``."""
        image = reference_image(condition.image, "the Zero123 teachers", self.resolution, self.device)
        self._image_embeds = self.clip_embedding(image)
        posterior = self.vae.encode((image * 2 - 1).to(self.dtype)).latent_dist
        self._image_latent = posterior_draw(posterior, generator)
        self._reference_elevation = float(condition.elevation)

    @torch.no_grad()
    def clip_embedding(self, image: Tensor) -> Tensor:
        """``image_embeds`` ``[1,D]`` of a ``[1,3,H,W]`` image in [0,1], via uint8 PIL and the CLIP processor."""
        pixel_values = clip_pixel_values(self.image_processor, image)
        return self.image_encoder(pixel_values.to(self.device, self.dtype)).image_embeds

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Renders → VAE posterior sample (mean without a generator) × scaling factor, float32.

        Renders of another size are resized to ``resolution`` with bicubic interpolation.
        """
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, (self.resolution, self.resolution), mode="bicubic", align_corners=False)
        posterior = self.vae.encode((x * 2 - 1).to(self.dtype)).latent_dist
        return (posterior_draw(posterior, generator) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        y = self.vae.decode((latents / self.scaling_factor).to(self.device, self.dtype)).sample
        return ((y.float() + 1) / 2).clamp(0, 1)

    def context(self, cameras: Cameras) -> Tensor:
        """Cross-attention context ``[B,1,D]`` = proj([CLIP embedding ; T]) for absolute cameras."""
        if self._image_embeds is None:
            raise RuntimeError("Zero123Teacher.prepare(condition) must run before predicting noise")
        t = camera_embedding(
            cameras.elevation.double().cpu() - self._reference_elevation,
            cameras.azimuth.double().cpu() - self.reference_azimuth,
            self.variant,
            self._reference_elevation,
        ).to(self.device, self.dtype)
        embeds = self._image_embeds.expand(t.shape[0], -1)
        return self.camera_projection(torch.cat([embeds, t], dim=-1))[:, None]

    @torch.no_grad()
    def _eps(self, latents: Tensor, t: int, cameras: Cameras, branch: Branch, guidance_scale: float) -> Tensor:
        b = latents.shape[0]
        if len(cameras) != b:
            raise ValueError(f"{b} latents but {len(cameras)} cameras")
        if self._image_latent is None:
            raise RuntimeError("Zero123Teacher.prepare(condition) must run before predicting noise")
        x = latents.to(self.device, self.dtype)
        halves = ("cond", "uncond") if branch == "guided" else (branch,)
        inputs, contexts = [], []
        for half in halves:
            if half == "cond":
                inputs.append(torch.cat([x, self._image_latent.expand(b, -1, -1, -1)], dim=1))
                contexts.append(self.context(cameras))
            else:
                inputs.append(torch.cat([x, torch.zeros_like(x)], dim=1))
                contexts.append(torch.zeros(b, 1, self.camera_projection.proj.out_features, device=x.device, dtype=x.dtype))
        sample = torch.cat(inputs)
        timesteps = torch.full((sample.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = self.unet(sample, timesteps, encoder_hidden_states=torch.cat(contexts)).sample.float()
        if branch == "guided":
            eps_cond, eps_uncond = eps.chunk(2)
            return guide(eps_uncond, eps_cond, guidance_scale)
        return eps

