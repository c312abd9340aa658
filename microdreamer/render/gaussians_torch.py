"""Plain-PyTorch 3D Gaussian splatting: the EWA projection every backend shares and the reference
rasterizers (dense brute force and 16×16-tiled), differentiated by autograd.

Semantics follow 3DGS / gsplat ("classic" mode):

* Projection: camera-space centre ``p = R·x + t`` (OpenCV view matrix), pixel centre
  ``(fx·x/z + cx, fy·y/z + cy)`` with pixel centres at integer + 0.5; perspective Jacobian with
  ``x/z`` and ``y/z`` clamped to the field of view widened by 30 % (1.3·tan(fov/2) for a centred
  principal point); 2D covariance ``J W Σ Wᵀ Jᵀ + 0.3·I``; ``conic`` = its inverse as ``(a, b, c)``
  with ``power = ½(a·dx² + c·dy²) + b·dx·dy``; ``radius = ceil(3·sqrt(λ_max))``. Gaussians with
  ``z <= near`` or ``z > far``, a degenerate covariance or a footprint entirely off-screen get
  radius 0 and are not drawn.
* Tiles: a Gaussian is evaluated at every pixel of every 16×16 tile its ``radius`` square touches
  (tiles ``floor((m − r)/16) … ceil((m + r)/16) − 1``, gsplat's rule), so the reference and the
  tiled kernels see exactly the same pixel/Gaussian pairs.
* Compositing, front to back by camera depth: ``alpha = min(0.99, opacity·exp(−power))``; pairs
  with ``alpha < 1/255`` are skipped; a pixel stops before the Gaussian that would take its
  transmittance below ``1e-4``. ``rgb = Σ wᵢcᵢ + T·background``, ``alpha = 1 − T``,
  ``depth = Σ wᵢzᵢ`` (not normalised), with ``wᵢ = alphaᵢ·Tᵢ``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..sir.cameras import Cameras

TILE = 16
EPS2D = 0.3  # low-pass dilation added to the 2D covariance (pixels²)
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
FOV_MARGIN = 0.3  # the Jacobian's x/z, y/z clamp: tan(fov/2) widened by this fraction


class Projection(NamedTuple):
    """Screen-space Gaussians for B cameras (everything ``[B,N,…]``)."""

    means2d: Tensor  # [B,N,2] pixel-space centres (differentiable)
    conics: Tensor  # [B,N,3] inverse 2D covariance (a, b, c) (differentiable)
    depths: Tensor  # [B,N] camera-space z (differentiable)
    radii: Tensor  # [B,N] int32, 0 = not drawn
    tile_rects: Tensor  # [B,N,4] int32 tile range (x0, y0, x1, y1), ends exclusive; empty if radius 0
    width: int
    height: int


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """``[N,3,3]`` rotation matrices from (w, x, y, z) quaternions (normalised here)."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quats.shape[:-1], 3, 3)


