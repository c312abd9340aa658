"""Zero123++ v1.1 (``sudo-ai/zero123plus-v1.1``): one condition image → six views at fixed poses (spec §4).

Loaded from its diffusers folder layout with our own sampling code (no remote code, no custom pipeline):

- Global conditioning: the CLIP image embedding of the condition, times the 77 ramping coefficients of
  ``model_index.json``, is added token-wise to the text-encoder states of the empty prompt.
- Local conditioning: reference attention (:mod:`.reference_attention`) on the *raw* VAE latent of the
  condition (no scaling factor), noised afresh to the current timestep at every call.
- Classifier-free guidance (scale > 1) stacks [uncond ; cond]: the unconditional half has the plain
  empty-prompt states and, as reference, the VAE latent of an all-zero normalised image (mid-gray).
- v-prediction, linear betas, Euler-ancestral steps with trailing spacing (:mod:`.euler_ancestral`).
- Latent space: model latents are (z·0.18215 − 0.22)·0.75 of the VAE's z; decoded images are in a space
  scaled by 0.625 (= 0.5/0.8), undone before mapping [−1, 1] to [0, 1].
- Output: one 3 × 2 grid of 320² views on gray (127/255), split row-major into views 0..5.

Random numbers all come from the run's generator, in this order: the condition latent, the negative
latent, the starting noise, then per step the reference noise and the ancestral noise. (The published
pipeline draws the VAE samples and the reference noise from torch's global generator instead.)

The weights are licensed CC-BY-NC 4.0 (non-commercial use only; see ``microdreamer models list``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError
from ..sir.cameras import Cameras
from ..sir.scheduler import randn_like
from ..teachers.base import guide
from ..teachers.catalog import open_model
from ..teachers.loading import (
    build_model,
    load_image_processor,
    read_json,
    require,
    schedule_alphas_cumprod,
)
from ..teachers.sd_parts import clip_pixel_values, posterior_draw, text_embedding
from .euler_ancestral import PREDICTIONS, EulerAncestral
from .reference_attention import install_reference_attention, reference_call

CATALOG_NAME = "zero123plus"
#: model_index.json classes of the Zero123++ v1.1 folder (spec §4.1)
COMPONENTS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": "CLIPTokenizer",
    "vision_encoder": "CLIPVisionModelWithProjection",
    "feature_extractor_clip": "CLIPImageProcessor",
    "feature_extractor_vae": "CLIPImageProcessor",
    "scheduler": "EulerAncestralDiscreteScheduler",
}

#: the background the model was trained on and paints: uniform uint8 127
GRAY = 127 / 255
ROWS, COLS = 3, 2
VIEW_SIZE = 320
#: the six views relative to the condition view (spec §4.3), in Zero123++'s sign: elevation positive = above
AZIMUTHS = (30.0, 90.0, 150.0, 210.0, 270.0, 330.0)
ELEVATIONS = (30.0, -20.0, 30.0, -20.0, 30.0, -20.0)
#: the affine of model latents and the scale of the decoded image space (spec §4.4)
LATENT_SHIFT, LATENT_SCALE, IMAGE_SCALE = 0.22, 0.75, 0.5 / 0.8
DEFAULT_STEPS, DEFAULT_GUIDANCE = 28, 4.0


def unscale_latents(latents: Tensor) -> Tensor:
    """Model latents → the VAE's scaled latents z·0.18215 (inverse of (z·0.18215 − 0.22)·0.75)."""
    return latents / LATENT_SCALE + LATENT_SHIFT


def unscale_image(image: Tensor) -> Tensor:
    """The VAE decoder's output (images × 0.625) → images in [−1, 1]."""
    return image / IMAGE_SCALE


def split_grid(grid: Tensor, rows: int = ROWS, cols: int = COLS) -> Tensor:
    """``[B, C, rows·S, cols·S]`` → ``[B·rows·cols, C, S, S]``, row-major within each grid."""
    b, c, h, w = grid.shape
    if h % rows or w % cols or h // rows != w // cols:
        raise ValueError(f"a {rows}×{cols} grid of square views cannot be {h}×{w} pixels")
    size = h // rows
    views = grid.reshape(b, c, rows, size, cols, size).permute(0, 2, 4, 1, 3, 5)
    return views.reshape(b * rows * cols, c, size, size)


