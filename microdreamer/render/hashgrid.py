"""Multiresolution hash-grid encoding (Instant-NGP) with tiny-cuda-nn's exact parameter layout.

The parameters are one flat float vector laid out and indexed as tiny-cuda-nn's ``HashGrid``
encoding (CoherentPrime hash, linear interpolation), so a tiny-cuda-nn ``params`` vector, e.g. a
threestudio checkpoint's, gives the same features here. Per level ``l`` (tcnn's rules):

* ``scale_l = exp2(l·log2(per_level_scale))·base_resolution − 1`` in float32, and resolution
  ``res_l = ceil(scale_l) + 1`` (``base_resolution`` counts grid vertices);
* ``size_l`` entries: ``res_l³`` (capped at 2³¹−1) rounded up to a multiple of 8, at most
  ``2^log2_hashmap_size``; levels lie one after the other, each entry ``n_features_per_level``
  contiguous floats;
* a level whose ``res_l³`` fits in ``size_l`` is indexed densely (``x + y·res + z·res²``), the others
  by the hash; either index is taken modulo ``size_l``.

Backends: ``"torch"`` (plain PyTorch reference, any device; semantics in :mod:`.hashgrid_torch`),
``"cpu"`` (C++/OpenMP kernel with a hand-written backward) and ``"tcnn"`` (tiny-cuda-nn on CUDA,
when the ``tinycudann`` package is installed).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from .backends import choose_backend
from .hashgrid_cpu import encode_cpu, unavailable_reason
from .hashgrid_tcnn import encode_tcnn, tcnn_unavailable_reason
from .hashgrid_torch import encode_torch

THREESTUDIO_PARAMS_KEY = "geometry.encoding.encoding.encoding.params"
N_DIMS = 3
MAX_DENSE_RESOLUTION = 0x659  # tcnn's MAX_BASES[3]: finer grids are always hashed (x + y·res + z·res² overflows)


def _f32(value: float) -> float:
    """``value`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass(frozen=True)
class HashGridConfig:
    """A tcnn ``HashGrid`` encoding of 3D points (defaults: threestudio's, finest resolution 4096)."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269237440378  # (4096/16)^(1/15)

    def __post_init__(self) -> None:
        if self.n_levels < 1:
            raise UserError(f"hash grid n_levels must be at least 1, got {self.n_levels}")
        if self.n_features_per_level not in (1, 2, 4, 8):
            raise UserError(
                f"hash grid n_features_per_level must be 1, 2, 4 or 8 (as tcnn), got {self.n_features_per_level}"
            )
        if not 3 <= self.log2_hashmap_size <= 30:
            raise UserError(f"hash grid log2_hashmap_size must be in [3, 30], got {self.log2_hashmap_size}")
        if self.base_resolution < 1 or not self.per_level_scale >= 1.0:
            raise UserError(
                f"hash grid base_resolution must be >= 1 and per_level_scale >= 1, got "
                f"{self.base_resolution} and {self.per_level_scale}"
            )

    def level_scales(self) -> list[float]:
        """Each level's ``scale`` as tcnn computes it in float32 (exp2f, log2f; each step rounded once).

        float32 products and differences are exact in float64, and float64 log2/exp2 rounded to float32
        give the correctly rounded float32 results. glibc's log2f/exp2f (error ≤ 0.502 ulp) return the
        same but in rare near-halfway cases, and CUDA's fast-math exp2f may differ by an ulp at some level.
        """
        log2_scale = _f32(math.log2(_f32(self.per_level_scale)))
        return [
            _f32(_f32(_f32(2.0 ** _f32(level * log2_scale)) * self.base_resolution) - 1.0)
            for level in range(self.n_levels)
        ]

    def level_resolutions(self) -> list[int]:
        """Grid vertices per axis at each level, ``ceil(scale) + 1``."""
        return [math.ceil(scale) + 1 for scale in self.level_scales()]

    def level_sizes(self) -> list[int]:
        """Table entries per level (each entry holds ``n_features_per_level`` floats)."""
        sizes = []
        for res in self.level_resolutions():
            dense = min(res**N_DIMS, 2**31 - 1)
            sizes.append(min(-(-dense // 8) * 8, 2**self.log2_hashmap_size))
        return sizes

    def level_offsets(self) -> list[int]:
        """First entry of each level in the flat table, and the total entry count last (``n_levels + 1``)."""
        offsets = [0]
        for size in self.level_sizes():
            offsets.append(offsets[-1] + size)
        return offsets

    def level_hashed(self) -> list[bool]:
        """Whether each level is indexed by the hash (True) or densely (False)."""
        return [
            res > MAX_DENSE_RESOLUTION or size < res**N_DIMS
            for res, size in zip(self.level_resolutions(), self.level_sizes())
        ]

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector (floats)."""
        return self.level_offsets()[-1] * self.n_features_per_level

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level


def init_params(cfg: HashGridConfig, generator: torch.Generator) -> Tensor:
    """A fresh flat float32 parameter vector, uniform in [−1e-4, 1e-4] as tcnn initialises it."""
    u = torch.rand(cfg.num_params, generator=generator, device=generator.device)
    return (u * 2 - 1) * 1e-4


def load_tcnn_params(
    state_dict: Mapping[str, Tensor], cfg: HashGridConfig, key: str = THREESTUDIO_PARAMS_KEY
) -> Tensor:
    """The flat tcnn ``params`` stored under ``key`` (threestudio's name by default) as a float32 copy.

    Accepts a state dict or a Lightning checkpoint that holds one under ``"state_dict"``. Raises
    :class:`UserError` when the key is missing or the vector's size is not ``cfg.num_params``.
    """
    if key not in state_dict and isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    if key not in state_dict:
        raise UserError(
            f"the checkpoint has no hash-grid parameters '{key}'; is it a threestudio implicit-volume NeRF?"
        )
    params = state_dict[key]
    if params.numel() != cfg.num_params:
        raise UserError(
            f"hash-grid parameters '{key}' hold {params.numel():,} floats but the grid configured needs "
            f"{cfg.num_params:,} ({cfg}); use the checkpoint's encoding settings"
        )
    return params.detach().reshape(-1).float().clone()


def available_backends() -> dict[str, bool]:
    """Which backends can run here (``"cpu"`` builds the C++ kernel on first call)."""
    return {"torch": True, "cpu": unavailable_reason() is None, "tcnn": tcnn_unavailable_reason() is None}


def resolve_backend(name: str, device: torch.device | str, build: bool = True) -> str:
    """The concrete backend for ``name`` on ``device``.

    ``"auto"`` picks tcnn on CUDA when it imports, else the C++ kernel on CPU when it builds, else
    torch (on CUDA without tinycudann, ``tcnn_unavailable_reason()`` is the line saying what to install).
    An unknown name, or a backend that cannot run on ``device``, raises :class:`UserError` (``build=False``: the check before models load, see
    :func:`~.backends.choose_backend`).
    """
    return choose_backend("hash-grid", name, device, unavailable_reason, "tcnn", tcnn_unavailable_reason, build=build)


def hash_grid_encode(x: Tensor, params: Tensor, cfg: HashGridConfig, backend: str = "auto") -> Tensor:
    """Encode points ``x [N,3]`` (in [0,1]³, not clamped, as tcnn) with the flat ``params [num_params]``.

    Returns ``[N, n_levels·n_features_per_level]``, level-major (``out[n, l·F + f]``). Positions are
    float32 whatever ``x``'s dtype. Differentiable w.r.t. ``params`` and ``x`` on every backend (the
    gradient w.r.t. ``x`` is only computed when ``x`` requires it; only the torch backend supports
    second derivatives). The torch backend interpolates in ``params``' dtype, the others in float32.
    """
    if x.dim() != 2 or x.shape[1] != N_DIMS:
        raise ValueError(f"x must have shape [N, 3], got {tuple(x.shape)}")
    if tuple(params.shape) != (cfg.num_params,):
        raise ValueError(f"params must have shape [{cfg.num_params}] for this grid, got {tuple(params.shape)}")
    if x.device != params.device:
        raise ValueError(f"x is on {x.device} but params on {params.device}")
    name = resolve_backend(backend, x.device)
    if name == "cpu":
        return encode_cpu(x, params, cfg)
    if name == "tcnn":
        return encode_tcnn(x, params, cfg)
    return encode_torch(x, params, cfg)
