"""Pieces shared by the latent-diffusion teachers (Zero123, MVDream, ImageDream)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def posterior_draw(posterior: Any, generator: torch.Generator | None) -> Tensor:
    """A sample of the VAE's diagonal Gaussian drawn with ``generator``, or its mean without one."""
    if generator is None:
        return posterior.mean
    noise = torch.randn(posterior.mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return posterior.mean + posterior.std * noise.to(posterior.mean)


def clip_pixel_values(processor: Any, image: Tensor) -> Tensor:
    """CLIP input of a ``[1,3,H,W]`` image in [0,1]: through uint8 PIL and the image processor, as the
    reference pipelines do (spec §1.8, §3.2)."""
    pixels = (image[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).astype(np.uint8)
    inputs = processor(images=Image.fromarray(pixels), return_tensors="pt")
    return torch.as_tensor(np.asarray(inputs["pixel_values"]))
