"""MVDream (text) and ImageDream (image + text) as SIR teachers (spec §2, §3).

Both denoise groups of four views of one object jointly with the multi-view UNet, each view
conditioned on its camera (spec §2.7) and on the SD-2.1 text embedding of the prompt. ImageDream adds
the reference image twice: as CLIP ViT-H features resampled into extra context tokens, and as a fifth
frame per object whose latent is the reference image's (scaled) VAE latent, with an all-zero camera;
that frame's output is dropped (spec §3.5–3.6). Classifier-free guidance stacks the batch as
[uncond ; cond] (spec §7.3): the unconditional half uses the negative prompt and, for ImageDream, zero
image features and a zero reference latent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..sir.cameras import Cameras
from ..wording import plural
from .base import Branch, Condition, Teacher, guide
from .catalog import find_entry, open_model
from .loading import (
    build_model,
    load_image_processor,
    model_files,
    noise_schedule,
    read_json,
    require,
)
from .mv_cameras import FRONT_AZIMUTH, VIEWS_PER_OBJECT, mvdream_camera, with_reference_frame
from .mv_unet import MultiViewUNet
from .sd_parts import clip_pixel_values, posterior_draw, reference_image, text_embedding

#: model_index.json classes of an MVDream pipeline folder (spec §2.1); ImageDream adds the image encoder (§3.1)
MVDREAM_COMPONENTS = {
    "unet": "MultiViewUNetModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": "CLIPTokenizer",
}
IMAGEDREAM_COMPONENTS = {
    **MVDREAM_COMPONENTS,
    "image_encoder": "CLIPVisionModel",
    "feature_extractor": "CLIPImageProcessor",
}


#: the parts of a pipeline folder that say how a prompt is read, without the weights
PROMPT_PARTS = ("tokenizer/", "text_encoder/config.json")


def load_tokenizer(root: Path) -> Any:
    return require("transformers").CLIPTokenizer.from_pretrained(str(root / "tokenizer"))


class PromptReader:
    """What the text encoder of a pipeline folder reads of a prompt, known before its weights load: the
    CLIP tokens up to the encoder's length (77 for SD 2.1, start and end tokens included); the rest is cut."""

    def __init__(self, root: Path) -> None:
        self.tokenizer = load_tokenizer(root)
        self.length = int(read_json(root / "text_encoder" / "config.json")["max_position_embeddings"])

    def cut(self, prompt: str) -> str | None:
        """The words read of ``prompt`` when the encoder cuts it (as the tokenizer spells them), else None."""
        ids = self.tokenizer(prompt.strip(), verbose=False).input_ids
        if len(ids) <= self.length:
            return None
        return self.tokenizer.decode(ids[1 : self.length - 1])


def clean_prompt(prompt: str | None) -> str:
    """The prompt with surrounding whitespace removed; missing or blank is a :class:`UserError`."""
    text = (prompt or "").strip()
    if not text:
        raise UserError("empty prompt: give a text prompt describing the object")
    return text


