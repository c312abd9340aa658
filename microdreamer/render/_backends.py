"""Choosing a renderer backend: plain torch, the C++ kernel on CPU, or a CUDA library."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError


def resolve_backend_choice(
    what: str,
    name: str,
    device: torch.device | str,
    cuda_backend: str,
    cuda_unavailable_reason: Callable[[], str | None],
    cpu_unavailable_reason: Callable[[], str | None],
) -> str:
    """The concrete backend (``"torch"``, ``"cpu"`` or ``cuda_backend``) for ``name`` on ``device``.

    ``"auto"`` picks ``cuda_backend`` on CUDA when it can run, else the C++ kernel on CPU when it
    builds, else torch. An unknown name, or a backend that cannot run on ``device``, raises
    :class:`UserError` naming ``what`` (e.g. "rasterizer"). The reason callables return ``None``
    when their backend can run, else one line saying why not; they are called only when needed.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and cuda_unavailable_reason() is None:
            return cuda_backend
        if device.type == "cpu" and cpu_unavailable_reason() is None:
            return "cpu"
        return "torch"
    if name == "torch":
        return name
    if name == "cpu":
        if device.type != "cpu":
            raise UserError(f"{what} backend 'cpu' runs on CPU tensors only, not on {device}; use 'torch' or 'auto'")
        reason = cpu_unavailable_reason()
        if reason is not None:
            raise UserError(f"{what} backend 'cpu' is unavailable ({reason}); use 'torch' or 'auto'")
        return name
    if name == cuda_backend:
        if device.type != "cuda":
            raise UserError(f"{what} backend '{name}' needs CUDA tensors, not {device}; use 'auto'")
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise UserError(f"{what} backend '{name}' is unavailable ({reason}); use 'auto'")
        return name
    raise UserError(f"unknown {what} backend '{name}'; choose one of auto, torch, cpu, {cuda_backend}")
