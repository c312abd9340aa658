"""Plain-PyTorch reference of the volume renderer's three stages (any device; autograd gives the backward).

1. :func:`march_torch`: samples on the lattice ``t_k = t_entry + (k + offset)·dt`` of each ray inside the
   box ``[-radius, radius]³``; sample k spans ``[t_k, t_k + dt]`` and is kept when its midpoint lies
   before the exit and in an occupied cell of the grid. All lattice points of all rays are formed at
   once (``[R, K]``, float64), which is simple and memory-hungry: a reference, not a fast path.
2. :func:`visibility_torch`: a sample is visible while the transmittance in front of it is at least
   ``early_stop_eps`` and its alpha reaches ``alpha_thre`` (nerfacc's ``render_visibility_from_density``).
3. :func:`composite_torch`: ``w_i = T_i·(1 − exp(−σ_i·dt_i))`` with ``T_i = exp(−Σ_{j<i} σ_j·dt_j)``;
   colour, opacity and depth are the weighted sums along each ray. The per-ray prefix sums are a
   float64 cumulative sum over all samples minus its value at the ray's first sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .types import RaySamples

_TINY_DIRECTION = 1e-12  # |d| components below this are nudged to it: no infinities in the slab test


def ray_box(rays_o: Tensor, rays_d: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Entry and exit distances (float64) of rays through ``[-radius, radius]³`` (exit <= entry: a miss)."""
    o, d = rays_o.double(), rays_d.double()
    d = torch.where(d.abs() < _TINY_DIRECTION, torch.where(d < 0, -_TINY_DIRECTION, _TINY_DIRECTION).to(d), d)
    inv = 1.0 / d
    ta, tb = (-radius - o) * inv, (radius - o) * inv
    return torch.minimum(ta, tb).amax(-1), torch.maximum(ta, tb).amin(-1)


@torch.no_grad()
def march_torch(rays_o: Tensor, rays_d: Tensor, binaries: Tensor | None, resolution: int, radius: float,
                step: float, near: float, far: float, offsets: Tensor | None) -> RaySamples:
    """Packed samples of ``rays_o``/``rays_d [R,3]`` (see the module docstring); ``binaries [res³]`` or None.
    The lattice is computed in float64 and its ends rounded to float32 (as the C++ kernel does)."""
    n_rays = rays_o.shape[0]
    t0, t1 = ray_box(rays_o, rays_d, radius)
    t0, t1 = t0.clamp_min(near), t1.clamp_max(far)
    hit = t1 > t0
    span = torch.where(hit, t1 - t0, torch.zeros_like(t0))
    k_max = int(torch.ceil(span.max() / step).item()) + 1 if n_rays and hit.any() else 0
    k = torch.arange(k_max, device=rays_o.device, dtype=torch.float64)
    offset = torch.zeros_like(t0) if offsets is None else offsets.to(t0)
    starts = t0[:, None] + (k[None, :] + offset[:, None]) * step  # [R,K]
    mids = starts + 0.5 * step
    keep = hit[:, None] & (mids < t1[:, None])
    if binaries is not None:
        points = rays_o.double()[:, None, :] + mids[..., None] * rays_d.double()[:, None, :]
        ijk = torch.floor((points + radius) * (resolution / (2.0 * radius))).long().clamp(0, resolution - 1)
        cell = (ijk[..., 0] * resolution + ijk[..., 1]) * resolution + ijk[..., 2]
        keep &= binaries[cell]
    ray_indices, column = keep.nonzero(as_tuple=True)
    t_starts = starts[ray_indices, column]
    return RaySamples.from_ray_indices(ray_indices, t_starts.float(), (t_starts + step).float(), n_rays)


def _exclusive_optical_depth(samples: RaySamples, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """``s_i = σ_i·dt_i`` and ``Σ_{j<i} s_j`` within each ray (float64)."""
    s = sigmas.double() * (samples.t_ends - samples.t_starts).double()
    inclusive = torch.cumsum(s, 0)
    first = samples.packed_info[:, 0]
    before_ray = (inclusive - s)[first.clamp_max(max(s.numel() - 1, 0))] if s.numel() else inclusive
    return s, inclusive - s - before_ray[samples.ray_indices]


@torch.no_grad()
def visibility_torch(samples: RaySamples, sigmas: Tensor, early_stop_eps: float, alpha_thre: float) -> Tensor:
    """Boolean mask of the samples that can contribute (see the module docstring)."""
    s, before = _exclusive_optical_depth(samples, sigmas)
    mask = torch.exp(-before) >= early_stop_eps
    if alpha_thre > 0:
        mask &= -torch.expm1(-s) >= alpha_thre
    return mask


def composite_torch(samples: RaySamples, sigmas: Tensor, rgbs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``rgb [R,3]``, ``opacity [R]``, ``depth [R]`` (Σ w·t_mid) of packed ``sigmas [S]``, ``rgbs [S,3]``."""
    s, before = _exclusive_optical_depth(samples, sigmas)
    weights = torch.exp(-before) * -torch.expm1(-s)
    mids = 0.5 * (samples.t_starts + samples.t_ends).double()
    n, idx = samples.n_rays, samples.ray_indices
    zeros = weights.new_zeros
    rgb = zeros(n, 3).index_add(0, idx, weights[:, None] * rgbs.double())
    opacity = zeros(n).index_add(0, idx, weights)
    depth = zeros(n).index_add(0, idx, weights * mids)
    return rgb.float(), opacity.float(), depth.float()
