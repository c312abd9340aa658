"""The C++/OpenMP backend of the volume renderer (``csrc/volume.cpp``): marching, visibility and
compositing with a hand-written backward. Same semantics as :mod:`.volume_torch`; float32 CPU tensors."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ._build import kernel_unavailable, load_extension
from .types import RaySamples


def extension() -> ModuleType:
    """The compiled kernel (built on first use; raises :class:`ExtensionUnavailable`)."""
    return load_extension("volume")


def unavailable_reason() -> str | None:
    """``None`` when the kernel builds and loads here, else why not (one line)."""
    return kernel_unavailable("volume")


def _f32(t: Tensor) -> Tensor:
    return t.detach().float().contiguous()


def march_cpu(rays_o: Tensor, rays_d: Tensor, binaries: Tensor | None, resolution: int, radius: float,
              step: float, near: float, far: float, offsets: Tensor | None) -> RaySamples:
    """The C++ twin of :func:`~.volume_torch.march_torch`."""
    empty = torch.empty(0)
    packed, ray_indices, t_starts, t_ends = extension().march(
        _f32(rays_o), _f32(rays_d), empty.bool() if binaries is None else binaries.bool().contiguous(),
        resolution, radius, step, near, far, empty if offsets is None else _f32(offsets),
    )
    return RaySamples(ray_indices, t_starts, t_ends, packed)


def visibility_cpu(samples: RaySamples, sigmas: Tensor, early_stop_eps: float, alpha_thre: float) -> Tensor:
    """The C++ twin of :func:`~.volume_torch.visibility_torch`."""
    return extension().visibility(_f32(sigmas), _f32(samples.t_starts), _f32(samples.t_ends),
                                  samples.packed_info.contiguous(), early_stop_eps, alpha_thre)


class _CompositeCPU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, sigmas: Tensor, rgbs: Tensor, t_starts: Tensor, t_ends: Tensor, packed_info: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        rgb, opacity, depth = extension().composite_forward(sigmas, rgbs, t_starts, t_ends, packed_info)
        ctx.save_for_backward(sigmas, rgbs, t_starts, t_ends, packed_info)
        ctx.set_materialize_grads(False)
        return rgb, opacity, depth

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, g_rgb: Tensor | None, g_opacity: Tensor | None, g_depth: Tensor | None
    ):
        empty = torch.empty(0)
        g_sigmas, g_rgbs = extension().composite_backward(
            empty if g_rgb is None else _f32(g_rgb), empty if g_opacity is None else _f32(g_opacity),
            empty if g_depth is None else _f32(g_depth), *ctx.saved_tensors,
        )
        return g_sigmas, g_rgbs, None, None, None


def composite_cpu(samples: RaySamples, sigmas: Tensor, rgbs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The C++ twin of :func:`~.volume_torch.composite_torch` (gradients to ``sigmas`` and ``rgbs``)."""
    return _CompositeCPU.apply(sigmas.float().contiguous(), rgbs.float().contiguous(), _f32(samples.t_starts),
                               _f32(samples.t_ends), samples.packed_info.contiguous())
