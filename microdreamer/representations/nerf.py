"""A NeRF as the SIR representation: threestudio's ``implicit-volume`` geometry (spec nerf §1.3–1.7).

World points ``p`` in the box ``[-radius, radius]³`` are mapped to ``[0,1]³`` and encoded by a
multiresolution hash grid (16 levels × 2 features by default). Two bias-free MLPs read the encoding:
the density network (32→64→1, or 32→64→64→1) gives ``σ = softplus(raw + blob(p))`` (or LGM's
``trunc_exp``, ``density_activation``) where the
*blob_magic3d* bias ``scale·(1 − |p|/std)`` (on unscaled world points: +10 at the centre, 0 at radius
0.5, −10 at radius 1) starts training from a soft ball; the feature network (32→64→3) gives the colour
through a sigmoid. Rays are rendered by :func:`~microdreamer.render.volume.render_rays` with an
occupancy grid (32³, refreshed every 16 steps) and steps of ``√3·2·radius / samples_per_ray``.
Backends: ``encoding_backend`` picks the hash grid's; ``backend`` the volume renderer's, and with
``cpu`` the two MLP heads also run fused in C++ (:mod:`.nerf_heads`).

The background is the run's colour, or threestudio's learned environment map during training (with its
random-colour augmentation); after :meth:`NerfField.finalize` renders composite over the colour passed in.
Files are safetensors with threestudio's state-dict names (``geometry.encoding.encoding.encoding.params``,
``geometry.density_network.layers.0.weight``, …, ``renderer.estimator.occs``) and the configuration
as JSON in the file's metadata, under the one key ``microdreamer-nerf`` (safetensors writes several
metadata keys in a random order, which would make the same field's files differ).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import NerfConfig, nerf_config
from ..errors import UserError
from ..render.backends import note_fallback
from ..render.hashgrid import HashGridConfig, hash_grid_encode, init_params, resolve_backend
from ..render.hashgrid_tcnn import tcnn_unavailable_reason
from ..render.occupancy import OccupancyGrid, OccupancyRule
from ..render.types import RenderOutput
from ..render.volume import MarchSettings, VolumeOutput, render_rays, resolve_volume_backend
from ..sir.cameras import Cameras
from ..teachers.loading import check_state
from .base import Representation
from .envmap import EnvironmentMap
from .mlp import VanillaMLP
from .nerf_heads import nerf_density, nerf_heads
from .nerf_heads import unavailable_reason as heads_unavailable_reason

if TYPE_CHECKING:
    from ..export.extract import DensityGrid

FILE_FORMAT = "microdreamer-nerf"
#: our parameter names → threestudio's state-dict names
_PARAMS_KEY = "geometry.encoding.encoding.encoding.params"
_GRID_KEYS = {"occs": "renderer.estimator.occs", "binaries": "renderer.estimator.binaries"}


class NerfField(Representation):
    """Hash-grid NeRF with its optimiser and occupancy grid; ``num_primitives`` is the occupied cell count.

    ``generator`` draws the initial parameters, the stratified sampling offsets, the occupancy-grid
    refresh points and the background augmentation.
    """

    def __init__(self, cfg: NerfConfig, device: torch.device | str, generator: torch.Generator) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.generator = generator
        self.training = True
        self.grid_cfg = HashGridConfig(**cfg.hash_grid())
        self.encoding_backend = resolve_backend(cfg.encoding_backend, self.device)
        if self.device.type == "cuda" and self.encoding_backend == "torch" and cfg.encoding_backend == "auto":
            note_fallback("the hash-grid encoding", tcnn_unavailable_reason())
        self.backend = resolve_volume_backend(cfg.backend, self.device)
        # the fused C++ heads compute softplus; another activation runs the torch reference
        fused = self.backend == "cpu" and cfg.density_activation == "softplus" and heads_unavailable_reason() is None
        self.heads_backend = "cpu" if fused else "torch"
        self.params = nn.Parameter(init_params(self.grid_cfg, generator).to(self.device, torch.float32))
        features = self.grid_cfg.n_levels * self.grid_cfg.n_features_per_level
        self.density_network = VanillaMLP(features, 1, cfg.width, cfg.density_hidden_layers, generator).to(self.device)
        self.feature_network = VanillaMLP(features, 3, cfg.width, cfg.feature_hidden_layers, generator).to(self.device)
        self.envmap = EnvironmentMap(generator).to(self.device) if cfg.background == "envmap" else None
        self._random_backdrop: Tensor | None = None  # this SIR iteration's augmentation colour (new_iteration)
        self.settings = MarchSettings(
            radius=cfg.radius, step=math.sqrt(3) * 2 * cfg.radius / cfg.samples_per_ray,
            early_stop_eps=cfg.early_stop_eps, alpha_thre=cfg.alpha_threshold,
        )
        self.grid = OccupancyGrid(cfg.radius, cfg.occupancy_resolution, self.device)
        self.rule = OccupancyRule(cfg.occupancy_interval, cfg.occupancy_threshold, cfg.occupancy_ema_decay,
                                  cfg.occupancy_warmup)
        self.steps = 0
        self.grid.update(0, self._occupancy, generator, self.rule)  # threestudio refreshes before step 0
        self.optimizer = self._optimizer()
        self.pixel_budget = cfg.ray_budget

    def _optimizer(self) -> torch.optim.Optimizer:
        """Spec nerf §1.7: AdamW with per-group rates (MVDream, ImageDream) or Adam (Stable Zero123)."""
        c = self.cfg
        groups = [
            {"params": [self.params], "lr": c.lr_encoding, "name": "encoding"},
            {"params": [*self.density_network.parameters(), *self.feature_network.parameters()],
             "lr": c.lr_network, "name": "network"},
        ]
        if self.envmap is not None:
            groups.append({"params": list(self.envmap.parameters()), "lr": c.lr_background, "name": "background"})
        if c.optimizer == "adamw":
            return torch.optim.AdamW(groups, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        return torch.optim.Adam(groups, betas=c.betas, eps=c.eps)

    # the field ------------------------------------------------------------------------------------
    def _encode(self, points: Tensor) -> Tensor:
        unit = (points + self.cfg.radius) / (2 * self.cfg.radius)
        return hash_grid_encode(unit, self.params, self.grid_cfg, backend=self.encoding_backend)

    def density_bias(self, points: Tensor) -> Tensor:
        """blob_magic3d ``scale·(1 − |p|/std)`` at world points (zero with ``density_bias = "none"``)."""
        if self.cfg.density_bias == "none":
            return torch.zeros(points.shape[:-1], device=points.device)
        return self.cfg.blob_scale * (1 - points.norm(dim=-1) / self.cfg.blob_std)

    def _field(self, points: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        return nerf_heads(self._encode(points), self.density_bias(points), self.density_network,
                          self.feature_network, self.heads_backend, self.cfg.density_activation)

    @torch.no_grad()
    def _sample_density(self, points: Tensor) -> Tensor:
        return nerf_density(self._encode(points), self.density_bias(points), self.density_network,
                            self.heads_backend, self.cfg.density_activation)

    def _occupancy(self, points: Tensor) -> Tensor:
        return self._sample_density(points) * self.settings.step

    @torch.no_grad()
    def density(self, points: Tensor, chunk: int = 262144) -> Tensor:
        """Density σ at world ``points [P,3]`` → ``[P]``; zero outside the box the field lives in."""
        pts = points.to(self.device, torch.float32).reshape(-1, 3)
        out = torch.zeros(pts.shape[0], device=self.device)
        inside = (pts.abs() <= self.cfg.radius).all(-1).nonzero().squeeze(1)
        for start in range(0, inside.numel(), chunk):
            idx = inside[start:start + chunk]
            out[idx] = self._sample_density(pts[idx])
        return out

    def density_grid(self, resolution: int, threshold: float) -> DensityGrid:
        """σ sampled coarse to fine in the field's box (:func:`~microdreamer.export.extract.sample_grid`)."""
        from ..export.extract import sample_grid

        return sample_grid(self.density, self.cfg.radius, resolution, threshold)

    #: the colour network's output is the colour renders composite (no view dependence, no shading)
    colour_field = True

    def rgb(self, points: Tensor) -> Tensor:
        """``sigmoid(feature_network(encoding))`` at world ``points [P,3]`` → ``[P,3]``, with gradients to
        the points and the parameters."""
        return torch.sigmoid(self.feature_network(self._encode(points)))

    @torch.no_grad()
    def colour(self, points: Tensor, chunk: int = 262144) -> Tensor:
        """:meth:`rgb` without gradients, in chunks."""
        pts = points.to(self.device, torch.float32).reshape(-1, 3)
        return torch.cat([self.rgb(pts[i:i + chunk]) for i in range(0, pts.shape[0], chunk)] or [pts.new_zeros(0, 3)])

    # rendering ------------------------------------------------------------------------------------
    def _rays(self, rays_o: Tensor, rays_d: Tensor) -> VolumeOutput:
        return render_rays(rays_o, rays_d, self._field, self.settings, self.grid, self._sample_density,
                           self.generator if self.training else None, self.backend)

    def _render_rays(self, rays_o: Tensor, rays_d: Tensor) -> VolumeOutput:
        """All rays in one go with gradients; in chunks of ``cfg.chunk`` rays without."""
        if torch.is_grad_enabled():
            return self._rays(rays_o, rays_d)
        parts = [self._rays(rays_o[i:i + self.cfg.chunk], rays_d[i:i + self.cfg.chunk])
                 for i in range(0, rays_o.shape[0], self.cfg.chunk)]
        return VolumeOutput(torch.cat([p.rgb for p in parts]), torch.cat([p.opacity for p in parts]),
                            torch.cat([p.depth for p in parts]), sum(p.samples for p in parts))

    def _background(self, directions: Tensor, colour: Tensor) -> Tensor:
        """``[R,3]``: the given colour, or while training with an environment map, the map or the random
        colour this SIR iteration drew (:meth:`new_iteration`)."""
        if self.envmap is None or not self.training:
            return colour.to(self.device, torch.float32).expand_as(directions)
        if self._random_backdrop is not None:
            return self._random_backdrop.expand_as(directions)
        return self.envmap(directions)

    def new_iteration(self, cameras: Cameras, background: Tensor) -> Tensor | None:
        """With an environment map: draw whether this iteration's renders show one random colour instead
        (probability ``background_random_aug``, threestudio's augmentation; drawn per iteration, not per
        render, because all of an iteration's renders fit one target) and return the backgrounds
        ``[B,3,H,W]`` of ``cameras``."""
        if self.envmap is None:
            return None
        g = self.generator
        self._random_backdrop = None
        if float(torch.rand((), generator=g, device=g.device)) < self.cfg.background_random_aug:
            self._random_backdrop = torch.rand(3, generator=g, device=g.device).to(self.device)
        cams = cameras.to(self.device)
        with torch.no_grad():
            directions = cams.rays()[1]
            rgb = self._background(directions.reshape(-1, 3), background)
        return rgb.view(len(cams), cams.height, cams.width, 3).permute(0, 3, 1, 2)

    def _render(self, cameras: Cameras, background: Tensor, pixels: Tensor | None) -> RenderOutput:
        cams = cameras.to(self.device)
        rays_o, rays_d = cams.rays(None if pixels is None else pixels.to(self.device))
        b, p = rays_o.shape[:2]
        out = self._render_rays(rays_o.reshape(-1, 3), rays_d.reshape(-1, 3))
        rgb = out.rgb + self._background(rays_d.reshape(-1, 3), background) * (1 - out.opacity[:, None])
        forward = -cams.c2w[:, :3, 2]  # the camera looks along its -z
        depth = out.depth.view(b, p) * (rays_d * forward[:, None, :]).sum(-1)  # distance → camera z
        h, w = (cams.height, cams.width) if pixels is None else (1, p)
        return RenderOutput(
            rgb.view(b, h, w, 3).permute(0, 3, 1, 2), out.opacity.view(b, 1, h, w), depth.view(b, 1, h, w),
            extras={"samples": torch.tensor(out.samples)},
        )

    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        return self._render(cameras, background, None)

    def render_pixels(self, cameras: Cameras, background: Tensor, pixels: Tensor) -> RenderOutput:
        return self._render(cameras, background, pixels)

    # training -------------------------------------------------------------------------------------
    def step(self, step: int, output: RenderOutput) -> None:
        """Optimiser step, zero grads, then the occupancy-grid refresh due before the next render
        (this field's own step count, as threestudio's global step)."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.grid.update(self.steps, self._occupancy, self.generator, self.rule)

    def finalize(self) -> None:
        """End of training: deterministic sampling, and renders composite over the given background."""
        self.training = False

    @property
    def num_primitives(self) -> int:
        return self.grid.occupied_cells

    # files ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Parameters and occupancy grid under threestudio's names (CPU copies)."""
        state = {_PARAMS_KEY: self.params}
        state.update({f"geometry.density_network.{k}": v for k, v in self.density_network.state_dict().items()})
        state.update({f"geometry.feature_network.{k}": v for k, v in self.feature_network.state_dict().items()})
        if self.envmap is not None:
            state.update({f"background.{k}": v for k, v in self.envmap.state_dict().items()})
        grid = self.grid.state_dict()
        state[_GRID_KEYS["occs"]] = grid["occs"]
        state[_GRID_KEYS["binaries"]] = grid["binaries"][None]  # nerfacc keeps a level axis
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def save(self, path: Path) -> None:
        metadata = {FILE_FORMAT: json.dumps(dataclasses.asdict(self.cfg), sort_keys=True)}
        save_file(self.state_dict(), str(path), metadata=metadata)

    @classmethod
    def load(cls, path: Path, device: torch.device | str, generator: torch.Generator | None = None) -> "NerfField":
        """A NeRF saved by :meth:`save`, with a fresh optimiser, ready to render (``finalize`` applied).
        Without ``generator``, later draws come from a generator seeded with 0."""
        path = Path(path)
        try:
            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        if FILE_FORMAT not in metadata:
            raise UserError(f"{path} is not a NeRF written by microdreamer (no '{FILE_FORMAT}' metadata)")
        cfg = nerf_config(json.loads(metadata[FILE_FORMAT]))
        field = cls(cfg, device, generator if generator is not None else torch.Generator().manual_seed(0))
        expected = field.state_dict()
        check_state(state, expected, path, "this NeRF configuration")
        with torch.no_grad():
            field.params.copy_(state[_PARAMS_KEY])
            for prefix, module in (("geometry.density_network.", field.density_network),
                                   ("geometry.feature_network.", field.feature_network),
                                   ("background.", field.envmap)):
                if module is not None:
                    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        field.grid.load_state_dict({"occs": state[_GRID_KEYS["occs"]], "binaries": state[_GRID_KEYS["binaries"]]})
        field.finalize()
        return field
