"""One rule for picking a renderer backend: a CUDA library, our C++ kernel, or the plain-torch reference.

``"auto"`` picks the CUDA library on a CUDA device when it can run, the C++ kernel on the CPU when it
builds, else torch (on CUDA without the library, ``on_cuda_fallback`` hears why, e.g. to say what to
install). An explicit choice that cannot run on the device, or an unknown name, raises :class:`UserError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache

import torch

from ..errors import UserError

Reason = Callable[[], "str | None"]  # None when the backend can run here, else why not


@cache
def note_fallback(kind: str, reason: str) -> None:
    """One warning per process and kind: a CUDA library is missing, the slower torch path runs (``reason``
    says what to install)."""
    warnings.warn(f"{kind} on CUDA uses the slower torch path: {reason}", stacklevel=3)


def choose_backend(kind: str, name: str, device: torch.device | str, cpu_reason: Reason, cuda_name: str,
                   cuda_reason: Reason, on_cuda_fallback: Callable[[str], None] | None = None,
                   build: bool = True) -> str:
    """The concrete backend (``"torch"``, ``"cpu"`` or ``cuda_name``) for ``name`` on ``device``;
    ``kind`` names the renderer in messages. ``build=False`` is the cheap check a run makes before any model
    loads: the C++ kernel is assumed to build (it is checked when first used) and a CUDA fallback is not
    announced yet."""
    device = torch.device(device)
    if not build:
        cpu_reason, on_cuda_fallback = (lambda: None), None
    if name == "auto":
        if device.type == "cuda":
            reason = cuda_reason()
            if reason is None:
                return cuda_name
            if on_cuda_fallback is not None:
                on_cuda_fallback(reason)
        if device.type == "cpu" and cpu_reason() is None:
            return "cpu"
        return "torch"
    if name == "torch":
        return name
    if name == "cpu":
        if device.type != "cpu":
            raise UserError(f"{kind} backend 'cpu' runs on CPU tensors only, not on {device}; use 'torch' or 'auto'")
        reason = cpu_reason()
        if reason is not None:
            raise UserError(f"{kind} backend 'cpu' is unavailable ({reason}); use 'torch' or 'auto'")
        return name
    if name == cuda_name:
        if device.type != "cuda":
            raise UserError(f"{kind} backend '{cuda_name}' needs CUDA tensors, not {device}; use 'auto'")
        reason = cuda_reason()
        if reason is not None:
            raise UserError(f"{kind} backend '{cuda_name}' is unavailable ({reason}); use 'auto'")
        return name
    raise UserError(f"unknown {kind} backend '{name}'; choose one of auto, torch, cpu, {cuda_name}")
