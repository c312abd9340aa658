"""The refiner (paper §IV-C, Algorithm 1 lines 5–6): renders → teacher-refined target images.

Two timesteps define a refinement, 0 < t1 ≤ t2 < T:

- the **hybrid forward process** first *adds noise* to the encoded renders up to t1 (no network pass),
  then runs deterministic *DDIM inversion* from t1 up to t2 using the teacher's unconditional noise
  prediction only (t1 = t2 is pure noise adding);
- DDIM *sampling* with classifier-free guidance then takes the result from t2 back to 0.

Everything here works through the ``Teacher`` seam, so any teacher (latent or pixel space) fits, and
all randomness comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io.images import area_resize_tensor
from ..teachers.base import Teacher
from .cameras import Cameras
from .scheduler import (
    add_noise,
    ddim_step,
    ddim_timesteps,
    inverse_step,
    inverse_timesteps,
    inversion_pairs,
    randn_like,
    sampling_timesteps,
)


@torch.no_grad()
def hybrid_forward(
    teacher: Teacher, z0: Tensor, t1: int, t2: int, cameras: Cameras, N: int, generator: torch.Generator
) -> Tensor:
    """Noise ``z0`` to t1 (when t1 > 0), then DDIM-invert t1 → t2 with the unconditional branch."""
    alphas = teacher.alphas_cumprod
    T = alphas.shape[0]
    _check_timesteps(t1, t2, N, T)
    z = add_noise(z0, randn_like(z0, generator), t1, alphas) if t1 > 0 else z0
    for source, target in inversion_pairs(t1, t2, N, T):
        eps = teacher.predict_noise(z, source, cameras, branch="uncond")
        z = inverse_step(eps, target, z, alphas, N)
    return z


@torch.no_grad()
def sample(
    teacher: Teacher,
    z_t: Tensor,
    t2: int,
    cameras: Cameras,
    N: int,
    eta: float,
    guidance_scale: float,
    generator: torch.Generator,
) -> Tensor:
    """DDIM sampling from t2 down to 0 with classifier-free guided noise predictions."""
    alphas = teacher.alphas_cumprod
    z = z_t
    for t in sampling_timesteps(t2, N, alphas.shape[0]):
        eps = teacher.predict_noise(z, t, cameras, branch="guided", guidance_scale=guidance_scale)
        z = ddim_step(eps, t, z, alphas, N, eta, generator)
    return z


@torch.no_grad()
def init_sample(
    teacher: Teacher,
    cameras: Cameras,
    N: int,
    eta: float,
    guidance_scale: float,
    generator: torch.Generator,
    out_size: tuple[int, int] | None = None,
) -> Tensor:
    """Images ``[B,3,H,W]`` sampled from pure noise through all N DDIM steps (the init iteration).

    The noise is drawn on the generator's device and moved to the cameras' device.
    """
    T = teacher.alphas_cumprod.shape[0]
    noise = torch.randn(teacher.latent_shape(len(cameras)), generator=generator, device=generator.device)
    z = sample(teacher, noise.to(cameras.device), T, cameras, N, eta, guidance_scale, generator)
    images = teacher.decode(z)
    return _resize(images, tuple(out_size)) if out_size is not None else images


@torch.no_grad()
def refine(
    teacher: Teacher,
    images: Tensor,
    cameras: Cameras,
    t1: int,
    t2: int,
    N: int,
    eta: float,
    guidance_scale: float,
    generator: torch.Generator,
) -> Tensor:
    """Target images ``[B,3,H,W]`` in [0,1] for renders ``images``: encode → hybrid forward → sample → decode.

    The teacher's ``encode`` resizes renders to its resolution its own way (Zero123: bicubic); the targets
    are resized back to the renders' size (area averaging when shrinking).
    """
    size = tuple(images.shape[-2:])
    z0 = teacher.encode(images, generator)
    z = hybrid_forward(teacher, z0, t1, t2, cameras, N, generator)
    z = sample(teacher, z, t2, cameras, N, eta, guidance_scale, generator)
    return _resize(teacher.decode(z), size)


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Targets back at the renders' size: exact area averaging when shrinking (progressive low-resolution
    renders of a NeRF), bilinear when enlarging."""
    if tuple(images.shape[-2:]) == size:
        return images
    if size[0] <= images.shape[-2] and size[1] <= images.shape[-1]:
        return area_resize_tensor(images, *size)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def _check_timesteps(t1: int, t2: int, N: int, T: int) -> None:
    """t2 must lie on the DDIM grid and t1 on the inversion grid (or be 0), with t1 ≤ t2."""
    if t2 not in ddim_timesteps(N, T):
        raise ValueError(f"t2={t2} is not a DDIM timestep for N={N}")
    if t1 != 0 and t1 not in inverse_timesteps(N, T):
        raise ValueError(f"t1={t1} is not on the inversion grid for N={N}")
    if t1 > t2:
        raise ValueError(f"t1={t1} must not exceed t2={t2}")