def project_gaussians(means: Tensor, quats: Tensor, scales: Tensor, cameras: Cameras) -> Projection:
    """EWA-project N Gaussians (activated scales, any-norm quaternions) into every camera."""
    width, height = cameras.width, cameras.height
    viewmats = cameras.viewmats().to(means)  # [B,4,4]
    ks = cameras.intrinsics().to(means)  # [B,3,3]
    rot, trans = viewmats[:, None, :3, :3], viewmats[:, None, :3, 3]  # [B,1,3,3], [B,1,3]
    fx, fy = ks[:, 0, 0, None], ks[:, 1, 1, None]  # [B,1]
    cx, cy = ks[:, 0, 2, None], ks[:, 1, 2, None]

    p = (rot * means[None, :, None, :]).sum(-1) + trans  # [B,N,3]
    x, y, z = p.unbind(-1)
    in_depth = (z > cameras.near) & (z <= cameras.far)
    zs = torch.where(in_depth, z, torch.ones_like(z))  # keeps culled entries finite in backward

    lim_x_pos = (width - cx) / fx + FOV_MARGIN * 0.5 * width / fx
    lim_x_neg = cx / fx + FOV_MARGIN * 0.5 * width / fx
    lim_y_pos = (height - cy) / fy + FOV_MARGIN * 0.5 * height / fy
    lim_y_neg = cy / fy + FOV_MARGIN * 0.5 * height / fy
    tx = zs * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / zs))
    ty = zs * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / zs))
    zeros = torch.zeros_like(zs)
    jac = torch.stack(
        [fx / zs, zeros, -fx * tx / (zs * zs), zeros, fy / zs, -fy * ty / (zs * zs)], dim=-1
    ).reshape(*zs.shape, 2, 3)  # [B,N,2,3]

    m = quat_to_rotmat(quats) * scales[:, None, :]  # R·diag(s), [N,3,3]
    cov3d = m @ m.transpose(-1, -2)  # [N,3,3]
    jw = (jac[..., :, :, None] * rot[..., None, :, :]).sum(-2)  # J·W, [B,N,2,3]
    jws = (jw[..., :, :, None] * cov3d[None, :, None, :, :]).sum(-2)  # J·W·Σ, [B,N,2,3]
    a = (jws[..., 0, :] * jw[..., 0, :]).sum(-1) + EPS2D
    b = (jws[..., 0, :] * jw[..., 1, :]).sum(-1)
    c = (jws[..., 1, :] * jw[..., 1, :]).sum(-1) + EPS2D
    det = a * c - b * b
    ok = in_depth & (det > 0)
    det_s = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_s, -b / det_s, a / det_s], dim=-1)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], dim=-1)

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam = mid + (mid * mid - det).clamp_min(0.01).sqrt()
        radius = torch.ceil(3.0 * lam.sqrt())
        mx, my = means2d.unbind(-1)
        on_screen = (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        visible = ok & on_screen
        radii = torch.where(visible, radius, torch.zeros_like(radius)).int()
        tile_rects = _tile_rects(means2d.detach(), radius, visible, width, height)
    return Projection(means2d, conics, z, radii, tile_rects, width, height)


def _tile_rects(means2d: Tensor, radius: Tensor, visible: Tensor, width: int, height: int) -> Tensor:
    tw, th = math.ceil(width / TILE), math.ceil(height / TILE)
    mx, my = means2d.unbind(-1)
    x0 = torch.floor((mx - radius) / TILE).clamp(0, tw)
    x1 = torch.ceil((mx + radius) / TILE).clamp(0, tw)
    y0 = torch.floor((my - radius) / TILE).clamp(0, th)
    y1 = torch.ceil((my + radius) / TILE).clamp(0, th)
    rects = torch.stack([x0, y0, x1, y1], dim=-1).int()
    return torch.where(visible[..., None], rects, torch.zeros_like(rects))


def _composite(
    pix: Tensor, means2d: Tensor, conics: Tensor, opac: Tensor, feats: Tensor, member: Tensor
) -> tuple[Tensor, Tensor]:
    """Front-to-back compositing of depth-sorted Gaussians at pixel centres.

    ``pix [...,P,2]``; ``means2d [...,K,2]``, ``conics [...,K,3]``, ``opac [...,K]``,
    ``feats [...,K,F]`` sorted front to back; ``member [...,P,K]`` says which pairs are evaluated.
    Returns the weighted feature sum ``[...,P,F]`` and the final transmittance ``[...,P]``.
    """
    d = means2d[..., None, :, :] - pix[..., :, None, :]  # [...,P,K,2]
    dx, dy = d.unbind(-1)
    ca, cb, cc = (t[..., None, :] for t in conics.unbind(-1))
    power = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
    alpha = (opac[..., None, :] * torch.exp(-power)).clamp(max=ALPHA_MAX)
    with torch.no_grad():
        valid = member & (power >= 0) & (alpha >= ALPHA_MIN)
        t_next = torch.cumprod(1 - alpha * valid, dim=-1)
        used = valid & (t_next >= T_MIN)
    a = alpha * used
    t_incl = torch.cumprod(1 - a, dim=-1)
    t_excl = torch.cat([torch.ones_like(t_incl[..., :1]), t_incl[..., :-1]], dim=-1)
    weights = a * t_excl  # [...,P,K]
    t_final = t_incl[..., -1] if t_incl.shape[-1] else torch.ones_like(t_incl.sum(-1))
    return weights @ feats, t_final


def _finish(acc: Tensor, t_final: Tensor, background: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``acc [B,H,W,4]`` (rgb, depth sums) and ``t_final [B,H,W]`` → rgb, alpha, depth images."""
    rgb = acc[..., :3] + t_final[..., None] * background.to(acc)
    return rgb.permute(0, 3, 1, 2), (1 - t_final)[:, None], acc[..., 3][:, None]


def _features(proj: Projection, colors: Tensor) -> Tensor:
    """Per-view features to composite: ``[B,N,4]`` = rgb and camera depth."""
    return torch.cat([colors.expand(proj.depths.shape[0], -1, -1), proj.depths[..., None]], dim=-1)


def _pixel_centres(width: int, height: int, like: Tensor) -> Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(height, device=like.device), torch.arange(width, device=like.device), indexing="ij"
    )
    return torch.stack([xs, ys], dim=-1).to(like.dtype) + 0.5  # [H,W,2]


def rasterize_dense(
    proj: Projection, opacities: Tensor, colors: Tensor, background: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Brute force: every pixel against every Gaussian (memory ∝ B·H·W·N; small sizes only).

    Returns ``rgb [B,3,H,W]``, ``alpha [B,1,H,W]``, ``depth [B,1,H,W]``.
    """
    width, height = proj.width, proj.height
    b = proj.depths.shape[0]
    order = _depth_order(proj.depths)  # [B,N]
    means2d, conics = _gather_views(proj.means2d, order), _gather_views(proj.conics, order)
    rects, feats = _gather_views(proj.tile_rects, order), _gather_views(_features(proj, colors), order)
    opac = opacities[order]
    pix = _pixel_centres(width, height, means2d).reshape(1, -1, 2)  # [1,P,2]
    tile = (pix.detach() // TILE).long()  # each pixel's tile (x, y)
    tx, ty = tile[..., 0, None], tile[..., 1, None]  # [1,P,1]
    x0, y0, x1, y1 = (r[:, None, :] for r in rects.unbind(-1))  # [B,1,N]
    member = (tx >= x0) & (tx < x1) & (ty >= y0) & (ty < y1)
    acc, t_final = _composite(pix, means2d, conics, opac, feats, member)
    return _finish(acc.reshape(b, height, width, 4), t_final.reshape(b, height, width), background)


def _gather_views(t: Tensor, order: Tensor) -> Tensor:
    """``t [B,N,C]`` reordered along N by ``order [B,N]``."""
    return torch.gather(t, 1, order[..., None].expand_as(t))


def _depth_order(depths: Tensor) -> Tensor:
    return torch.sort(depths.detach(), dim=-1, stable=True).indices


def tile_pairs(proj: Projection) -> tuple[Tensor, Tensor]:
    """Every (tile, Gaussian) pair, sorted by tile then depth (stable: ties keep Gaussian order).

    Tiles are numbered over all views, ``b·tiles_per_view + ty·tiles_x + tx``; Gaussians by ``b·N + i``.
    """
    b, n = proj.depths.shape
    tw, th = math.ceil(proj.width / TILE), math.ceil(proj.height / TILE)
    rects = proj.tile_rects.reshape(-1, 4).long()
    x0, y0, x1, y1 = rects.unbind(-1)
    span_x = x1 - x0
    counts = span_x * (y1 - y0)
    order = _depth_order(proj.depths).add(torch.arange(b, device=rects.device)[:, None] * n).reshape(-1)
    gauss = torch.repeat_interleave(order, counts[order])
    starts = torch.cumsum(counts[order], 0) - counts[order]
    k = torch.arange(gauss.numel(), device=rects.device) - torch.repeat_interleave(starts, counts[order])
    tx = x0[gauss] + k % span_x[gauss]
    ty = y0[gauss] + k // span_x[gauss]
    tiles = (gauss // n) * (tw * th) + ty * tw + tx
    tiles, perm = torch.sort(tiles, stable=True)
    return tiles, gauss[perm]


def rasterize_tiled(
    proj: Projection,
    opacities: Tensor,
    colors: Tensor,
    background: Tensor,
    chunk_elements: int = 1 << 22,
) -> tuple[Tensor, Tensor, Tensor]:
    """16×16 tiles, each against its own Gaussian list (padded), in checkpointed chunks.

    ``chunk_elements`` bounds tiles × 256 pixels × list length per chunk; chunks recompute their
    forward in backward, so memory stays near one chunk's working set. Same outputs as
    :func:`rasterize_dense`.
    """
    b, n = proj.depths.shape
    width, height = proj.width, proj.height
    tw, th = math.ceil(width / TILE), math.ceil(height / TILE)
    n_tiles = b * tw * th
    dev = proj.depths.device
    tiles, gauss = tile_pairs(proj)
    counts = torch.bincount(tiles, minlength=n_tiles)
    kmax = max(int(counts.max()) if counts.numel() else 0, 1)
    first = torch.cumsum(counts, 0) - counts
    slots = torch.full((n_tiles, kmax), -1, dtype=torch.long, device=dev)
    slots[tiles, torch.arange(tiles.numel(), device=dev) - first[tiles]] = gauss

    means2d = proj.means2d.reshape(b * n, 2)
    conics = proj.conics.reshape(b * n, 3)
    feats = _features(proj, colors).reshape(b * n, 4)
    opac = opacities.repeat(b)
    local = _pixel_centres(TILE, TILE, means2d).reshape(1, TILE * TILE, 2)

    by_count = torch.argsort(counts, descending=True)
    acc_chunks, t_chunks, done = [], [], 0
    while done < n_tiles:
        k = max(int(counts[by_count[done]]), 1)
        size = max(1, chunk_elements // (TILE * TILE * k))
        ids = by_count[done: done + size]
        done += ids.numel()
        idx = slots[ids, :k]
        origin = torch.stack([(ids % (tw * th)) % tw, (ids % (tw * th)) // tw], -1).to(means2d) * TILE
        args = (local + origin[:, None, :], means2d, conics, opac, feats, idx)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args[1:5]):
            acc, t_final = checkpoint(_tile_chunk, *args, use_reentrant=False)
        else:
            acc, t_final = _tile_chunk(*args)
        acc_chunks.append(acc)
        t_chunks.append(t_final)
    inverse = torch.argsort(by_count)
    acc = torch.cat(acc_chunks)[inverse]  # [n_tiles,256,4]
    t_final = torch.cat(t_chunks)[inverse]  # [n_tiles,256]

    def image(t: Tensor) -> Tensor:  # [n_tiles,256,…] → [B,H,W,…]
        rest = t.shape[2:]
        t = t.reshape(b, th, tw, TILE, TILE, *rest).transpose(2, 3).reshape(b, th * TILE, tw * TILE, *rest)
        return t[:, :height, :width]

    return _finish(image(acc), image(t_final), background)


def _tile_chunk(
    pix: Tensor, means2d: Tensor, conics: Tensor, opac: Tensor, feats: Tensor, idx: Tensor
) -> tuple[Tensor, Tensor]:
    member = (idx >= 0)[:, None, :].expand(-1, pix.shape[1], -1)
    safe = idx.clamp_min(0)
    return _composite(pix, means2d[safe], conics[safe], opac[safe], feats[safe], member)


def rasterize_torch(
    proj: Projection, opacities: Tensor, colors: Tensor, background: Tensor, dense_limit: int = 1 << 22
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense when B·H·W·N ≤ ``dense_limit``, tiled otherwise."""
    b, n = proj.depths.shape
    if b * proj.width * proj.height * n <= dense_limit:
        return rasterize_dense(proj, opacities, colors, background)
    return rasterize_tiled(proj, opacities, colors, background)
