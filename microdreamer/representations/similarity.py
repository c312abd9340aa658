"""Similarity transforms (uniform scale, rotation, translation) of 3D Gaussians between world frames.

``x ↦ s·R·x + t`` moves every mean; a covariance ``R_g·S²·R_gᵀ`` becomes ``(R·R_g)·(s·S)²·(R·R_g)ᵀ``,
so log-scales shift by ``log s`` and each rotation quaternion is left-multiplied by the quaternion of
``R``. Opacities and the view-independent (SH degree 0) colours do not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..io.ply import GaussianPLY


def matrix_to_quaternion(rotation: Tensor) -> Tensor:
    """The unit quaternion (w, x, y, z), w ≥ 0, of a 3×3 rotation matrix (float64).

    Computed from the largest of 1 + trace and the three 1 + 2·R_ii − trace, so that the square root
    never takes a small, cancellation-prone argument."""
    r = rotation.double()
    trace = r[0, 0] + r[1, 1] + r[2, 2]
    candidates = torch.stack([1 + trace, 1 + 2 * r[0, 0] - trace, 1 + 2 * r[1, 1] - trace, 1 + 2 * r[2, 2] - trace])
    k = int(candidates.argmax())
    root = candidates[k].clamp_min(0).sqrt()  # 2·|q_k|
    if k == 0:
        q = [root / 2, (r[2, 1] - r[1, 2]) / (2 * root), (r[0, 2] - r[2, 0]) / (2 * root), (r[1, 0] - r[0, 1]) / (2 * root)]
    elif k == 1:
        q = [(r[2, 1] - r[1, 2]) / (2 * root), root / 2, (r[0, 1] + r[1, 0]) / (2 * root), (r[0, 2] + r[2, 0]) / (2 * root)]
    elif k == 2:
        q = [(r[0, 2] - r[2, 0]) / (2 * root), (r[0, 1] + r[1, 0]) / (2 * root), root / 2, (r[1, 2] + r[2, 1]) / (2 * root)]
    else:
        q = [(r[1, 0] - r[0, 1]) / (2 * root), (r[0, 2] + r[2, 0]) / (2 * root), (r[1, 2] + r[2, 1]) / (2 * root), root / 2]
    quat = torch.stack(q)
    return quat if quat[0] >= 0 else -quat


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a ⊗ b`` of (w, x, y, z) quaternions, broadcast over leading dimensions:
    the rotation of ``b`` followed by that of ``a``."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], -1)


@dataclass(frozen=True)
class Similarity:
    """``x ↦ scale·rotation·x + translation`` with ``scale > 0`` and ``rotation`` a proper rotation."""

    scale: float
    rotation: Tensor  # [3,3]
    translation: Tensor  # [3]

    def __post_init__(self) -> None:
        r = self.rotation.double()
        if self.scale <= 0 or not torch.allclose(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-6) \
                or torch.linalg.det(r) < 0:
            raise ValueError("a similarity needs a positive scale and a proper rotation matrix")

    def points(self, x: Tensor) -> Tensor:
        """Transformed points ``[..., 3]``."""
        rotation = self.rotation.to(x)
        return self.scale * x @ rotation.T + self.translation.to(x)

    def apply(self, gaussians: GaussianPLY) -> GaussianPLY:
        """The same Gaussians in the target frame (raw parameters, as stored in a PLY)."""
        if gaussians.f_rest.shape[1]:
            raise ValueError("transforming Gaussians with higher SH bands would need SH rotation; only degree 0 is supported")
        q = matrix_to_quaternion(self.rotation).to(gaussians.rotation)
        return GaussianPLY(
            means=self.points(gaussians.means),
            f_dc=gaussians.f_dc.clone(),
            f_rest=gaussians.f_rest.clone(),
            opacity=gaussians.opacity.clone(),
            scale=gaussians.scale + math.log(self.scale),
            rotation=quaternion_multiply(q, gaussians.rotation),
        )
