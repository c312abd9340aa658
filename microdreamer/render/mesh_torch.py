"""Reference mesh rasterizer in plain PyTorch: every pixel against every triangle, in chunks.

Same contract and the same arithmetic as the C++ kernel (``csrc/mesh.cpp``): for the ray through a
pixel, d = ((u − cx)/fx, (v − cy)/fy, 1), the unnormalised barycentrics are w_i = d · (p_j × p_k), the
hit depth is det(p0, p1, p2) / Σw, and a pixel is covered when all w_i share the sign of their sum
and the depth lies in (near, far). Both faces are drawn; on equal depth the lower face index wins.
Works on any device; cost is pixels × faces, so keep it to small images (tests, fallbacks).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: pixel × triangle pairs evaluated at once (bounds the temporary memory to a few tens of MB)
_PAIRS_PER_CHUNK = 1 << 20


def triangle_setup(verts: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Per-triangle edge vectors ``a [B,F,3,3]`` (a[..., i, :] = p_j × p_k) and ``det [B,F]``."""
    p = verts[:, faces]  # [B,F,3,3]
    p0, p1, p2 = p.unbind(2)
    a = torch.stack([torch.linalg.cross(p1, p2), torch.linalg.cross(p2, p0), torch.linalg.cross(p0, p1)], dim=2)
    return a, (p0 * a[:, :, 0]).sum(-1)


def _pixel_bounds(
    verts: Tensor, faces: Tensor, width: int, height: int, fx: float, fy: float, cx: float, cy: float,
    near: float, far: float,
) -> Tensor:
    """Inclusive pixel ranges ``[F,4]`` (x0, x1, y0, y1) each triangle may cover; empty (x0 > x1) when the
    triangle lies wholly behind the near or beyond the far plane. One pixel of slack, as in the C++ kernel."""
    p = verts[faces]  # [F,3,3]
    z = p[..., 2]
    in_front = z > near
    safe_z = torch.where(in_front, z, 1.0)
    crossing = in_front.any(-1) & ~in_front.all(-1)  # unbounded projection: the whole image
    visible = in_front.any(-1) & (z < far).any(-1)
    bounds = []
    for coord, focal, centre, size in ((p[..., 0], fx, cx, width), (p[..., 1], fy, cy, height)):
        q = focal * coord / safe_z + centre
        lo = torch.where(crossing, 0.0, (q.amin(-1) - 0.5).floor() - 1).clamp(0, size - 1)
        hi = torch.where(crossing, size - 1.0, (q.amax(-1) - 0.5).ceil() + 1).clamp(0, size - 1)
        bounds += [torch.where(visible, lo, 1.0), torch.where(visible, hi, 0.0)]
    return torch.stack(bounds, -1).long()


def rasterize_torch(
    verts: Tensor, faces: Tensor, width: int, height: int, fx: float, fy: float, cx: float, cy: float,
    near: float, far: float, tile: int = 16,
) -> tuple[Tensor, Tensor, Tensor]:
    """Camera-space ``verts [B,V,3]`` (OpenCV) and ``faces [F,3]`` → face id ``[B,H,W]`` (int64, −1 empty),
    barycentrics of the first two face vertices ``[B,H,W,2]``, depth ``[B,H,W]`` (0 empty). No gradients.

    The image is cut into ``tile``×``tile`` tiles; each tests only triangles whose pixel range meets it.
    """
    verts = verts.detach().float()
    batch, device = verts.shape[0], verts.device
    a, det = triangle_setup(verts, faces)
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5 - cx) / fx
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5 - cy) / fy
    face_id = torch.full((batch, height, width), -1, dtype=torch.int64, device=device)
    bary = torch.zeros(batch, height, width, 2, device=device)
    depth = torch.zeros(batch, height, width, device=device)
    for b in range(batch):
        x0, x1, y0, y1 = _pixel_bounds(verts[b], faces, width, height, fx, fy, cx, cy, near, far).unbind(-1)
        for r0 in range(0, height, tile):
            r1 = min(height, r0 + tile)
            in_rows = (y0 < r1) & (y1 >= r0) & (x0 <= x1)
            for c0 in range(0, width, tile):
                c1 = min(width, c0 + tile)
                candidates = (in_rows & (x0 < c1) & (x1 >= c0)).nonzero()[:, 0]
                if len(candidates) == 0:
                    continue
                x = xs[c0:c1].repeat(r1 - r0)[:, None, None]
                y = ys[r0:r1].repeat_interleave(c1 - c0)[:, None, None]
                ids, bc, zs = _nearest_hit(a[b], det[b], candidates, x, y, near, far)
                shape = (r1 - r0, c1 - c0)
                face_id[b, r0:r1, c0:c1] = ids.view(shape)
                bary[b, r0:r1, c0:c1] = bc.view(*shape, 2)
                depth[b, r0:r1, c0:c1] = zs.view(shape)
    return face_id, bary, depth


def _nearest_hit(
    a: Tensor, det: Tensor, candidates: Tensor, x: Tensor, y: Tensor, near: float, far: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Closest hit among ``candidates`` (ascending face indices) for pixel rays ``(x, y, 1)`` ``[P,1,1]``."""
    pixels = x.shape[0]
    face_id = torch.full((pixels,), -1, dtype=torch.int64, device=x.device)
    bary = torch.zeros(pixels, 2, device=x.device)
    depth = torch.full((pixels,), float("inf"), device=x.device)
    index = torch.arange(pixels, device=x.device)
    chunk = max(1, _PAIRS_PER_CHUNK // pixels)
    for start in range(0, len(candidates), chunk):
        ids = candidates[start:start + chunk]
        ab = a[ids]
        w = ab[:, :, 0] * x + (ab[:, :, 1] * y + ab[:, :, 2])  # [P,Fc,3]
        s = w.sum(-1)
        z = det[ids] / s
        hit = (w * s[..., None] >= 0).all(-1) & (s != 0) & (z > near) & (z < far)
        zmin, arg = torch.where(hit, z, torch.inf).min(-1)
        better = zmin < depth
        depth = torch.where(better, zmin, depth)
        face_id = torch.where(better, ids[arg], face_id)
        bary = torch.where(better[:, None], w[index, arg, :2] / s[index, arg, None], bary)
    return face_id, bary, torch.where(face_id >= 0, depth, 0.0)
