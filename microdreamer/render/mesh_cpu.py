"""Mesh rasterization with the C++/OpenMP z-buffer kernel (``csrc/mesh.cpp``), same contract as the
torch reference (:func:`microdreamer.render.mesh_torch.rasterize_torch`)."""

from __future__ import annotations

from torch import Tensor

from ._build import load_extension


def rasterize_cpu(
    verts: Tensor, faces: Tensor, width: int, height: int, fx: float, fy: float, cx: float, cy: float,
    near: float, far: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Camera-space ``verts [B,V,3]`` → face id ``[B,H,W]`` (int64, −1 empty), barycentrics ``[B,H,W,2]``,
    depth ``[B,H,W]``; results come back on the device of ``verts``. Raises ``ExtensionUnavailable``."""
    kernel = load_extension("mesh")
    face_id, bary, depth = kernel.rasterize(
        verts.detach().float().cpu(), faces.cpu(), width, height, fx, fy, cx, cy, near, far
    )
    device = verts.device
    return face_id.long().to(device), bary.to(device), depth.to(device)
