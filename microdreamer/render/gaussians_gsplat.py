"""Adapter to ``gsplat.rasterization`` (CUDA; gsplat 1.4 / 1.5 API), imported only when used.

gsplat is called in "classic" mode with ``packed=False``, ``eps2d=0.3``, 16-pixel tiles and
``render_mode="RGB+D"`` (accumulated, unnormalised depth), which matches the torch/cpu backends
except for gsplat's own constants: it clamps alpha at 0.999 (not 0.99), and gsplat ≥ 1.5 bounds
tiles by an opacity-aware radius instead of 3σ; both only matter for Gaussians whose opacity
exceeds about 0.35 at 3σ or 0.99 at the centre.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
from torch import Tensor

from ..sir.cameras import Cameras
from .types import RenderOutput


@cache
def gsplat_unavailable_reason() -> str | None:
    """``None`` when gsplat can run here, else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("gsplat") is None:
        return 'the gsplat package is not installed (pip install "microdreamer[cuda]")'
    return None


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cameras: Cameras,
    background: Tensor,
) -> RenderOutput:
    """Same contract as :func:`~.gaussians.rasterize_gaussians` (CUDA float32 tensors)."""
    from gsplat import rasterization

    cams = cameras.to(means.device)
    viewmats = cams.viewmats().float()
    ks = cams.intrinsics().float()
    backgrounds = background.float().expand(len(cams), 3).contiguous()
    render, alphas, meta = rasterization(
        means.float(), quats.float(), scales.float(), opacities.float(), colors.float(),
        viewmats, ks, cams.width, cams.height,
        near_plane=cams.near, far_plane=cams.far, eps2d=0.3, packed=False, tile_size=16,
        backgrounds=backgrounds, render_mode="RGB+D", rasterize_mode="classic",
    )  # render [B,H,W,4], alphas [B,H,W,1]
    radii = meta["radii"]
    if radii.dim() == 3:  # gsplat >= 1.5 returns per-axis radii [B,N,2]
        radii = radii.amax(dim=-1)
    return RenderOutput(
        rgb=render[..., :3].permute(0, 3, 1, 2),
        alpha=alphas.permute(0, 3, 1, 2),
        depth=render[..., 3:4].permute(0, 3, 1, 2),
        extras={"means2d": meta["means2d"], "radii": radii.int()},
    )