def zero123plus_cameras(
    reference_azimuth: float = 0.0, *, radius: float = 4.0, fovy: float = 30.0, resolution: int = VIEW_SIZE
) -> Cameras:
    """The six views' cameras in our orbit convention (spec §0.4: y up, negative elevation = above).

    Azimuths are the condition view's plus 30, 90, …, 330, turning the same way about the up axis as ours
    (InstantMesh places Zero123++'s views at azimuths from +x towards +y about z up, a proper rotation of our
    axes); v1.1 elevations are absolute, 30° above / 20° below, i.e. −30 / +20 here. Zero123++ v1.1
    publishes neither distance nor field of view (spec §4.3): the defaults are v1.2's 30° and the radius
    InstantMesh pairs with it.
    """
    azimuth = [reference_azimuth + a for a in AZIMUTHS]
    elevation = [-e for e in ELEVATIONS]
    return Cameras.orbit(elevation, azimuth, radius, resolution, fovy)


def view_coverage(views: Tensor) -> Tensor:
    """Per-pixel coverage ``[N,1,S,S]`` in [0,1] of views ``[N,3,S,S]`` (in [0,1]) on a plain background:
    preprocessing's uniform-background estimate per view, made from 8-bit colours (so without gradient).
    Raises :class:`UserError` when a view's border is not a plain colour."""
    from ..io.images import to_uint8
    from ..preprocess import uniform_background_alpha

    alphas = []
    for view in views.detach().float().cpu():
        rgb = to_uint8(view.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0)
        alphas.append(torch.from_numpy(uniform_background_alpha(rgb).astype(np.float32) / 255.0))
    return torch.stack(alphas)[:, None].to(views.device)


def on_white(views: Tensor, coverage: Tensor, gray: float = GRAY) -> Tensor:
    """Views ``[N,3,S,S]`` on ``gray`` with coverage a ``[N,1,S,S]`` moved onto white: a pixel
    x = a·F + (1 − a)·gray becomes a·F + (1 − a)·1 = x + (1 − a)(1 − gray) (differentiable in ``views``)."""
    return (views + (1.0 - coverage.to(views)) * (1.0 - gray)).clamp(0, 1)


def rematte_on_white(views: Tensor, gray: float = GRAY) -> Tensor:
    """EXPERIMENTAL: views ``[N,3,S,S]`` in [0,1] with their gray background turned white (LGM, spec §5), by
    :func:`on_white` with the coverage :func:`view_coverage` estimates. Object colours close to the gray are
    where it fails. Raises :class:`UserError` when a view's border is not a plain colour."""
    return on_white(views.detach().float(), view_coverage(views), gray)


def ramped_context(text: Tensor, image_embeds: Tensor, ramp: Tensor) -> Tensor:
    """The conditional context ``[B, L, D]``: text states ``[B, L, D]`` plus, at token l, ramp[l] times the
    image embedding ``[B, D]``."""
    return text + image_embeds[:, None, :] * ramp.to(text)[None, :, None]


@dataclass
class Conditioning:
    """What one condition image gives the UNet, CFG halves stacked [uncond ; cond] (cond alone without CFG)."""

    context: Tensor  # [k, 77, D] cross-attention states
    reference: Tensor  # [k, 4, h, w] raw VAE latents for reference attention (float32)


@dataclass
class GeneratedViews:
    grid: Tensor  # [1, 3, 3S, 2S] in [0, 1], on gray
    views: Tensor  # [6, 3, S, S], row-major from the grid
    cameras: Cameras  # the views' cameras (:func:`zero123plus_cameras` defaults)
    latents: Tensor  # [1, 4, 3S/f, 2S/f] the final model latents


