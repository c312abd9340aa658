"""Differentiable 3D Gaussian splatting with interchangeable backends (gsplat-style functional API).

Backends: ``"torch"`` (plain PyTorch reference, any device), ``"cpu"`` (C++/OpenMP kernel with a
hand-written backward) and ``"gsplat"`` (CUDA, when the ``gsplat`` package is installed). The
torch and cpu backends share the projection in :mod:`.gaussians_torch`; semantics are described there.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch
from torch import Tensor

from ..sir.cameras import Cameras
from .backends import choose_backend
from .gaussians_cpu import project_cpu, rasterize_cpu, unavailable_reason
from .gaussians_gsplat import gsplat_unavailable_reason, rasterize_gsplat
from .gaussians_torch import project_gaussians, rasterize_torch
from .types import RenderOutput

#: the rasterizer backends (``auto`` picks one of them: :func:`resolve_backend`)
BACKENDS = ("torch", "cpu", "gsplat")
SLOW_CUDA_PATH = (
    "gsplat is not installed: Gaussians are rasterized by the plain-PyTorch reference on CUDA, many times "
    "slower; pip install \"microdreamer[cuda]\" (gsplat) to fix it"
)


@cache
def _warn_slow_cuda_path() -> None:
    """Say once per process that CUDA runs fall back to the torch rasterizer."""
    warnings.warn(SLOW_CUDA_PATH, RuntimeWarning, stacklevel=3)


def available_backends() -> dict[str, bool]:
    """Which backends can run here (``"cpu"`` builds the C++ kernel on first call)."""
    return {"torch": True, "cpu": unavailable_reason() is None, "gsplat": gsplat_unavailable_reason() is None}


def resolve_backend(name: str, device: torch.device | str, build: bool = True) -> str:
    """The concrete backend for ``name`` on ``device``.

    ``"auto"`` picks gsplat on CUDA when it imports (else torch, with a warning once per process: see
    :data:`SLOW_CUDA_PATH`), the C++ kernel on CPU when it builds, else torch. An unknown name, or a
    backend that cannot run on ``device``, raises :class:`UserError` (``build=False``: the check before
    models load, see :func:`~.backends.choose_backend`).
    """
    return choose_backend("rasterizer", name, device, unavailable_reason, "gsplat", gsplat_unavailable_reason,
                          lambda _reason: _warn_slow_cuda_path(), build)


def rasterize_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cameras: Cameras,
    background: Tensor,
    backend: str = "auto",
) -> RenderOutput:
    """Render N Gaussians into B cameras.

    ``means [N,3]``, ``quats [N,4]`` (w, x, y, z; normalised here), ``scales [N,3]`` (activated,
    world units), ``opacities [N]`` (activated), ``colors [N,3]`` (activated RGB),
    ``background [3]``. Returns ``rgb [B,3,H,W]``, ``alpha``/``depth [B,1,H,W]`` (depth is the
    weighted sum Σ wᵢzᵢ) and extras ``means2d [B,N,2]`` (pixel-space centres, a non-leaf tensor
    in the graph: call ``.retain_grad()`` on it for densification; its gradient is per pixel, not
    per NDC unit as in diff-gaussian-rasterization) and ``radii [B,N]`` (int32, 0 = not drawn).
    The cpu backend computes in float32 whatever the input dtype.
    """
    n = means.shape[0]
    expected = {"means": (means, (n, 3)), "quats": (quats, (n, 4)), "scales": (scales, (n, 3)),
                "opacities": (opacities, (n,)), "colors": (colors, (n, 3)), "background": (background, (3,))}
    for label, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{label} must have shape {shape}, got {tuple(tensor.shape)}")
    name = resolve_backend(backend, means.device)
    if name == "gsplat":
        return rasterize_gsplat(means, quats, scales, opacities, colors, cameras, background)
    if name == "cpu":
        proj = project_cpu(means, quats, scales, cameras)
        rgb, alpha, depth = rasterize_cpu(proj, opacities, colors, background)
    else:
        proj = project_gaussians(means, quats, scales, cameras.to(means.device))
        rgb, alpha, depth = rasterize_torch(proj, opacities, colors, background)
    return RenderOutput(rgb, alpha, depth, extras={"means2d": proj.means2d, "radii": proj.radii})
