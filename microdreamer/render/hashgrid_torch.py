"""Plain-PyTorch reference of the hash-grid encoding, differentiated by autograd.

Per point and level (tiny-cuda-nn's ``GridEncoding``, HashGrid / CoherentPrime / Linear):

* ``pos = fma(scale, x, 0.5)`` in float32, ``cell = floor(pos)`` (then ``(uint32)(int)``: a negative
  cell, from x < −0.5/scale, wraps like tcnn's), ``frac = pos − cell``. torch has no float32 fma,
  so ``scale·x`` is formed in float64 (exact: two 24-bit mantissas) and ``+ 0.5`` added there: that
  sum is exact whenever ``scale·x ≥ 2⁻⁶`` and then rounds once to float32, i.e. equals the fused
  result; below that (``pos < 0.52``, far from any cell boundary) double rounding can move ``frac``
  by its last bit.
* Corner ``c = 0..7`` takes ``cell + 1`` along dimension ``d`` when bit ``d`` of ``c`` is set; its
  weight is ``((1·w_x)·w_y)·w_z`` in float32 with ``w_d = frac_d`` or ``1 − frac_d``.
* Entry: dense levels ``(x + y·res + z·res²) mod size``; hashed levels
  ``(x·1 ⊕ y·2654435761 ⊕ z·805459861) mod size``, both in uint32 wrap-around arithmetic (int64 here,
  masked to the low 32 bits before the modulo; the mask matters for the real ``% size`` of the
  8-padded dense tables, which do not divide 2^32).
* Feature ``f`` of the level = Σ_c weight_c · table[offset + entry_c, f]. tcnn accumulates with fmaf
  in corner order; this sums unfused, so the two agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .hashgrid import HashGridConfig

PRIMES = (1, 2654435761, 805459861)  # tcnn's CoherentPrime factors for x, y, z
UINT32 = 0xFFFFFFFF


def corner_bits(device: torch.device | str | None = None) -> Tensor:
    """``[8,3]`` int64: bit d of corner c (+1 along dimension d), tcnn's corner order."""
    c = torch.arange(8, device=device)
    return torch.stack([(c >> d) & 1 for d in range(3)], dim=-1)


def level_corners(x: Tensor, cfg: HashGridConfig, level: int) -> tuple[Tensor, Tensor]:
    """Entries ``[N,8]`` (within the level's table) and float32 weights ``[N,8]`` of the 8 corners
    of each point's cell at ``level``; the weights are differentiable w.r.t. ``x``."""
    scale = cfg.level_scales()[level]
    res = cfg.level_resolutions()[level]
    size = cfg.level_sizes()[level]
    x32 = x.float()
    pos = (x32.detach().double() * scale + 0.5).float()
    cell = torch.floor(pos)
    frac = pos - cell  # exact in float32
    if x32.requires_grad:
        frac = frac + (x32 - x32.detach()) * scale  # adds exactly 0; d frac / dx = scale
    bits = corner_bits(x.device)
    # int64 arithmetic, then the low 32 bits: + and · (and ⊕ bitwise) give the same low bits as in uint32,
    # including for negative cells (two's complement) and products beyond 2^63
    cx, cy, cz = (cell.long()[:, None, :] + bits).unbind(-1)  # [N,8] each
    if cfg.level_hashed()[level]:
        entry = (cx * PRIMES[0]) ^ (cy * PRIMES[1]) ^ (cz * PRIMES[2])
    else:
        entry = cx + cy * res + cz * (res * res)
    entry = (entry & UINT32) % size
    factors = torch.where(bits.bool(), frac[:, None, :], 1 - frac[:, None, :])  # [N,8,3]
    weights = factors[..., 0] * factors[..., 1] * factors[..., 2]
    return entry, weights


def encode_torch(x: Tensor, params: Tensor, cfg: HashGridConfig) -> Tensor:
    """Reference encoding: ``x [N,3]``, flat ``params`` → ``[N, L·F]`` in ``params``' dtype."""
    tables = params.view(-1, cfg.n_features_per_level).split(cfg.level_sizes())
    features = []
    for level, table in enumerate(tables):
        entry, weights = level_corners(x, cfg, level)
        values = table.index_select(0, entry.flatten()).view(*entry.shape, cfg.n_features_per_level)
        features.append((weights.to(params.dtype)[..., None] * values).sum(dim=1))
    return torch.cat(features, dim=-1)