class Zero123PlusGenerator:
    """Zero123++ v1.1 as a multi-view generator: a condition image → six views at fixed poses.

    Not an SIR teacher: its views cannot be placed at other cameras (MicroDreamer §V).
    """

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        vision_encoder: nn.Module,
        clip_processor: Any,
        vae_processor: Any,
        alphas_cumprod: Tensor,
        prediction: str,
        ramp: Tensor,
    ) -> None:
        latent = int(vae.config.latent_channels)
        if unet.config.in_channels != latent or unet.config.out_channels != latent:
            raise UserError(
                f"not a Zero123++ UNet: it maps {unet.config.in_channels} to {unet.config.out_channels} channels, "
                f"the VAE's latents have {latent}"
            )
        width = int(unet.config.cross_attention_dim)
        dims = {"text encoder": text_encoder.config.hidden_size, "vision encoder": vision_encoder.config.projection_dim}
        for what, dim in dims.items():
            if int(dim) != width:
                raise UserError(f"the {what} gives {dim}-d embeddings, the UNet attends to {width}-d states")
        tokens = int(text_encoder.config.max_position_embeddings)
        if ramp.shape != (tokens,):
            raise UserError(
                f"model_index.json has {ramp.numel()} ramping_coefficients, the text encoder {tokens} tokens"
            )
        if prediction not in PREDICTIONS:
            raise UserError(f"unsupported prediction_type {prediction!r} (use {' or '.join(PREDICTIONS)})")
        self.unet, self.vae, self.vision_encoder = unet, vae, vision_encoder
        self.clip_processor, self.vae_processor = clip_processor, vae_processor
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.prediction = prediction
        self.ramp = ramp.to(torch.float64)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.reference_bank = install_reference_attention(unet)
        # the only prompt is the empty one: encode it once and keep no text encoder
        self.empty_prompt = text_embedding(tokenizer, text_encoder, "")  # [1, 77, D]

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: str = "auto",
        allow_download: bool = True,
        cache_dir: str | Path | None = None,
    ) -> "Zero123PlusGenerator":
        """Load a Zero123++ folder (or Hugging Face id; default the catalog's v1.1) in its diffusers layout."""
        root, device, torch_dtype = open_model(
            model_id_or_path, CATALOG_NAME, COMPONENTS,
            device=device, dtype=dtype, allow_download=allow_download, cache_dir=cache_dir,
        )
        scheduler_path = root / "scheduler" / "scheduler_config.json"
        scheduler = read_json(scheduler_path)
        models = {
            name: build_model(root, name, device=device, dtype=torch_dtype)
            for name in ("unet", "vae", "text_encoder", "vision_encoder")
        }
        return cls(
            **models,
            tokenizer=require("transformers").CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
            clip_processor=load_image_processor(root, "feature_extractor_clip"),
            vae_processor=load_image_processor(root, "feature_extractor_vae"),
            alphas_cumprod=schedule_alphas_cumprod(scheduler, scheduler_path),
            prediction=str(scheduler.get("prediction_type", "epsilon")),
            ramp=_ramping_coefficients(root),
        )

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def condition(self, image: Tensor, generator: torch.Generator, guided: bool) -> Conditioning:
        """Context and reference latents of a ``[1,3,H,W]`` image in [0,1] composited on :data:`GRAY`.

        Both image processors read it as 8-bit RGB, as the published pipeline reads a PIL image.
        """
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise UserError(f"the condition must be one RGB image [1,3,H,W], got {list(image.shape)}")
        clip = clip_pixel_values(self.clip_processor, image).to(self.device, self.dtype)
        embeds = self.vision_encoder(clip).image_embeds  # [1, D]
        cond = ramped_context(self.empty_prompt, embeds, self.ramp)
        pixels = clip_pixel_values(self.vae_processor, image).to(self.device, self.dtype)
        reference = posterior_draw(self.vae.encode(pixels).latent_dist, generator).float()
        if not guided:
            return Conditioning(cond, reference)
        negative = posterior_draw(self.vae.encode(torch.zeros_like(pixels)).latent_dist, generator).float()
        return Conditioning(torch.cat([self.empty_prompt, cond]), torch.cat([negative, reference]))

    @torch.no_grad()
    def model_output(
        self,
        latents: Tensor,
        i: int,
        schedule: EulerAncestral,
        conditioning: Conditioning,
        generator: torch.Generator,
        guidance_scale: float,
    ) -> Tensor:
        """The (guided) network output for ``latents`` at step ``i``: a reference pass on the reference
        latents noised to σ_i with fresh noise, then the sample pass reading its self-attention tokens."""
        halves = conditioning.context.shape[0]
        t = torch.full((halves,), float(schedule.timesteps[i]), device=self.device)
        noise = randn_like(conditioning.reference, generator)
        reference = schedule.scale_input(schedule.add_noise(conditioning.reference, noise, i), i)
        sample = schedule.scale_input(latents.float().expand(halves, -1, -1, -1), i)
        context = conditioning.context.to(self.dtype)
        output = reference_call(
            self.unet, self.reference_bank, sample.to(self.dtype), t, context, reference.to(self.dtype), t
        ).float()
        if halves == 2:
            uncond, cond = output.chunk(2)
            return guide(uncond, cond, guidance_scale)
        return output

    @torch.no_grad()
    def generate(
        self,
        image: Tensor,
        generator: torch.Generator,
        *,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        view_size: int = VIEW_SIZE,
    ) -> GeneratedViews:
        """Six views of the object in ``image`` (``[1,3,H,W]`` in [0,1], square, on :data:`GRAY`; from an RGBA
        picture e.g. ``io.images.to_reference(rgba, 512, background=(GRAY,) * 3)[0]``)."""
        if view_size <= 0 or view_size % self.vae_factor:
            raise UserError(f"the view size must be a positive multiple of {self.vae_factor}, got {view_size}")
        if not 1 <= steps <= self.alphas_cumprod.shape[0]:
            raise UserError(f"steps must lie in 1..{self.alphas_cumprod.shape[0]}, got {steps}")
        conditioning = self.condition(image, generator, guided=guidance_scale > 1.0)
        size = view_size // self.vae_factor
        shape = (1, int(self.unet.config.out_channels), ROWS * size, COLS * size)
        noise = torch.randn(shape, generator=generator, device=generator.device).to(self.device)
        latents = self.sample(conditioning, noise, generator, steps=steps, guidance_scale=guidance_scale)
        grid = self.decode(latents)
        return GeneratedViews(grid, split_grid(grid), zero123plus_cameras(resolution=view_size), latents)

    @torch.no_grad()
    def sample(
        self,
        conditioning: Conditioning,
        noise: Tensor,
        generator: torch.Generator,
        *,
        steps: int,
        guidance_scale: float,
        deterministic: bool = False,
    ) -> Tensor:
        """Model latents ``[1,4,h,w]`` sampled from the standard normal ``noise`` (the first network input is
        √(1−ᾱ_T)·noise) with ``steps`` trailing-spaced steps: Euler-ancestral, or with ``deterministic`` the
        same steps without fresh noise (DDIM with η = 0). ``generator`` gives the reference noise of every step."""
        schedule = EulerAncestral.trailing(self.alphas_cumprod, steps, self.prediction)
        latents = noise.to(self.device, torch.float32) * schedule.init_sigma
        for i in range(len(schedule)):
            output = self.model_output(latents, i, schedule, conditioning, generator, guidance_scale)
            latents = schedule.step(output, latents, i, None if deterministic else generator)
        return latents

    def decode(self, latents: Tensor) -> Tensor:
        """Model latents ``[B,4,h,w]`` → images ``[B,3,h·f,w·f]`` in [0,1]; differentiable (GECO Stage II trains
        through it): call it under ``torch.no_grad()`` when no gradient is wanted."""
        z = unscale_latents(latents.float()) / self.scaling_factor
        image = unscale_image(self.vae.decode(z.to(self.device, self.dtype)).sample.float())
        return ((image + 1) / 2).clamp(0, 1)


def _ramping_coefficients(root: Path) -> Tensor:
    values = read_json(root / "model_index.json").get("ramping_coefficients")
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
        raise UserError(f"{root / 'model_index.json'} has no list of ramping_coefficients; is this Zero123++?")
    return torch.tensor(values, dtype=torch.float64)
