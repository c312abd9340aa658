"""The NeRF's two heads on the hash-grid encoding: ``σ = softplus(density_network(enc) + bias)`` and
``rgb = sigmoid(feature_network(enc))`` (threestudio's ``implicit-volume`` with ``no-material``); LGM's
convert.py takes ``σ = trunc_exp(…)`` instead (:func:`trunc_exp`, the torch backend only).

Backends: ``"torch"`` (the modules under autograd: the reference) and ``"cpu"`` (``csrc/nerf_heads.cpp``:
both networks fused per sample with a hand-written backward, several times faster than the reference
on the CPU, where the reference's cost is mostly passes over ``[N, width]`` activations).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..render._build import kernel_unavailable, load_extension
from .mlp import VanillaMLP


def extension() -> ModuleType:
    """The compiled kernel (built on first use; raises :class:`ExtensionUnavailable`)."""
    return load_extension("nerf_heads")


def unavailable_reason() -> str | None:
    """``None`` when the kernel builds and loads here, else why not (one line)."""
    return kernel_unavailable("nerf_heads")


class _TruncExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15))


def trunc_exp(x: Tensor) -> Tensor:
    """``exp(x)`` whose gradient is taken as ``exp(min(x, 15))`` (torch-ngp's, kept by LGM's convert.py)."""
    return _TruncExp.apply(x)


#: the density activations :class:`~microdreamer.config.NerfConfig` names
ACTIVATIONS = {"softplus": F.softplus, "trunc_exp": trunc_exp}


def heads_torch(encoding: Tensor, bias: Tensor, density: VanillaMLP, feature: VanillaMLP,
                activation: str = "softplus") -> tuple[Tensor, Tensor]:
    """``σ [N]`` and ``rgb [N,3]`` for ``encoding [N,F]`` and the density bias ``[N]``."""
    return ACTIVATIONS[activation](density(encoding).squeeze(-1) + bias), torch.sigmoid(feature(encoding))


def _weights(net: VanillaMLP) -> list[Tensor]:
    return [m.weight for m in net.layers if isinstance(m, torch.nn.Linear)]


class _HeadsCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, encoding: Tensor, bias: Tensor, n_density: int, *weights: Tensor):  # type: ignore[override]
        w = [t.detach().float().contiguous() for t in weights]
        sigma, rgb = extension().forward(encoding, bias, w[:n_density], w[n_density:])
        ctx.save_for_backward(encoding, bias, *w)
        ctx.n_density = n_density
        ctx.set_materialize_grads(False)
        return sigma, rgb

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g_sigma: Tensor | None, g_rgb: Tensor | None):  # type: ignore[override]
        encoding, bias, *w = ctx.saved_tensors
        n = ctx.n_density
        empty = torch.empty(0)
        g_enc, *g_w = extension().backward(
            encoding, bias, w[:n], w[n:], empty if g_sigma is None else g_sigma.float().contiguous(),
            empty if g_rgb is None else g_rgb.float().contiguous(), ctx.needs_input_grad[0],
        )
        return (g_enc if ctx.needs_input_grad[0] else None), None, None, *g_w


def heads_cpu(encoding: Tensor, bias: Tensor, density: VanillaMLP, feature: VanillaMLP) -> tuple[Tensor, Tensor]:
    """The C++ twin of :func:`heads_torch` (float32 CPU tensors; no gradient to ``bias``)."""
    dw = _weights(density)
    return _HeadsCPU.apply(encoding.float().contiguous(), bias.detach().float().contiguous(), len(dw), *dw,
                           *_weights(feature))


def nerf_heads(encoding: Tensor, bias: Tensor, density: VanillaMLP, feature: VanillaMLP,
               backend: str = "torch", activation: str = "softplus") -> tuple[Tensor, Tensor]:
    """``σ``, ``rgb`` with the ``"torch"`` or ``"cpu"`` backend (softplus only)."""
    if backend == "cpu":
        return heads_cpu(encoding, bias, density, feature)
    return heads_torch(encoding, bias, density, feature, activation)


@torch.no_grad()
def nerf_density(encoding: Tensor, bias: Tensor, density: VanillaMLP, backend: str = "torch",
                 activation: str = "softplus") -> Tensor:
    """``σ [N]`` alone (no gradient): the density network and its activation."""
    if backend == "cpu":
        return extension().forward(encoding.float().contiguous(), bias.float().contiguous(),
                                   [w.detach().float() for w in _weights(density)], [])[0]
    return ACTIVATIONS[activation](density(encoding).squeeze(-1) + bias)
