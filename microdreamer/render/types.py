"""What every renderer returns."""

from __future__ import annotations

from dataclasses import dataclass, field

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
