"""LGM's mesh path (its ``convert.py``, spec §6.7) for ``--mesh-method lgm``: three fits to renders of the
Gaussians instead of meshing their own summed opacity.

1. :func:`fit_field` — a NeRF (:class:`~microdreamer.representations.nerf.NerfField` configured as
   ``cfg.mesh.lgm.nerf``: trunc_exp density, sigmoid colour) fitted to renders of the representation from
   random cameras (elevation in [−45, 45), azimuth in [−180, 180), distance U(1.5, 3)) with
   MSE(rgb) + 0.1·MSE(alpha) (convert.py's 1e−8 grid TV term left out). Its σ is meshed at
   ``cfg.mesh.lgm.threshold`` (5) by the extract helpers, on a grid around the object (:func:`field_grid`)
   and cleaned and decimated as the ``density`` method's surface (convert.py's isotropic remesh
   needs pymeshlab, a ~100 MB wheel we do not depend on for one step).
2. :func:`fit_vertices` — per-vertex offsets and the field's colour fitted to renders from near-horizontal
   cameras (elevation in [−10, 10), distance 1.5): MSE(rgb) + 0.1·MSE(alpha) + 0.001·normal consistency +
   0.1·mean(offset²). Our rasterizer gives no geometry gradients, so each covered pixel's surface point is
   recomputed differentiably (:func:`surface_points`: the ray meets the rasterized face's plane) and coloured
   by the field there, and the alpha is the outline-antialiased coverage of :func:`silhouette_coverage`
   (what nvdiffrast's ``antialias`` gives convert.py; the colours are not blended across the outline).
3. :func:`fit_texture` — after the UV unwrap and the texture baked from the field's colour, texture logits
   fitted to renders from near-front cameras (elevation in [−5, 5), azimuth in [−15, 15), distance 1.5)
   with MSE(rgb) (:class:`~microdreamer.export.texture.TextureSampler`).

Frames: convert.py works in LGM's frame (cameras 1.5 from the origin with fovy 49.1, the field in
[−1, 1]³). One LGM unit is :func:`frame_scale` run units, chosen so that LGM's camera sees the object as
large as the run's reference camera (``cfg.cameras.radius``, ``cfg.cameras.fovy``) does:
``s = radius·tan(fovy/2) / (1.5·tan(49.1°/2))``. Every camera here has fovy 49.1; the field is queried in
LGM's frame (its box, marching step and σ threshold are convert.py's numbers) and the Gaussians are
rendered with the same camera directions at s times the distance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConvertSchedule, RunConfig
from ..io.mesh import TexturedMesh
from ..render.mesh import rasterize_faces
from ..representations.base import Representation
from ..representations.nerf import NerfField
from ..sir.cameras import Cameras
from .extract import DensityGrid, sample_grid
from .texture import TextureSampler, dilate
from .uv import UVMesh

#: LGM's camera: distance and vertical field of view (degrees) of its renders
LGM_RADIUS, LGM_FOVY = 1.5, 49.1
#: what to do when the fitted σ nowhere reaches the threshold
EMPTY_FIELD_REMEDY = "fit the field longer: raise mesh.lgm.cpu/cuda.field_iterations, or lower mesh.lgm.threshold"
#: loss weights of convert.py: alpha, normal consistency, offset size
ALPHA_WEIGHT, NORMAL_WEIGHT, OFFSET_WEIGHT = 0.1, 1e-3, 0.1


def frame_scale(cfg: RunConfig) -> float:
    """Run-frame length of one LGM unit (module docstring)."""
    c = cfg.cameras
    return c.radius * math.tan(math.radians(c.fovy) / 2) / (LGM_RADIUS * math.tan(math.radians(LGM_FOVY) / 2))


@dataclass
class ConvertLog:
    """First and last loss of each fit (None for one that did not run)."""

    field_loss: tuple[float, float] | None
    vertex_loss: tuple[float, float] | None
    texture_loss: tuple[float, float] | None

    @classmethod
    def of(cls, losses: dict[str, list[float]]) -> "ConvertLog":
        """From each fit's losses, keyed ``field``, ``vertex``, ``texture``."""
        def span(values: list[float]) -> tuple[float, float] | None:
            return (values[0], values[-1]) if values else None

        return cls(*(span(losses.get(k, [])) for k in ("field", "vertex", "texture")))


