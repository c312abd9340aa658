"""The C++/OpenMP backend (``csrc/gaussians.cpp``) behind two autograd functions.

:func:`project_cpu` is a fused version of :func:`~.gaussians_torch.project_gaussians` with a
hand-derived backward (the autograd graph of the torch projection costs more than the whole
rasterization at 20k Gaussians × 6 views); :func:`rasterize_cpu` rasterizes any
:class:`~.gaussians_torch.Projection` with a hand-written backward that walks each pixel's list
back to front as 3DGS does. Same semantics as the torch reference; float32, CPU tensors only.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..sir.cameras import Cameras
from ._build import extension_unavailable_reason, load_extension
from .gaussians_torch import ALPHA_MAX, ALPHA_MIN, EPS2D, FOV_MARGIN, T_MIN, Projection


def extension() -> ModuleType:
    """The compiled kernel (built on first use; raises :class:`ExtensionUnavailable`)."""
    return load_extension("gaussians")


def unavailable_reason() -> str | None:
    """``None`` when the kernel builds and loads here, else why not (one line)."""
    return extension_unavailable_reason("gaussians")


def _f32(t: Tensor) -> Tensor:
    return t.float().contiguous()


def _grad(t: Tensor | None) -> Tensor:
    """An incoming gradient for the kernels; ``None`` (output unused) becomes an empty tensor."""
    return torch.empty(0) if t is None else _f32(t)


class _ProjectCPU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        means: Tensor,
        quats: Tensor,
        scales: Tensor,
        viewmats: Tensor,
        ks: Tensor,
        settings: tuple[int, int, float, float],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        width, height, near, far = settings
        means2d, conics, depths, radii, rects = extension().project_forward(
            means, quats, scales, viewmats, ks, width, height, near, far, EPS2D, FOV_MARGIN
        )
        ctx.save_for_backward(means, quats, scales, viewmats, ks)
        ctx.settings = settings
        ctx.mark_non_differentiable(radii, rects)
        ctx.set_materialize_grads(False)
        return means2d, conics, depths, radii, rects

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, g_means2d: Tensor | None, g_conics: Tensor | None, g_depths: Tensor | None, *_
    ):
        width, height, near, far = ctx.settings
        g_means, g_quats, g_scales = extension().project_backward(
            *ctx.saved_tensors, _grad(g_means2d), _grad(g_conics), _grad(g_depths),
            width, height, near, far, EPS2D, FOV_MARGIN,
        )
        return g_means, g_quats, g_scales, None, None, None


def project_cpu(means: Tensor, quats: Tensor, scales: Tensor, cameras: Cameras) -> Projection:
    """The C++ twin of :func:`~.gaussians_torch.project_gaussians` (same outputs, float32)."""
    cams = cameras.to("cpu")
    settings = (cams.width, cams.height, float(cams.near), float(cams.far))
    means2d, conics, depths, radii, rects = _ProjectCPU.apply(
        _f32(means), _f32(quats), _f32(scales), _f32(cams.viewmats()), _f32(cams.intrinsics()), settings
    )
    return Projection(means2d, conics, depths, radii, rects, cams.width, cams.height)


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
        rgb, alpha, depth, *state = extension().forward(
            means2d, conics, depths, opacities, colors, background, rects,
            width, height, ALPHA_MIN, ALPHA_MAX, T_MIN,
        )  # state: per-pixel final transmittance and list depth, the tile lists
        ctx.save_for_backward(background, *state)
        ctx.sizes = (opacities.shape[0], width, height)
        ctx.set_materialize_grads(False)
        return rgb, alpha, depth

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, g_rgb: Tensor | None, g_alpha: Tensor | None, g_depth: Tensor | None
    ):
        g_means2d, g_conics, g_depths, g_opac, g_colors, g_bg = extension().backward(
            _grad(g_rgb), _grad(g_alpha), _grad(g_depth), *ctx.saved_tensors, *ctx.sizes, ALPHA_MIN, ALPHA_MAX
        )
        return g_means2d, g_conics, g_depths, g_opac, g_colors, g_bg, None, None, None


def rasterize_cpu(
    proj: Projection, opacities: Tensor, colors: Tensor, background: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Rasterize ``proj`` with the C++ kernel: ``rgb [B,3,H,W]``, ``alpha``/``depth [B,1,H,W]``."""
    return _RasterizeCPU.apply(
        _f32(proj.means2d), _f32(proj.conics), _f32(proj.depths), _f32(opacities), _f32(colors),
        _f32(background), proj.tile_rects.int().contiguous(), proj.width, proj.height,
    )