class MultiViewTeacher(Teacher):
    """Shared machinery of the multi-view teachers: text conditioning, VAE, camera input, CFG batch."""

    #: in our world the models' front (input-image) view is azimuth 90 (spec §2.7)
    reference_azimuth = FRONT_AZIMUTH
    #: pipeline folder classes and the catalog entry used when no model is given
    components: dict[str, str] = MVDREAM_COMPONENTS
    catalog_name = "mvdream"

    def __init__(
        self,
        *,
        unet: MultiViewUNet,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        alphas_cumprod: Tensor,
    ) -> None:
        super().__init__()
        cfg = unet.config
        latent = int(vae.config.latent_channels)
        if cfg.in_channels != latent or cfg.out_channels != latent:
            raise UserError(
                f"the multi-view UNet takes {cfg.in_channels} channels and returns {cfg.out_channels}, "
                f"but the VAE's latents have {latent}"
            )
        if int(text_encoder.config.hidden_size) != cfg.context_dim:
            raise UserError(
                f"the text encoder gives {text_encoder.config.hidden_size}-d tokens, the UNet expects {cfg.context_dim}"
            )
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self._alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_size = int(cfg.image_size)
        self.resolution = self.latent_size * 2 ** (len(vae.config.block_out_channels) - 1)
        self._text: dict[str, Tensor] = {}  # "cond" / "uncond" → [1, L, D] text tokens

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: str = "auto",
        allow_download: bool = True,
        cache_dir: str | Path | None = None,
    ) -> "MultiViewTeacher":
        """Load a pipeline folder (or Hugging Face id) in the diffusers layout of spec §2.1 / §3.1.

        Without ``model_id_or_path`` the catalog weights are used. The UNet is built from its
        ``unet/config.json`` and loaded strictly from safetensors; no remote code runs.
        """
        root, device, torch_dtype = open_model(
            model_id_or_path, cls.catalog_name, cls.components,
            device=device, dtype=dtype, allow_download=allow_download, cache_dir=cache_dir,
        )
        _, alphas_cumprod = noise_schedule(root)
        unet = MultiViewUNet.from_folder(root / "unet", dtype=torch_dtype, device=device).requires_grad_(False)
        tokenizer = load_tokenizer(root)
        parts = dict(
            unet=unet,
            vae=build_model(root, "vae", device=device, dtype=torch_dtype),
            text_encoder=build_model(root, "text_encoder", device=device, dtype=torch_dtype),
            tokenizer=tokenizer,
            alphas_cumprod=alphas_cumprod,
        )
        return cls(**parts, **cls._extra_parts(root, device, torch_dtype))

    @classmethod
    def prompt_reader(
        cls, model_id_or_path: str | Path | None = None, allow_download: bool = True, cache_dir: str | Path | None = None
    ) -> PromptReader | None:
        """How this teacher (``model_id_or_path`` as for :meth:`from_pretrained`) reads prompts, from its
        tokenizer alone; None when that cannot be had or read (loading the teacher then says why)."""
        root = model_files(model_id_or_path or find_entry(cls.catalog_name).repo_id, PROMPT_PARTS,
                           allow_download=allow_download, cache_dir=cache_dir)
        try:
            return None if root is None else PromptReader(root)
        except (UserError, OSError, ValueError, KeyError):
            return None

    @classmethod
    def _extra_parts(cls, root: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Components beyond the MVDream set (ImageDream's image encoder)."""
        return {}

    @property
    def device(self) -> torch.device:
        return self.unet.time_embed[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.time_embed[0].weight.dtype

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._alphas_cumprod

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.unet.config.out_channels, self.latent_size, self.latent_size)

    @torch.no_grad()
    def encode_text(self, text: str) -> Tensor:
        """Text tokens ``[1, 77, D]``: the last hidden state (after the final layer norm) of the text
        encoder for the prompt padded with the pad token to the encoder's length (spec §2.5)."""
        return text_embedding(self.tokenizer, self.text_encoder, text)

    @torch.no_grad()
    def prepare(self, condition: Condition, generator: torch.Generator | None = None) -> None:
        """Embed the prompt (required) and the negative prompt ("" when none); nothing is drawn."""
        self._prepare_text(clean_prompt(condition.prompt), condition.negative_prompt)

    def _prepare_text(self, prompt: str, negative_prompt: str | None) -> None:
        self._text = {"cond": self.encode_text(prompt), "uncond": self.encode_text(negative_prompt or "")}

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Renders → VAE posterior sample (mean without a generator) × scaling factor, float32.

        Renders of another size are resized to ``resolution`` bilinearly (as the reference does).
        """
        return self._encode(images, generator) * self.scaling_factor

    def _encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        posterior = self.vae.encode((x * 2 - 1).to(self.dtype)).latent_dist
        return posterior_draw(posterior, generator).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        y = self.vae.decode((latents / self.scaling_factor).to(self.device, self.dtype)).sample
        return ((y.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def _eps(self, latents: Tensor, t: int, cameras: Cameras, branch: Branch, guidance_scale: float) -> Tensor:
        b = latents.shape[0]
        if len(cameras) != b:
            raise ValueError(f"{b} latents but {len(cameras)} cameras")
        if b % VIEWS_PER_OBJECT:
            raise UserError(f"the multi-view teachers denoise groups of {VIEWS_PER_OBJECT} views: got {plural(b, 'view')}")
        if not self._text:
            raise RuntimeError(f"{type(self).__name__}.prepare(condition) must run before predicting noise")
        x = latents.to(self.device, self.dtype)
        camera = mvdream_camera(cameras).to(self.device, self.dtype)
        halves = ("uncond", "cond") if branch == "guided" else (branch,)
        batches = [self._half(half, x, camera) for half in halves]
        inputs = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        frames = self.frames_per_object
        timesteps = torch.full((inputs["x"].shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = self.unet(timesteps=timesteps, num_frames=frames, **inputs).float()
        eps = eps.reshape(-1, frames, *eps.shape[1:])[:, :VIEWS_PER_OBJECT].reshape(-1, *eps.shape[1:])
        if branch == "guided":
            eps_uncond, eps_cond = eps.chunk(2)
            return guide(eps_uncond, eps_cond, guidance_scale)
        return eps

    @property
    def frames_per_object(self) -> int:
        """Frames the UNet sees per object (ImageDream appends the reference frame)."""
        return VIEWS_PER_OBJECT

    def _half(self, half: str, x: Tensor, camera: Tensor) -> dict[str, Tensor]:
        """The UNet inputs of one CFG half: latents, cameras and text context for each frame."""
        return {"x": x, "camera": camera, "context": self._text[half].expand(x.shape[0], -1, -1)}


class MVDreamTeacher(MultiViewTeacher):
    """MVDream (``ashawkey/mvdream-sd2.1-diffusers``): four views from a text prompt."""

    def __init__(self, **parts: Any) -> None:
        super().__init__(**parts)
        if self.unet.config.ip_dim > 0:
            raise UserError("this is an ImageDream checkpoint (its UNet takes image prompts): use --teacher imagedream")


class ImageDreamTeacher(MultiViewTeacher):
    """ImageDream (``ashawkey/imagedream-ipmv-diffusers``): four views from a reference image and a prompt.

    The prompt may be absent (the image carries the content); the negative prompt still applies.
    The reference latent is a VAE posterior sample drawn with the run's generator given to
    :meth:`prepare`, or the posterior mean when none is given.
    """

    components = IMAGEDREAM_COMPONENTS
    catalog_name = "imagedream"

    def __init__(self, *, image_encoder: nn.Module, image_processor: Any, **parts: Any) -> None:
        super().__init__(**parts)
        if self.unet.config.ip_dim <= 0:
            raise UserError("this multi-view UNet has no image-prompt layers (ip_dim 0): it is MVDream, not ImageDream")
        if int(image_encoder.config.hidden_size) != self.unet.config.ip_embedding_dim:
            raise UserError(
                f"the image encoder gives {image_encoder.config.hidden_size}-d features, the UNet's resampler "
                f"expects {self.unet.config.ip_embedding_dim}"
            )
        self.image_encoder, self.image_processor = image_encoder, image_processor
        self._image_features: Tensor | None = None  # [1, 257, E] CLIP penultimate hidden states
        self._image_latent: Tensor | None = None  # [1, 4, h, w] scaled VAE latent of the reference

    @classmethod
    def _extra_parts(cls, root: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        return {
            "image_encoder": build_model(root, "image_encoder", device=device, dtype=dtype),
            "image_processor": load_image_processor(root),
        }

    @property
    def frames_per_object(self) -> int:
        return VIEWS_PER_OBJECT + 1

    @torch.no_grad()
    def prepare(self, condition: Condition, generator: torch.Generator | None = None) -> None:
        """Text embeddings, CLIP features and the scaled VAE latent of the reference image (at ``resolution``)."""
        image = reference_image(condition.image, "ImageDream", self.resolution, self.device)
        prompt = condition.prompt.strip() if condition.prompt is not None else ""
        self._prepare_text(prompt, condition.negative_prompt)
        self._image_features = self.image_features(image)
        self._image_latent = self._encode(image, generator).to(self.dtype) * self.scaling_factor

    @torch.no_grad()
    def image_features(self, image: Tensor) -> Tensor:
        """CLIP ``hidden_states[-2]`` ``[1, 257, E]`` of a ``[1,3,H,W]`` image in [0,1] (spec §3.2),
        through uint8 PIL and the CLIP image processor."""
        pixel_values = clip_pixel_values(self.image_processor, image).to(self.device, self.dtype)
        return self.image_encoder(pixel_values, output_hidden_states=True).hidden_states[-2]

    def _half(self, half: str, x: Tensor, camera: Tensor) -> dict[str, Tensor]:
        """Per object: the 4 views then the reference frame (zero latent, which the UNet replaces by
        ``ip_img``, and zero camera); the unconditional half gets zero image features and latent."""
        if self._image_features is None or self._image_latent is None:
            raise RuntimeError("ImageDreamTeacher.prepare(condition) must run before predicting noise")
        objects, frames = x.shape[0] // VIEWS_PER_OBJECT, self.frames_per_object
        views = x.reshape(objects, VIEWS_PER_OBJECT, *x.shape[1:])
        x = torch.cat([views, views.new_zeros(objects, 1, *x.shape[1:])], dim=1).flatten(0, 1)
        features, latent = self._image_features, self._image_latent
        if half == "uncond":
            features, latent = torch.zeros_like(features), torch.zeros_like(latent)
        n = objects * frames
        return {
            "x": x,
            "camera": with_reference_frame(camera, VIEWS_PER_OBJECT),
            "context": self._text[half].expand(n, -1, -1),
            "ip": features.expand(n, -1, -1),
            "ip_img": latent.expand(objects, -1, -1, -1),
        }
