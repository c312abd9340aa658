"""Adaptive density control of 3D Gaussians (3DGS clone / split / prune), kept apart from the model.

The strategy works on the raw (pre-activation) 3DGS parameters in a dict of ``nn.Parameter`` keyed
like :class:`~microdreamer.io.ply.GaussianPLY` fields (``means``, ``f_dc``, ``f_rest``, ``opacity``
(logit), ``scale`` (log), ``rotation`` (wxyz)) and on the Adam optimiser that owns them (one parameter
per group, the group's ``name`` is the key). Structural edits rebuild those parameters and edit the
Adam moments the way 3DGS does: new rows get zero ``exp_avg``/``exp_avg_sq``, removed rows are
dropped, the step count is kept.

Screen-space gradients. The reference threshold (0.01) is in the NDC units of
diff-gaussian-rasterization, whose ``means2D`` gradient is taken w.r.t. NDC coordinates; our
renderer's ``means2d`` is in pixels, and pixel = ((ndc + 1)·W − 1)/2, so
``grad_ndc = grad_px · (W/2, H/2)`` per axis (as gsplat's default strategy converts). There is no
extra factor for the number of views: the loss already averages the views, as the reference's does,
so a view's gradient carries the same 1/B the reference's does.

Which views count. The reference accumulates the gradient of the *last rendered novel view* only
(it renders the views one at a time and keeps the last ``viewspace_points``). We accumulate *every*
view of the rendered batch in which the Gaussian is visible (radius > 0), each view counting once in
the denominator. The average is then the mean per-view gradient norm, the quantity the reference
samples with one arbitrary view per step, so the threshold keeps its meaning while the estimate is
B times less noisy and does not depend on view order. If the caller batches the reference view with
the novel views, it counts as one more view. Measured (``benchmarks/study_deviations.py``, 3 seeds): the last
view alone tied on the spider and lost F@0.01 on Spot with the imperfect teacher (0.916 against 0.928 ± 0.007).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GaussianConfig

Params = dict[str, nn.Parameter]

# The reference calls densify_and_prune(extent=4) (spec §6.6): clone/split threshold 0.01·4 = 0.04,
# prune scale 0.1·4 = 0.4.
REFERENCE_EXTENT = 4.0


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrices ``[N,3,3]`` of (not necessarily unit) quaternions ``[N,4]`` (w, x, y, z)."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


@dataclass
class DensifyState:
    """Per-Gaussian screen-space statistics since the last densification."""

    grad_accum: Tensor  # [N] summed NDC gradient norms
    count: Tensor  # [N] number of (step, view) pairs in which the Gaussian was visible

    @classmethod
    def zeros(cls, n: int, device: torch.device | str) -> "DensifyState":
        return cls(torch.zeros(n, device=device), torch.zeros(n, device=device))

    def average(self) -> Tensor:
        """Mean gradient norm per visible view; 0 for Gaussians never seen."""
        return torch.where(self.count > 0, self.grad_accum / self.count.clamp_min(1), 0.0)


@dataclass
class DensifyReport:
    step: int
    cloned: int
    split: int
    pruned: int  # removed by the opacity/size criteria (split parents not included)
    total: int  # Gaussians afterwards


@dataclass
class DensifyStrategy:
    """When and how to clone, split and prune (3DGS adaptive density control, reference values).

    Statistics are gathered while ``start <= step <= stop``; densification is due at the multiples of
    ``interval`` in that range (step 0 excluded: nothing has been gathered yet, and the reference counter
    starts at 1) and fires at the first step the caller passes at or after each (:meth:`fires`).
    """

    grad_threshold: float = 0.01  # NDC units
    percent_dense: float = 0.01
    extent: float = REFERENCE_EXTENT
    start: int = 0
    stop: int = 300
    interval: int = 100
    prune_opacity: float = 0.005
    prune_scale: float = 0.1  # fraction of extent
    children: int = 2

    @classmethod
    def from_config(cls, cfg: GaussianConfig) -> "DensifyStrategy":
        return cls(
            grad_threshold=cfg.densify_grad_threshold,
            percent_dense=cfg.percent_dense,
            start=cfg.densify_from,
            stop=cfg.densify_until,
            interval=cfg.densify_interval,
        )

    def tracks(self, step: int) -> bool:
        return self.start <= step <= self.stop

    def fires(self, step: int, previous: int) -> bool:
        """Whether to densify at ``step``, the step passed after ``previous``: when a due step lies in
        ``(previous, step]``. The SIR counter also advances once per iteration without an optimisation step
        (spec §6.6), so a due step can be skipped over (ImageDream's 100). The reference then does not densify;
        we do, one step late: on the study of this deviation (``benchmarks/study_deviations.py``) skipping cost
        F@0.01 0.024 and 0.031 (sd 0.013, 0.010) on the shaded and imperfect teachers."""
        if self.interval <= 0:
            return False
        due = step // self.interval * self.interval  # the last multiple of the interval up to step
        return previous < due and 0 < due and self.start <= due <= self.stop

    def accumulate(self, state: DensifyState, means2d_grad: Tensor, radii: Tensor, width: int,
                   height: int) -> None:
        """Add one render's statistics: ``means2d_grad [B,N,2]`` (pixels), ``radii [B,N]``."""
        to_ndc = torch.tensor([width / 2.0, height / 2.0], device=means2d_grad.device)
        norms = (means2d_grad[..., :2] * to_ndc).norm(dim=-1)
        visible = radii > 0
        state.grad_accum += torch.where(visible, norms, 0.0).sum(0)
        state.count += visible.sum(0)

    @torch.no_grad()
    def densify(self, params: Params, optimizer: torch.optim.Optimizer, state: DensifyState,
                generator: torch.Generator, step: int) -> tuple[DensifyState, DensifyReport]:
        """Clone, split and prune in place (``params`` and ``optimizer`` are rebuilt); returns the
        fresh statistics for the new set of Gaussians and a report of what changed.

        Order as 3DGS: clones and split children are appended after the existing Gaussians
        (clones first, then the first child of every split Gaussian, then the second, …), split
        parents are removed, then the prune criteria apply to everything, new Gaussians included.
        """
        n = params["means"].shape[0]
        grads = state.average()
        scales = params["scale"].exp()
        big = scales.amax(-1) > self.percent_dense * self.extent
        hot = grads >= self.grad_threshold
        clone, split = hot & ~big, hot & big

        clones = {name: p[clone] for name, p in params.items()}
        children = self._split_children(params, split, generator)
        append(params, optimizer, {name: torch.cat([clones[name], children[name]]) for name in params})

        n_new = params["means"].shape[0] - n
        parents = torch.cat([split, split.new_zeros(n_new)])
        low = torch.sigmoid(params["opacity"]) < self.prune_opacity
        huge = params["scale"].exp().amax(-1) > self.prune_scale * self.extent
        prune = (low | huge) & ~parents
        keep(params, optimizer, ~(parents | prune))
        report = DensifyReport(step, int(clone.sum()), int(split.sum()), int(prune.sum()),
                               params["means"].shape[0])
        return DensifyState.zeros(report.total, grads.device), report

    def _split_children(self, params: Params, split: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """``children`` samples per split Gaussian from its own distribution, scales / (0.8·children)."""
        k = self.children
        std = params["scale"][split].exp().repeat(k, 1)
        noise = torch.randn(std.shape, generator=generator, device=generator.device).to(std.device)
        rot = quaternion_to_matrix(params["rotation"][split]).repeat(k, 1, 1)
        out = {name: p[split].repeat(k, *([1] * (p.dim() - 1))) for name, p in params.items()}
        out["means"] = (rot @ (noise * std).unsqueeze(-1)).squeeze(-1) + out["means"]
        out["scale"] = torch.log(std / (0.8 * k))
        return out


def _rebuild(params: Params, optimizer: torch.optim.Optimizer,
             edit: Callable[[str, Tensor, bool], Tensor]) -> None:
    """Replace every parameter by ``edit(name, tensor, is_moment=False)`` and every Adam moment of
    the same shape by ``edit(name, moment, is_moment=True)``; the optimiser keeps its other state."""
    for group in optimizer.param_groups:
        (old,) = group["params"]
        name = group["name"]
        fresh = nn.Parameter(edit(name, old.detach(), False), requires_grad=old.requires_grad)
        state = optimizer.state.pop(old, None)
        if state is not None:
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == old.shape:
                    state[key] = edit(name, value, True)
            optimizer.state[fresh] = state
        group["params"][0] = fresh
        params[name] = fresh


def append(params: Params, optimizer: torch.optim.Optimizer, rows: dict[str, Tensor]) -> None:
    """Append ``rows`` to every parameter; Adam moments grow with zeros."""
    _rebuild(params, optimizer, lambda name, t, moment: torch.cat(
        [t, torch.zeros_like(rows[name]) if moment else rows[name].to(t)]))


def keep(params: Params, optimizer: torch.optim.Optimizer, mask: Tensor) -> None:
    """Keep the rows where ``mask`` is true in every parameter and Adam moment."""
    _rebuild(params, optimizer, lambda name, t, moment: t[mask])
