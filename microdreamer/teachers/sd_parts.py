"""Pieces shared by the latent-diffusion teachers (Zero123, MVDream, ImageDream) and generators (Zero123++)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import UserError


def posterior_draw(posterior: Any, generator: torch.Generator | None) -> Tensor:
    """A sample of the VAE's diagonal Gaussian drawn with ``generator``, or its mean without one."""
    if generator is None:
        return posterior.mean
    noise = torch.randn(posterior.mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return posterior.mean + posterior.std * noise.to(posterior.mean)


@torch.no_grad()
def text_embedding(tokenizer: Any, text_encoder: Any, text: str) -> Tensor:
    """Text tokens ``[1, L, D]``: the last hidden state (after the final layer norm) of the CLIP text encoder
    for ``text`` padded with the pad token to the encoder's length L (spec §2.5)."""
    length = int(text_encoder.config.max_position_embeddings)
    ids = tokenizer(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = text_encoder.get_input_embeddings().weight.device
    return text_encoder(ids.input_ids.to(device)).last_hidden_state


def clip_pixel_values(processor: Any, image: Tensor) -> Tensor:
    """CLIP input of a ``[1,3,H,W]`` image in [0,1]: through uint8 PIL and the image processor, as the
    reference pipelines do (spec §1.8, §3.2)."""
    pixels = (image[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).astype(np.uint8)
    inputs = processor(images=Image.fromarray(pixels), return_tensors="pt")
    return torch.as_tensor(np.asarray(inputs["pixel_values"]))


def reference_image(image: Tensor | None, teacher: str, resolution: int, device: torch.device) -> Tensor:
    """The condition's reference image as float32 ``[1,3,R,R]`` on ``device`` (bilinear resize), or a
    one-line error naming ``teacher`` when it is missing or not one RGB image."""
    if image is None:
        raise UserError(f"{teacher} is conditioned on an image: give a reference image")
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise UserError(f"the reference image must be one RGB image [1,3,H,W], got {list(image.shape)}")
    image = image.to(device, torch.float32)
    if image.shape[-2:] != (resolution, resolution):
        image = F.interpolate(image, (resolution, resolution), mode="bilinear", align_corners=False)
    return image
