"""Mesh rasterization with nvdiffrast on CUDA, same contract as the torch reference.

Only rasterization and depth interpolation run in nvdiffrast; texturing stays in torch
(:mod:`microdreamer.render.mesh`) so every backend shades identically and gradients reach the texture
the same way.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from ..errors import UserError


@cache
def _context(device: torch.device):
    import nvdiffrast.torch as dr

    return dr.RasterizeCudaContext(device=device)


def rasterize_nvdiffrast(
    verts: Tensor, faces: Tensor, width: int, height: int, fx: float, fy: float, cx: float, cy: float,
    near: float, far: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Camera-space ``verts [B,V,3]`` (CUDA) → face id ``[B,H,W]`` (int64, −1 empty), barycentrics of the
    first two face vertices ``[B,H,W,2]``, depth ``[B,H,W]`` (0 empty)."""
    try:
        import nvdiffrast.torch as dr
    except ImportError as exc:
        raise UserError(
            "the nvdiffrast mesh backend needs nvdiffrast (pip install nvdiffrast); or use backend cpu"
        ) from exc
    if verts.device.type != "cuda":
        raise UserError("the nvdiffrast mesh backend needs CUDA tensors; use backend cpu or torch on this device")
    verts = verts.detach().float()
    x, y, z = verts.unbind(-1)
    # OpenCV pixel u = fx·x/z + cx maps to NDC 2u/W − 1, so image row 0 is NDC y = −1: no flip needed.
    clip = torch.stack(
        [
            2 * fx / width * x + (2 * cx / width - 1) * z,
            2 * fy / height * y + (2 * cy / height - 1) * z,
            (far + near) / (far - near) * z - 2 * far * near / (far - near),
            z,
        ],
        dim=-1,
    ).contiguous()
    tri = faces.to(device=verts.device, dtype=torch.int32).contiguous()
    rast, _ = dr.rasterize(_context(verts.device), clip, tri, (height, width))
    depth, _ = dr.interpolate(z[..., None].contiguous(), rast, tri)
    face_id = rast[..., 3].long() - 1
    return face_id, rast[..., :2].contiguous(), depth[..., 0] * (face_id >= 0)