def _randint(low: int, high: int, n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(low, high, (n,), generator=generator).float()


def _cameras(elevation: Tensor, azimuth: Tensor, distance: Tensor, resolution: int, scale: float) -> tuple[Cameras, Cameras]:
    """The same views in LGM's frame and in the run's (``scale`` times the distance)."""
    return (Cameras.orbit(elevation, azimuth, distance, resolution, LGM_FOVY),
            Cameras.orbit(elevation, azimuth, distance * scale, resolution, LGM_FOVY))


def fit_field(model: Representation, cfg: RunConfig, schedule: ConvertSchedule, generator: torch.Generator,
              device: torch.device) -> tuple[NerfField, list[float]]:
    """A NeRF in LGM's frame fitted to ``model``'s renders (fit 1), finalized; and its losses."""
    scale = frame_scale(cfg)
    field = NerfField(cfg.mesh.lgm.nerf, device, generator)
    background = torch.tensor(cfg.background, dtype=torch.float32, device=device)
    size = schedule.field_resolution
    losses = []
    for step in range(schedule.field_iterations):
        distance = 1.5 + 1.5 * torch.rand(1, generator=generator)
        lgm, run = _cameras(_randint(-45, 45, 1, generator), _randint(-180, 180, 1, generator), distance, size, scale)
        with torch.no_grad():
            target = model.render(run.to(device), background)
        pixels = torch.arange(size * size)
        if 0 < schedule.field_rays < size * size:
            pixels = torch.randperm(size * size, generator=generator)[:schedule.field_rays]
        pixels = pixels.to(device)
        out = field.render_pixels(lgm.to(device), background, pixels[None])
        rgb = target.rgb.reshape(3, -1)[:, pixels]
        alpha = target.alpha.reshape(-1)[pixels]
        loss = F.mse_loss(out.rgb.reshape(3, -1), rgb) + ALPHA_WEIGHT * F.mse_loss(out.alpha.reshape(-1), alpha)
        loss.backward()
        field.step(step, out)
        losses.append(float(loss.detach()))
    field.finalize()
    return field, losses


def field_grid(field: NerfField, cfg: RunConfig) -> DensityGrid:
    """The fitted σ on ``cfg.mesh.lgm.resolution³`` points around the object, in run-frame coordinates."""
    scale = frame_scale(cfg)
    c = cfg.mesh.lgm
    return sample_grid(lambda points: field.density(points / scale), field.cfg.radius * scale, c.resolution, c.threshold)


def field_colour(field: NerfField, cfg: RunConfig) -> Callable[[Tensor], Tensor]:
    """The fitted colour at run-frame points ``[P,3]`` → ``[P,3]``."""
    scale = frame_scale(cfg)
    return lambda points: field.colour(points / scale)


def surface_points(vertices: Tensor, faces: Tensor, face_id: Tensor, origins: Tensor, directions: Tensor) -> Tensor:
    """Where rays ``[P,3]`` (origins, directions) meet the planes of the faces ``face_id [P]`` the rasterizer
    found under them: ``o + t·d`` with ``t = (v0 − o)·n / (d·n)``, ``n`` the face normal — the point the
    rasterizer's perspective-correct barycentrics interpolate, as a differentiable function of ``vertices``."""
    tri = vertices[faces[face_id]]  # [P,3,3]
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    t = ((tri[:, 0] - origins) * normal).sum(-1) / (directions * normal).sum(-1)
    return origins + t[:, None] * directions


def silhouette_coverage(vertices: Tensor, faces: Tensor, face_id: Tensor, cameras: Cameras) -> Tensor:
    """Antialiased coverage ``[H,W]`` of one view, differentiable in ``vertices`` at the outline (the
    coverage part of nvdiffrast's ``antialias``): for each pair of horizontal or vertical neighbours of
    which one is covered (by face ``f``, from ``face_id [H,W]``) and one is not, ``t`` is where the segment
    between their centres leaves ``f`` in screen space (0 at the covered centre, 1 at the other); the
    uncovered pixel gains ``max(t − ½, 0)`` and the covered one loses ``max(½ − t, 0)``."""
    view = cameras.viewmats()[0].to(vertices)
    cam = vertices @ view[:3, :3].T + view[:3, 3]
    fx, fy = cameras.focal
    screen = torch.stack([fx * cam[:, 0] / cam[:, 2] + cameras.width / 2,
                          fy * cam[:, 1] / cam[:, 2] + cameras.height / 2], -1)  # pixel units, y down
    covered = face_id >= 0
    coverage = covered.to(vertices.dtype).reshape(-1)
    height, width = face_id.shape
    rows, cols = torch.meshgrid(torch.arange(height, device=face_id.device),
                                torch.arange(width, device=face_id.device), indexing="ij")
    for dr, dc in ((0, 1), (1, 0)):
        a = (slice(0, height - dr), slice(0, width - dc))
        b = (slice(dr, height), slice(dc, width))
        for inside, outside in ((a, b), (b, a)):
            edge = covered[inside] & ~covered[outside]
            if not edge.any():
                continue
            p_index = (rows[inside][edge] * width + cols[inside][edge])
            q_index = (rows[outside][edge] * width + cols[outside][edge])
            tri = screen[faces[face_id[inside][edge]]]  # [N,3,2]
            p = torch.stack([cols[inside][edge], rows[inside][edge]], -1).to(screen) + 0.5
            q = torch.stack([cols[outside][edge], rows[outside][edge]], -1).to(screen) + 0.5
            first = tri
            second = tri.roll(-1, dims=1)
            direction = second - first  # [N,3,2]

            def side(point: Tensor) -> Tensor:
                rel = point[:, None, :] - first
                return direction[..., 0] * rel[..., 1] - direction[..., 1] * rel[..., 0]

            at_p, at_q = side(p), side(q)
            crosses = (at_p * at_q) < 0
            t, exit_edge = torch.where(crosses, at_p / torch.where(crosses, at_p - at_q, torch.ones_like(at_p)),
                                       torch.ones_like(at_p)).min(1)
            # as nvdiffrast, each edge is resolved across its more perpendicular axis only (no double count)
            along = direction[torch.arange(len(t), device=t.device), exit_edge].abs().detach()
            keep = (along[:, 1] >= along[:, 0]) if dc else (along[:, 0] > along[:, 1])
            t = torch.where(keep, t, torch.full_like(t, 0.5))
            coverage = coverage.index_add(0, q_index, (t - 0.5).clamp_min(0))
            coverage = coverage.index_add(0, p_index, -(0.5 - t).clamp_min(0))
    return coverage.reshape(height, width)


def _edge_faces(faces: np.ndarray) -> Tensor:
    """``[E,2]`` the two faces beside each edge that exactly two faces share."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    owner = np.repeat(np.arange(len(faces)), 3)
    order = np.lexsort((edges[:, 1], edges[:, 0]))
    edges, owner = edges[order], owner[order]
    same = (edges[1:] == edges[:-1]).all(1)
    first = np.flatnonzero(same)
    lone = np.ones(len(first), bool)  # drop edges shared by more than two faces
    if len(first) > 1:
        lone[1:] &= first[1:] != first[:-1] + 1
        lone[:-1] &= first[:-1] + 1 != first[1:]
    first = first[lone]
    return torch.from_numpy(np.stack([owner[first], owner[first + 1]], 1))


def _normal_consistency(vertices: Tensor, faces: Tensor, pairs: Tensor) -> Tensor:
    """Mean ``1 − cos`` of the angle between the normals of neighbouring faces."""
    tri = vertices[faces]
    normal = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1)
    return (1 - (normal[pairs[:, 0]] * normal[pairs[:, 1]]).sum(-1)).mean()


def fit_vertices(model: Representation, field: NerfField, vertices: np.ndarray, faces: np.ndarray, cfg: RunConfig,
                 schedule: ConvertSchedule, generator: torch.Generator, backend: str = "auto"
                 ) -> tuple[np.ndarray, list[float]]:
    """Run-frame ``vertices`` moved by offsets fitted (with ``field``'s colour) to ``model``'s renders (fit 2).

    Each step renders the mesh from one camera (elevation in [−10, 10), any azimuth, distance 1.5): the
    rasterizer picks the face under each pixel, :func:`surface_points` makes its point a function of the
    vertices and the field colours it; :func:`silhouette_coverage` gives the alpha. Offsets are in LGM units
    (Adam at ``vertex_lr``, the field's colour at ``vertex_field_lr``). convert.py's remeshing and
    learning-rate halving every 512 steps are left out.
    """
    device = field.device
    c = cfg.mesh.lgm
    scale = frame_scale(cfg)
    background = torch.tensor(cfg.background, dtype=torch.float32, device=device)
    start = torch.from_numpy(vertices).float().to(device)
    tris = torch.from_numpy(faces).long().to(device)
    pairs = _edge_faces(faces).to(device)
    offsets = torch.zeros_like(start, requires_grad=True)
    optimizer = torch.optim.Adam([{"params": [offsets], "lr": c.vertex_lr},
                                  {"params": [field.params, *field.feature_network.parameters()],
                                   "lr": c.vertex_field_lr}])
    size = schedule.vertex_resolution
    losses = []
    for _ in range(schedule.vertex_iterations):
        _, run = _cameras(_randint(-10, 10, 1, generator), _randint(-180, 180, 1, generator),
                          torch.full((1,), LGM_RADIUS), size, scale)
        run = run.to(device)
        with torch.no_grad():
            target = model.render(run, background)
        moved = start + scale * offsets
        face_id = rasterize_faces(TexturedMesh(moved.detach(), tris), run, backend)[0][0]
        pixels = (face_id.reshape(-1) >= 0).nonzero()[:, 0]
        origins, directions = run.rays(pixels[None])
        points = surface_points(moved, tris, face_id.reshape(-1)[pixels], origins[0], directions[0])
        image = background[:, None].expand(3, size * size).index_copy(1, pixels, field.rgb(points / scale).T)
        alpha = silhouette_coverage(moved, tris, face_id, run)
        loss = (F.mse_loss(image, target.rgb.reshape(3, -1)) + ALPHA_WEIGHT * F.mse_loss(alpha, target.alpha[0, 0])
                + NORMAL_WEIGHT * _normal_consistency(moved, tris, pairs) + OFFSET_WEIGHT * offsets.square().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return (start + scale * offsets).detach().cpu().numpy().astype(vertices.dtype), losses


def fit_texture(model: Representation, mesh: UVMesh, texture: Tensor, covered: Tensor, cfg: RunConfig,
                schedule: ConvertSchedule, generator: torch.Generator, backend: str = "auto") -> tuple[Tensor, list[float]]:
    """``texture [T,T,3]`` fitted to ``model``'s renders from near-front cameras (fit 3), padded again.

    convert.py draws one camera per step; here ``schedule.texture_views`` are drawn once and every step fits
    all of them (one rasterization instead of one per step)."""
    device = texture.device
    background = torch.tensor(cfg.background, dtype=torch.float32, device=device)
    views = schedule.texture_views
    distance = torch.full((views,), LGM_RADIUS)
    _, run = _cameras(_randint(-5, 5, views, generator), _randint(-15, 15, views, generator), distance,
                      schedule.texture_resolution, frame_scale(cfg))
    run = run.to(device)
    with torch.no_grad():
        targets = model.render(run, background).rgb
    sampler = TextureSampler(mesh.textured().to(device), run, texture.shape[0], background, backend)
    logits = torch.logit(texture.clamp(1e-4, 1 - 1e-4)).detach().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=cfg.mesh.lgm.texture_lr)
    losses = []
    for _ in range(schedule.texture_iterations):
        loss = F.mse_loss(sampler.render(torch.sigmoid(logits)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return dilate(torch.sigmoid(logits).detach(), covered.to(device)), losses
