"""Where each SIR iteration starts and ends its refinement: the annealed t2 and the hybrid-forward t1.

Iteration k (0..K−1) ends its hybrid forward process at t2 (on the DDIM grid) and switches from noise
adding to DDIM inversion at t1 ≤ t2 (on the inversion grid); spec §6.3 gives the reference formulas.
t2 moves in DDIM-index space from index ``N(1 − t_start)`` towards ``N(1 − t_end)`` (evaluated in
Python floats, so 1 − 0.9 lands just below 0.1 and image_sai starts at index 1, t2 = 901):

- ``linear`` (reference): idx = floor(k/K · (end − start) + start);
- ``square`` (paper ablation, Fig. 12c): the fraction k/K is squared, so t2 stays high longer;
- ``random`` (SDS-like ablation): the fraction is drawn uniformly from [0, 1) per iteration.

t1 is ``inverse_ratio · t2`` (mode ``ratio``) or ``t2² / T`` (mode ``square``), snapped down to the
inversion grid through j = trunc(t1 / T · N) computed in float32 as the reference does.
The reference's schedule counter is 0 on the init iteration and on the first regular iteration, so
regular iteration k of this module is the reference's counter k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ScheduleConfig
from .scheduler import ddim_timesteps, inverse_timesteps, inversion_pairs, sampling_timesteps

KINDS = ("linear", "square", "random")
T1_MODES = ("ratio", "square")


@dataclass(frozen=True)
class IterationPlan:
    """One refinement: add noise to t1, invert t1 → t2 (``inversion`` (source, target) pairs), sample t2 → 0."""

    t2: int
    t1: int
    inversion: tuple[tuple[int, int], ...]
    sampling: tuple[int, ...]

    @property
    def uncond_passes(self) -> int:
        """Network passes on the unconditional branch only (one per inversion step)."""
        return len(self.inversion)

    @property
    def guided_passes(self) -> int:
        """Classifier-free guided passes (one per sampling step)."""
        return len(self.sampling)


@dataclass(frozen=True)
class SIRSchedule:
    """The init iteration (sampling from pure noise through all N steps) and the K regular iterations."""

    denoise_steps: int  # N
    init: IterationPlan
    plans: tuple[IterationPlan, ...]

    @property
    def iterations(self) -> int:
        """K, the number of regular iterations."""
        return len(self.plans)

    def iteration(self, k: int) -> IterationPlan:
        """The plan of regular iteration k (0..K−1)."""
        if not 0 <= k < len(self.plans):
            raise IndexError(f"iteration {k} outside 0..{len(self.plans) - 1}")
        return self.plans[k]

    @property
    def guided_passes(self) -> int:
        """Guided passes of a whole run, init iteration included."""
        return sum(p.guided_passes for p in (self.init, *self.plans))

    @property
    def uncond_passes(self) -> int:
        """Unconditional-only passes of a whole run."""
        return sum(p.uncond_passes for p in (self.init, *self.plans))

    @classmethod
    def from_config(
        cls, cfg: ScheduleConfig, generator: torch.Generator | None = None, num_train_timesteps: int = 1000
    ) -> "SIRSchedule":
        """Build the run's schedule; ``kind = "random"`` draws its K fractions from ``generator``."""
        if cfg.kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {KINDS}, got {cfg.kind!r}")
        if cfg.t1 not in T1_MODES:
            raise ValueError(f"t1 mode must be one of {T1_MODES}, got {cfg.t1!r}")
        N, K, T = cfg.denoise_steps, cfg.iterations, num_train_timesteps
        tau, iota = ddim_timesteps(N, T), inverse_timesteps(N, T)
        start, end = N * (1 - cfg.t_start), N * (1 - cfg.t_end)
        plans = []
        for k, fraction in enumerate(_fractions(cfg.kind, K, generator)):
            idx = min(max(math.floor(fraction * (end - start) + start), 0), N - 1)
            t2 = tau[idx]
            t1 = min(iota[_grid_index(t2, cfg, N, T)], t2)
            plans.append(
                IterationPlan(t2, t1, tuple(inversion_pairs(t1, t2, N, T)), tuple(sampling_timesteps(t2, N, T)))
            )
        init = IterationPlan(T, T, (), tuple(tau))
        return cls(N, init, tuple(plans))


def _fractions(kind: str, K: int, generator: torch.Generator | None) -> list[float]:
    """Progress fraction of each iteration along the t2 path (0 = start)."""
    if kind == "linear":
        return [k / K for k in range(K)]
    if kind == "square":
        return [(k / K) ** 2 for k in range(K)]
    if generator is None:
        raise ValueError("the random t2 schedule needs an explicit torch.Generator")
    return torch.rand(K, generator=generator, device=generator.device, dtype=torch.float64).tolist()


def _grid_index(t2: int, cfg: ScheduleConfig, N: int, T: int) -> int:
    """Inversion-grid index of t1, truncated from float32 like the reference's tensor arithmetic."""
    if cfg.t1 == "ratio":  # the reference's order of operations: t2 / T · N · inverse_ratio
        value = torch.tensor(t2) / T * N * cfg.inverse_ratio
    else:  # t1 = t2² / T, then the same snapping
        value = torch.tensor(t2 * t2 / T, dtype=torch.float32) / T * N
    return min(max(int(value.item()), 0), N - 1)
