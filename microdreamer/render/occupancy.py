"""The occupancy grid that lets NeRF ray marching skip empty space (nerfacc's ``OccGridEstimator``, one level).

A ``resolution³`` grid over the box ``[-radius, radius]³`` keeps, per cell, an exponential moving
maximum of the occupancy ``density·step_size`` at a random point of the cell. Every ``interval``
optimisation steps the cells are re-evaluated: all of them during the first ``warmup_steps``, then a
quarter of the cells drawn uniformly plus as many occupied ones. A cell is occupied when its value
exceeds ``min(threshold, mean of the positive values)``. The marching kernels of every backend read
``binaries``; cells are numbered x-major (``ix·res² + iy·res + iz``) as in nerfacc, so a nerfacc
estimator takes these tensors unchanged. All draws come from the generator passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class OccupancyRule:
    """When and how the grid is refreshed (nerfacc ``update_every_n_steps`` defaults)."""

    interval: int = 16  # refresh every this many optimisation steps
    threshold: float = 0.01  # occupancy (density·step) above which a cell is kept
    ema_decay: float = 0.95
    warmup_steps: int = 256  # before this step every cell is evaluated


class OccupancyGrid:
    """Occupancy of the cells of ``[-radius, radius]³`` (see the module docstring)."""

    def __init__(self, radius: float, resolution: int = 32, device: torch.device | str = "cpu") -> None:
        self.radius = float(radius)
        self.resolution = int(resolution)
        device = torch.device(device)
        cells = self.resolution**3
        self.occs = torch.zeros(cells, device=device)
        self.binaries = torch.zeros(cells, dtype=torch.bool, device=device)
        axis = torch.arange(self.resolution, device=device)
        self._coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(cells, 3)

    @property
    def device(self) -> torch.device:
        return self.occs.device

    @property
    def occupied_cells(self) -> int:
        return int(self.binaries.sum())

    def fill(self) -> None:
        """Mark every cell occupied (no skipping)."""
        self.binaries.fill_(True)

    @torch.no_grad()
    def update(self, step: int, occupancy: Callable[[Tensor], Tensor], generator: torch.Generator,
               rule: OccupancyRule = OccupancyRule()) -> bool:
        """Refresh the grid if ``step`` is a multiple of ``rule.interval``; ``occupancy(points [P,3]) -> [P]``
        gives density·step_size at world points. Returns whether it refreshed."""
        if step % rule.interval:
            return False
        cells = self.resolution**3
        if step < rule.warmup_steps:
            indices = torch.arange(cells, device=self.device)
        else:
            n = cells // 4
            uniform = self._randint(cells, n, generator)
            occupied = self.binaries.nonzero().squeeze(1)
            if n < occupied.numel():
                occupied = occupied[self._randint(occupied.numel(), n, generator)]
            indices = torch.cat([uniform, occupied])
        jitter = torch.rand(indices.numel(), 3, generator=generator, device=generator.device).to(self.device)
        unit = (self._coords[indices] + jitter) / self.resolution
        occ = occupancy(self.radius * (2 * unit - 1)).reshape(-1).float()
        self.occs[indices] = torch.maximum(self.occs[indices] * rule.ema_decay, occ)
        positive = self.occs[self.occs > 0]
        level = min(float(positive.mean()), rule.threshold) if positive.numel() else rule.threshold
        self.binaries = self.occs > level
        return True

    def _randint(self, high: int, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(high, (n,), generator=generator, device=generator.device).to(self.device)

    def state_dict(self) -> dict[str, Tensor]:
        return {"occs": self.occs, "binaries": self.binaries.reshape((self.resolution,) * 3)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.occs = state["occs"].to(self.device, torch.float32).reshape(-1).clone()
        self.binaries = state["binaries"].to(self.device, torch.bool).reshape(-1).clone()
