"""Adapter to tiny-cuda-nn's ``tinycudann.Encoding`` (CUDA), imported only when used.

tinycudann is not on PyPI; it builds from source with nvcc:
``pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch``.
The encoding is created once per (config, device) with ``dtype=torch.float32`` and called with our
flat parameter vector in place of its own ``params`` (``torch.func.functional_call``), so gradients
reach the caller's tensor. Its CUDA build uses fast math: it agrees with the other backends to
float32 rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib.util
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .hashgrid import HashGridConfig

INSTALL_HINT = "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch (needs nvcc)"


@cache
def tcnn_unavailable_reason() -> str | None:
    """``None`` when tiny-cuda-nn can run here, else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("tinycudann") is None:
        return f"tiny-cuda-nn is not installed: {INSTALL_HINT}"
    return None


def encoding_config(cfg: HashGridConfig) -> dict:
    """tcnn's JSON encoding config for ``cfg``."""
    return {
        "otype": "HashGrid",
        "n_levels": cfg.n_levels,
        "n_features_per_level": cfg.n_features_per_level,
        "log2_hashmap_size": cfg.log2_hashmap_size,
        "base_resolution": cfg.base_resolution,
        "per_level_scale": cfg.per_level_scale,
        "interpolation": "Linear",
    }


@cache
def _encoding(cfg: HashGridConfig, device: torch.device) -> nn.Module:
    import tinycudann

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        module = tinycudann.Encoding(3, encoding_config(cfg), dtype=torch.float32)
    if module.params.numel() != cfg.num_params:
        raise RuntimeError(f"tinycudann laid out {module.params.numel()} parameters, expected {cfg.num_params}")
    return module


def encode_tcnn(x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:
    """Same contract as :func:`~.hashgrid.hash_grid_encode` (CUDA float32 tensors)."""
    module = _encoding(cfg, x.device)
    return torch.func.functional_call(module, {"params": params.float()}, (x.float().contiguous(),))
