"""3D Gaussians as the SIR representation (the reference's 3DGS model, spec §6.6).

Parameters are kept raw, as 3DGS stores and saves them; activations give what the rasterizer takes:
``exp`` scale, ``sigmoid`` opacity, normalised quaternion, colour ``max(C0·f_dc + 0.5, 0)`` (the SH
degree-0 colour with the lower clamp diff-gaussian-rasterization applies). Higher SH bands read
from a PLY are kept and saved again but not rendered (colour is view-independent here).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import Tensor, nn

from ..config import GaussianConfig
from ..errors import UserError
from ..io.ply import GaussianPLY, read_gaussian_ply, write_gaussian_ply
from ..render.gaussians import rasterize_gaussians
from ..render.types import RenderOutput
from ..sir.cameras import Cameras
from .base import Representation
from .densify import DensifyReport, DensifyState, DensifyStrategy, Params, keep, quaternion_to_matrix
from .white_filter import white_floaters

if TYPE_CHECKING:
    from ..export.extract import DensityGrid

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2·sqrt(pi))
FIELDS = ("means", "f_dc", "f_rest", "opacity", "scale", "rotation")


@dataclass(frozen=True)
class ExponentialLR:
    """3DGS ``get_expon_lr_func``: log-linear from ``lr_init`` (step 0) to ``lr_final`` (``max_steps``
    and later), times a delay factor rising from ``delay_mult`` to 1 as a quarter sine over the first
    ``delay_steps`` (no delay when ``delay_steps`` is 0, as in the reference)."""

    lr_init: float
    lr_final: float
    max_steps: int
    delay_steps: int = 0
    delay_mult: float = 1.0

    def __call__(self, step: int) -> float:
        if self.lr_init == self.lr_final:
            return self.lr_init
        if step < 0 or (self.lr_init == 0.0 and self.lr_final == 0.0):
            return 0.0
        delay = 1.0
        if self.delay_steps > 0:
            ramp = min(max(step / self.delay_steps, 0.0), 1.0)
            delay = self.delay_mult + (1 - self.delay_mult) * math.sin(0.5 * math.pi * ramp)
        t = min(max(step / self.max_steps, 0.0), 1.0)
        return delay * math.exp(math.log(self.lr_init) * (1 - t) + math.log(self.lr_final) * t)


def mean_sq_knn_distance(points: Tensor, k: int = 3) -> Tensor:
    """Mean squared distance of every point to its ``k`` nearest other points (3DGS ``distCUDA2``),
    computed with a k-d tree on the CPU; clamped below at 1e-7 as 3DGS does."""
    xyz = points.detach().cpu().double().numpy()
    k = min(k, len(xyz) - 1)
    if k < 1:
        return torch.full((len(xyz),), 1e-7)
    dist, _ = cKDTree(xyz).query(xyz, k=k + 1)
    return torch.from_numpy((dist[:, 1:] ** 2).mean(1)).float().clamp_min(1e-7)


def random_init(cfg: GaussianConfig, generator: torch.Generator) -> GaussianPLY:
    """The reference blob: ``num_points`` uniform in a ball of radius ``init_radius`` (r = R·cbrt(u),
    uniform direction), SH-DC colour ~ U(0, 1/255) (mid-grey), isotropic scale from the 3 nearest
    neighbours, identity rotation, opacity 0.1."""
    n = cfg.num_points

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).cpu()

    phi = uniform(n) * 2 * math.pi
    cos_theta = uniform(n) * 2 - 1
    r = cfg.init_radius * uniform(n).pow(1 / 3)
    sin_theta = (1 - cos_theta**2).clamp_min(0).sqrt()
    means = torch.stack([r * sin_theta * phi.cos(), r * sin_theta * phi.sin(), r * cos_theta], -1).float()
    f_dc = (uniform(n, 3) / 255.0).float()
    scale = mean_sq_knn_distance(means).sqrt().log()[:, None].repeat(1, 3)
    rotation = torch.zeros(n, 4)
    rotation[:, 0] = 1.0
    return GaussianPLY(
        means=means,
        f_dc=f_dc,
        f_rest=torch.zeros(n, (cfg.sh_degree + 1) ** 2 - 1, 3),
        opacity=torch.full((n,), math.log(0.1 / 0.9)),
        scale=scale,
        rotation=rotation,
    )


class Gaussians(Representation):
    """3D Gaussians with their Adam optimiser, position-lr schedule and density control.

    ``generator`` drives the initial blob and the split sampling; the same seed gives the same
    Gaussians. ``init`` starts from given raw parameters instead of the random blob.
    """

    def __init__(self, cfg: GaussianConfig, device: torch.device | str, generator: torch.Generator,
                 init: GaussianPLY | None = None) -> None:
        if init is None and cfg.sh_degree != 0:
            raise UserError("gaussians.sh_degree must be 0: colours are rendered view-independent")
        self.cfg = cfg
        self.device = torch.device(device)
        self.generator = generator
        raw = random_init(cfg, generator) if init is None else init
        self.params: Params = {
            name: nn.Parameter(getattr(raw, name).detach().to(self.device, torch.float32).contiguous())
            for name in FIELDS
        }
        s = cfg.spatial_lr_scale
        self.position_lr = ExponentialLR(cfg.position_lr_init * s, cfg.position_lr_final * s,
                                         cfg.position_lr_max_steps, delay_mult=cfg.position_lr_delay_mult)
        lrs = {"means": self.position_lr(0), "f_dc": cfg.feature_lr, "f_rest": cfg.feature_lr / 20,
               "opacity": cfg.opacity_lr, "scale": cfg.scaling_lr, "rotation": cfg.rotation_lr}
        self.optimizer = torch.optim.Adam(
            [{"params": [self.params[name]], "lr": lrs[name], "name": name} for name in FIELDS],
            lr=0.0, eps=1e-15,
        )
        self.strategy = DensifyStrategy.from_config(cfg)
        self.densify_state = DensifyState.zeros(self.num_primitives, self.device)
        self.densify_log: list[DensifyReport] = []
        self.last_step = 0  # the step counter value of the last step()
        self.cleanup: dict[str, int] = {}  # Gaussians removed by each step of finalize()

    @classmethod
    def load(cls, path: Path, cfg: GaussianConfig, device: torch.device | str,
             generator: torch.Generator | None = None) -> "Gaussians":
        """Gaussians from a 3DGS PLY (fresh optimiser state). Without ``generator``, later splits
        draw from a generator seeded with 0."""
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        return cls(cfg, device, generator, init=read_gaussian_ply(path))

    # activations -------------------------------------------------------------------------------
    @property
    def means(self) -> Tensor:
        return self.params["means"]

    @property
    def scales(self) -> Tensor:
        return self.params["scale"].exp()

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.params["opacity"])

    @property
    def quats(self) -> Tensor:
        return F.normalize(self.params["rotation"], dim=-1)

    @property
    def colors(self) -> Tensor:
        return (SH_C0 * self.params["f_dc"] + 0.5).clamp_min(0.0)

    @property
    def num_primitives(self) -> int:
        return self.params["means"].shape[0]

    # Representation ----------------------------------------------------------------------------
    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        """Renders clamped to [0, 1] as the reference does; ``extras["means2d"]`` keeps its gradient."""
        out = rasterize_gaussians(self.means, self.quats, self.scales, self.opacities, self.colors,
                                  cameras, background, backend=self.cfg.backend)
        means2d = out.extras["means2d"]
        if means2d.requires_grad:
            means2d.retain_grad()
        return dataclasses.replace(out, rgb=out.rgb.clamp(0.0, 1.0))

    def step(self, step: int, output: RenderOutput) -> None:
        """Densification statistics from ``output``'s ``means2d`` gradient, then an Adam step with
        the position lr of ``step`` (the reference sets it before its update, so the update at
        counter s uses lr(s)), zero grads, then clone/split/prune if densification fires at ``step``."""
        if self.strategy.tracks(step):
            grad = output.extras["means2d"].grad
            if grad is not None:
                if grad.shape[1] != self.num_primitives:
                    raise ValueError("step() got a render of a different set of Gaussians")
                self.strategy.accumulate(self.densify_state, grad, output.extras["radii"],
                                         output.rgb.shape[-1], output.rgb.shape[-2])
        for group in self.optimizer.param_groups:
            if group["name"] == "means":
                group["lr"] = self.position_lr(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.strategy.fires(step, self.last_step):
            self.densify_state, report = self.strategy.densify(
                self.params, self.optimizer, self.densify_state, self.generator, step)
            self.densify_log.append(report)
        self.last_step = step

    @torch.no_grad()
    def finalize(self) -> None:
        """Final prune (opacity below ``final_prune_opacity`` or largest scale above ``final_prune_scale``),
        then, with ``white_filter``, the white floaters (:mod:`.white_filter`); ``cleanup`` counts both."""
        drop = (self.opacities < self.cfg.final_prune_opacity) | \
               (self.scales.amax(-1) > self.cfg.final_prune_scale)
        keep(self.params, self.optimizer, ~drop)
        self.cleanup = {"final_prune": int(drop.sum())}
        if self.cfg.white_filter:
            white = white_floaters(self.means, self.quats, self.scales, self.opacities, self.colors,
                                   self.cfg.backend)
            keep(self.params, self.optimizer, ~white)
            self.cleanup["white_filter"] = int(white.sum())
        self.densify_state = DensifyState.zeros(self.num_primitives, self.device)

    def to_ply(self) -> GaussianPLY:
        """Detached CPU copies of the raw parameters."""
        return GaussianPLY(**{name: self.params[name].detach().cpu().clone() for name in FIELDS})

    def save(self, path: Path) -> None:
        write_gaussian_ply(path, self.to_ply())

    @torch.no_grad()
    def density(self, points: Tensor, chunk: int = 512, cutoff: float = 4.0) -> Tensor:
        """Opacity field ``Σ_i o_i·exp(−½ dᵀΣ_i⁻¹d)`` at world ``points [P,3]`` → ``[P]``.

        Points are processed in spatially sorted chunks of ``chunk``; a chunk skips the Gaussians
        whose ellipsoid ``dᵀΣ⁻¹d ≤ cutoff²`` has a bounding box disjoint from the chunk's, so every
        skipped term is below ``o_i·exp(−cutoff²/2)`` (3.4e-4·o_i at the default 4);
        ``cutoff=inf`` gives the exact sum. The quadratic forms of
        a chunk are one matrix product (monomials of the point times coefficients of Σ⁻¹), in
        float64 and relative to the chunk's centre so that tiny Gaussians lose no precision; the
        exponentials and the sum are float32.
        """
        pts = points.to(self.device, torch.float64).reshape(-1, 3)
        out = torch.zeros(pts.shape[0], device=self.device)
        if self.num_primitives == 0 or pts.shape[0] == 0:
            return out
        means, opacity = self.means.detach().double(), self.opacities.detach()
        scales = self.scales.double()
        rot = quaternion_to_matrix(self.params["rotation"].double())
        precision = rot @ torch.diag_embed(scales.pow(-2)) @ rot.transpose(1, 2)  # Σ⁻¹ [G,3,3]
        upper = precision[:, [0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]  # xx yy zz xy xz yz
        # half-extents of the box around the ellipsoid dᵀΣ⁻¹d = cutoff²: cutoff·sqrt(Σ_kk)
        reach = cutoff * (rot.square() @ scales.square()[:, :, None]).squeeze(-1).sqrt()
        order = _spatial_order(pts, chunk)
        for start in range(0, pts.shape[0], chunk):
            idx = order[start:start + chunk]
            p = pts[idx]
            lo, hi = p.amin(0), p.amax(0)
            near = ((means + reach >= lo) & (means - reach <= hi)).all(-1).nonzero().squeeze(1)
            if near.numel() == 0:
                continue
            q = p - (lo + hi) / 2
            x, y, z = q.unbind(-1)
            monomials = torch.stack([x * x, y * y, z * z, 2 * x * y, 2 * x * z, 2 * y * z, x, y, z,
                                     torch.ones_like(x)], -1)  # [p,10]
            m = means[near] - (lo + hi) / 2
            pm = (precision[near] @ m[:, :, None]).squeeze(-1)  # Σ⁻¹μ
            coef = torch.cat([upper[near], -2 * pm, (m * pm).sum(-1, keepdim=True)], -1)  # [g,10]
            maha = (monomials @ coef.T).clamp_min(0).float()  # dᵀΣ⁻¹d for every pair [p,g]
            out[idx] = torch.exp(-0.5 * maha) @ opacity[near]
        return out

    def density_grid(self, resolution: int, threshold: float) -> DensityGrid:
        """The opacity field on a grid around the Gaussians by the block evaluator of
        :func:`~microdreamer.export.extract.density_grid` (far faster than :meth:`density` point by point)."""
        from ..export.extract import GaussianField, density_grid

        return density_grid(GaussianField.from_gaussians(self), resolution, threshold)


def _spatial_order(points: Tensor, chunk: int) -> Tensor:
    """A permutation that groups nearby points: sort by coarse cell (about ``chunk`` points a cell)."""
    cells = max(1, math.ceil((points.shape[0] / chunk) ** (1 / 3)))
    lo, hi = points.amin(0), points.amax(0)
    ijk = ((points - lo) / (hi - lo).clamp_min(1e-12) * cells).long().clamp(0, cells - 1)
    key = (ijk[:, 0] * cells + ijk[:, 1]) * cells + ijk[:, 2]
    return torch.sort(key, stable=True).indices
