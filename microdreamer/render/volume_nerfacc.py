"""Adapter to nerfacc 0.5 (CUDA; ``OccGridEstimator.sampling`` and ``render_weight_from_density``), imported
only when used. nerfacc builds its CUDA kernels the first time they run (a few minutes, then cached).

Our :class:`~.occupancy.OccupancyGrid` is handed to a nerfacc estimator unchanged (same cell order), and the
lattice start (``t_entry + offset·dt``) is passed as ``t_min``, so nerfacc marches the same lattice as the
torch and cpu backends; its visibility test and compositing follow the same formulas.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from .types import RaySamples


@cache
def nerfacc_unavailable_reason() -> str | None:
    """``None`` when nerfacc can run here, else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("nerfacc") is None:
        return 'the nerfacc package is not installed (pip install "microdreamer[cuda]"; it compiles on first use)'
    return None


def march_nerfacc(rays_o: Tensor, rays_d: Tensor, binaries: Tensor | None, resolution: int, radius: float,
                  step: float, near: float, far: float, t_min: Tensor,
                  sigma_fn: Callable[[Tensor], Tensor] | None, early_stop_eps: float,
                  alpha_thre: float) -> RaySamples:
    """Marching plus the visibility test in one nerfacc call; ``sigma_fn(points [S,3]) -> [S]``."""
    from nerfacc import OccGridEstimator

    estimator = OccGridEstimator([-radius] * 3 + [radius] * 3, resolution=resolution, levels=1).to(rays_o.device)
    if binaries is None:
        estimator.binaries.fill_(True)
        estimator.occs.fill_(1.0)
    else:
        estimator.binaries.copy_(binaries.view(1, resolution, resolution, resolution))
        estimator.occs.fill_(1.0)  # keeps nerfacc's own clamp of alpha_thre (to the mean occupancy) inert

    def sigmas_at(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
        mids = 0.5 * (t_starts + t_ends)
        return sigma_fn(rays_o[ray_indices] + mids[:, None] * rays_d[ray_indices])

    ray_indices, t_starts, t_ends = estimator.sampling(
        rays_o.float().contiguous(), rays_d.float().contiguous(),
        sigma_fn=None if sigma_fn is None else sigmas_at, near_plane=near, far_plane=far, t_min=t_min.float(),
        render_step_size=step, early_stop_eps=early_stop_eps if sigma_fn is not None else 0.0,
        alpha_thre=alpha_thre, stratified=False,
    )
    return RaySamples.from_ray_indices(ray_indices.long(), t_starts, t_ends, rays_o.shape[0])


def composite_nerfacc(samples: RaySamples, sigmas: Tensor, rgbs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """nerfacc's compositing of packed samples: ``rgb [R,3]``, ``opacity [R]``, ``depth [R]``."""
    from nerfacc import accumulate_along_rays, render_weight_from_density

    n, idx = samples.n_rays, samples.ray_indices
    weights, _, _ = render_weight_from_density(samples.t_starts, samples.t_ends, sigmas, ray_indices=idx, n_rays=n)
    mids = 0.5 * (samples.t_starts + samples.t_ends)
    rgb = accumulate_along_rays(weights, values=rgbs, ray_indices=idx, n_rays=n)
    opacity = accumulate_along_rays(weights, values=None, ray_indices=idx, n_rays=n)
    depth = accumulate_along_rays(weights, values=mids[:, None], ray_indices=idx, n_rays=n)
    return rgb, opacity.squeeze(-1), depth.squeeze(-1)
