"""The C++/OpenMP hash-grid kernel (``csrc/hashgrid.cpp``) behind one autograd function.

Same semantics as :mod:`.hashgrid_torch`; float32, CPU tensors only. The gradient w.r.t. the
parameters is a scatter-add done level by level without atomics (deterministic); the gradient
w.r.t. the points is computed only when they require it. First derivatives only.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ._build import kernel_unavailable, load_extension

if TYPE_CHECKING:
    from .hashgrid import HashGridConfig


def extension() -> ModuleType:
    """The compiled kernel (built on first use; raises :class:`ExtensionUnavailable`)."""
    return load_extension("hashgrid")


def unavailable_reason() -> str | None:
    """``None`` when the kernel builds and loads here, else why not (one line)."""
    return kernel_unavailable("hashgrid")


@cache
def level_table(cfg: HashGridConfig) -> tuple[Tensor, Tensor]:
    """The kernel's view of ``cfg``: float32 scales ``[L]`` and int64 ``[L,4]`` rows
    (resolution, size, offset, hashed)."""
    scales = torch.tensor(cfg.level_scales(), dtype=torch.float32)
    rows = list(zip(cfg.level_resolutions(), cfg.level_sizes(), cfg.level_offsets(), cfg.level_hashed()))
    for _, size, _, hashed in rows:
        assert not hashed or size == 2**cfg.log2_hashmap_size, "a hashed level's table is 2^log2_hashmap_size"
    return scales, torch.tensor(rows, dtype=torch.int64)


class _EncodeCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:  # type: ignore[override]
        scales, table = level_table(cfg)
        ctx.save_for_backward(x, params)
        ctx.cfg = cfg
        return extension().forward(x, params, scales, table, cfg.n_features_per_level)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor):  # type: ignore[override]
        x, params = ctx.saved_tensors
        cfg = ctx.cfg
        scales, table = level_table(cfg)
        need_x, need_params = ctx.needs_input_grad[:2]
        g_params, g_x = extension().backward(
            grad.float().contiguous(), x, params, scales, table, cfg.n_features_per_level, need_params, need_x
        )
        return (g_x if need_x else None), (g_params if need_params else None), None


def encode_cpu(x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:
    """The C++ twin of :func:`~.hashgrid_torch.encode_torch` (float32 in and out)."""
    return _EncodeCPU.apply(x.float().contiguous(), params.float().contiguous(), cfg)
