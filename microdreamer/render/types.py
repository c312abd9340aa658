"""What every renderer returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RenderOutput:
    """Renders of B cameras. ``rgb`` is composited over the background.

    ``depth`` is the alpha-weighted camera-space depth sum (divide by ``alpha`` for the expected depth).
    ``extras`` carries primitive-specific tensors, e.g. Gaussians' ``means2d`` (screen-space centres
    whose gradient drives densification) and ``radii``.
    """

    rgb: Tensor  # [B,3,H,W] in [0,1]
    alpha: Tensor  # [B,1,H,W]
    depth: Tensor  # [B,1,H,W]
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class RaySamples:
    """Packed samples of ``n_rays`` rays, grouped by ray in marching order.

    Sample i spans ``[t_starts[i], t_ends[i]]`` (distances along unit directions) on ray ``ray_indices[i]``;
    ray r owns rows ``packed_info[r, 0] .. packed_info[r, 0] + packed_info[r, 1] − 1``.
    """

    ray_indices: Tensor  # [S] int64
    t_starts: Tensor  # [S]
    t_ends: Tensor  # [S]
    packed_info: Tensor  # [R,2] int64: first row, count

    @property
    def n_rays(self) -> int:
        return self.packed_info.shape[0]

    def __len__(self) -> int:
        return self.t_starts.shape[0]

    @classmethod
    def from_ray_indices(cls, ray_indices: Tensor, t_starts: Tensor, t_ends: Tensor, n_rays: int) -> "RaySamples":
        """Samples already grouped by ray (``ray_indices`` non-decreasing)."""
        counts = torch.bincount(ray_indices, minlength=n_rays)
        first = torch.cumsum(counts, 0) - counts
        return cls(ray_indices, t_starts, t_ends, torch.stack([first, counts], -1))

    def select(self, mask: Tensor) -> "RaySamples":
        """The samples where ``mask [S]`` is true, still packed."""
        return RaySamples.from_ray_indices(self.ray_indices[mask], self.t_starts[mask], self.t_ends[mask],
                                           self.n_rays)

    def midpoints(self, rays_o: Tensor, rays_d: Tensor) -> Tensor:
        """World positions ``[S,3]`` of the samples' midpoints."""
        mids = 0.5 * (self.t_starts + self.t_ends)
        return rays_o[self.ray_indices] + mids[:, None] * rays_d[self.ray_indices]
