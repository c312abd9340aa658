"""The C++/OpenMP rasterizer (``csrc/gaussians.cpp``) behind an autograd function.

The projection stays in torch (:func:`~.gaussians_torch.project_gaussians`, autograd); this module
rasterizes its output with a hand-written backward that walks each pixel's list back to front as
3DGS does. Same semantics as the torch reference, float32 only, CPU tensors only.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ._build import ExtensionUnavailable, load_extension
from .gaussians_torch import ALPHA_MAX, ALPHA_MIN, T_MIN, Projection


def extension() -> ModuleType:
    """The compiled kernel (built on first use; raises :class:`ExtensionUnavailable`)."""
    return load_extension("gaussians")


@cache
def unavailable_reason() -> str | None:
    """``None`` when the kernel builds and loads here, else why not (one line)."""
    try:
        extension()
    except ExtensionUnavailable as exc:
        return str(exc).splitlines()[0]
    return None


class _RasterizeCPU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        means2d: Tensor,
        conics: Tensor,
        depths: Tensor,
        opacities: Tensor,
        colors: Tensor,
        background: Tensor,
        rects: Tensor,
        width: int,
        height: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        rgb, alpha, depth, t_final, n_used, offsets, ids, splats = extension().forward(
            means2d, conics, depths, opacities, colors, background, rects,
            width, height, ALPHA_MIN, ALPHA_MAX, T_MIN,
        )
        ctx.save_for_backward(background, t_final, n_used, offsets, ids, splats)
        ctx.size = (width, height)
        return rgb, alpha, depth

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g_rgb: Tensor, g_alpha: Tensor, g_depth: Tensor):  # type: ignore[override]
        background, t_final, n_used, offsets, ids, splats = ctx.saved_tensors
        width, height = ctx.size
        g_rgb, g_alpha, g_depth = (g.float().contiguous() for g in (g_rgb, g_alpha, g_depth))
        (grads,) = extension().backward(
            g_rgb, g_alpha, g_depth, background, t_final, n_used, offsets, ids, splats,
            width, height, ALPHA_MIN, ALPHA_MAX,
        )
        g_means2d, g_conics, g_opac, g_colors, g_depths = grads.split([2, 3, 1, 3, 1], dim=-1)
        g_bg = None
        if ctx.needs_input_grad[5]:
            g_bg = (g_rgb * t_final[:, None]).sum((0, 2, 3))
        return (
            g_means2d, g_conics, g_depths[..., 0], g_opac[..., 0].sum(0), g_colors.sum(0),
            g_bg, None, None, None,
        )


def rasterize_cpu(
    proj: Projection, opacities: Tensor, colors: Tensor, background: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Rasterize ``proj`` with the C++ kernel: ``rgb [B,3,H,W]``, ``alpha``/``depth [B,1,H,W]``."""
    f32 = lambda t: t.float().contiguous()  # noqa: E731
    return _RasterizeCPU.apply(
        f32(proj.means2d), f32(proj.conics), f32(proj.depths), f32(opacities), f32(colors),
        f32(background), proj.tile_rects.int().contiguous(), proj.width, proj.height,
    )
