"""Differentiable NeRF volume rendering of rays with interchangeable backends.

One call, :func:`render_rays`, marches rays through the box ``[-radius, radius]³`` in steps of ``step``
(skipping the cells an :class:`~.occupancy.OccupancyGrid` marks empty), drops the samples that cannot
contribute (transmittance below ``early_stop_eps`` or alpha below ``alpha_thre``, from a density pass
without gradient, as nerfacc's ``OccGridEstimator.sampling`` does), evaluates the field on the rest and
alpha-composites them. Backends: ``"torch"`` (plain PyTorch reference, any device), ``"cpu"`` (C++/OpenMP
kernels with a hand-written backward) and ``"nerfacc"`` (CUDA, when the ``nerfacc`` package is installed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .backends import choose_backend, note_fallback
from .occupancy import OccupancyGrid
from .types import RaySamples
from .volume_cpu import composite_cpu, march_cpu, unavailable_reason, visibility_cpu
from .volume_nerfacc import composite_nerfacc, march_nerfacc, nerfacc_unavailable_reason
from .volume_torch import composite_torch, march_torch, ray_box, visibility_torch

#: ``field(points [S,3], directions [S,3]) -> (density [S], rgb [S,3])``, differentiable
Field = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class MarchSettings:
    """Where and how finely rays are sampled (defaults: nerfacc's, as threestudio calls it)."""

    radius: float  # half-size of the box [-radius, radius]³ the field lives in
    step: float  # distance between samples (threestudio: √3·2·radius / 512)
    near: float = 0.0
    far: float = 1e10
    early_stop_eps: float = 1e-4  # drop samples behind a transmittance below this
    alpha_thre: float = 0.01  # drop samples with alpha below this (capped at the grid's mean occupancy)


@dataclass
class VolumeOutput:
    rgb: Tensor  # [R,3] foreground colour (not yet composited over a background)
    opacity: Tensor  # [R]
    depth: Tensor  # [R] Σ w·t (distance along the unit direction)
    samples: int  # field evaluations with gradient


def available_volume_backends() -> dict[str, bool]:
    """Which backends can run here (``"cpu"`` builds the C++ kernel on first call)."""
    return {"torch": True, "cpu": unavailable_reason() is None, "nerfacc": nerfacc_unavailable_reason() is None}


def resolve_volume_backend(name: str, device: torch.device | str, build: bool = True) -> str:
    """The concrete backend for ``name`` on ``device``.

    ``"auto"`` picks nerfacc on CUDA when it is installed (else torch, with one warning saying what to
    install), the C++ kernel on the CPU when it builds, else torch. An unknown name, or a backend that
    cannot run on ``device``, raises :class:`UserError` (``build=False``: the check before models load, see
    :func:`~.backends.choose_backend`).
    """
    return choose_backend("volume", name, device, unavailable_reason, "nerfacc", nerfacc_unavailable_reason,
                          partial(note_fallback, "NeRF ray marching"), build)


def march_rays(rays_o: Tensor, rays_d: Tensor, settings: MarchSettings, grid: OccupancyGrid | None = None,
               offsets: Tensor | None = None, backend: str = "torch") -> RaySamples:
    """Packed samples on each ray's lattice ``t_entry + (k + offset)·step`` in occupied cells (torch | cpu)."""
    args = (rays_o, rays_d, None if grid is None else grid.binaries, 0 if grid is None else grid.resolution,
            settings.radius, settings.step, settings.near, settings.far, offsets)
    return march_cpu(*args) if backend == "cpu" else march_torch(*args)


def visible(samples: RaySamples, sigmas: Tensor, early_stop_eps: float, alpha_thre: float,
            backend: str = "torch") -> Tensor:
    """Mask of the samples in front of the early-stop point with alpha >= ``alpha_thre`` (torch | cpu)."""
    fn = visibility_cpu if backend == "cpu" else visibility_torch
    return fn(samples, sigmas, early_stop_eps, alpha_thre)


def composite(samples: RaySamples, sigmas: Tensor, rgbs: Tensor, backend: str = "torch") -> tuple[Tensor, Tensor, Tensor]:
    """Alpha compositing of packed samples: ``rgb [R,3]``, ``opacity [R]``, ``depth [R]``."""
    fn = {"cpu": composite_cpu, "nerfacc": composite_nerfacc}.get(backend, composite_torch)
    return fn(samples, sigmas, rgbs)


def render_rays(
    rays_o: Tensor,
    rays_d: Tensor,
    field: Field,
    settings: MarchSettings,
    grid: OccupancyGrid | None = None,
    density: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> VolumeOutput:
    """Render rays ``rays_o``/``rays_d [R,3]`` (unit directions) through ``field``.

    ``density(points) -> [S]`` (no gradient needed) enables the visibility pruning; without it every
    marched sample is evaluated. With ``generator`` the lattice of each ray is shifted by a random
    fraction of a step (stratified sampling, for training).
    """
    name = resolve_volume_backend(backend, rays_o.device)
    offsets = None
    if generator is not None:
        offsets = torch.rand(rays_o.shape[0], generator=generator, device=generator.device).to(rays_o.device)
    alpha_thre = settings.alpha_thre
    if grid is not None and alpha_thre > 0:
        alpha_thre = min(alpha_thre, float(grid.occs.mean()))
    with torch.no_grad():
        if name == "nerfacc":
            entry = ray_box(rays_o, rays_d, settings.radius)[0].clamp_min(settings.near)
            t_min = entry if offsets is None else entry + offsets * settings.step
            samples = march_nerfacc(rays_o, rays_d, None if grid is None else grid.binaries,
                                    0 if grid is None else grid.resolution, settings.radius, settings.step,
                                    settings.near, settings.far, t_min, density, settings.early_stop_eps, alpha_thre)
        else:
            samples = march_rays(rays_o, rays_d, settings, grid, offsets, name)
            if density is not None and len(samples):
                keep = visible(samples, density(samples.midpoints(rays_o, rays_d)), settings.early_stop_eps,
                               alpha_thre, name)
                samples = samples.select(keep)
    sigmas, rgbs = field(samples.midpoints(rays_o, rays_d), rays_d[samples.ray_indices])
    rgb, opacity, depth = composite(samples, sigmas, rgbs, name)
    return VolumeOutput(rgb, opacity, depth, len(samples))
