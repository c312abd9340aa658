"""The texture of an unwrapped mesh: bake it from renders, pad it across chart borders, refine it with SIR.

- :func:`texel_surface` rasterizes the UV layout: the surface point and normal behind every texel.
- :func:`bake` projects those points into a set of renders (of the Gaussians) and averages the colours
  of the views that see them, weighted towards frontal views; texels no view sees take the colour of
  the nearest seen surface point.
- :func:`dilate` fills every texel outside the charts with the colour of the nearest chart texel, so
  bilinear and mip lookups at chart borders never pick up unrelated colours (no visible seams).
- :class:`TextureSampler` renders a mesh of fixed geometry from fixed cameras as a differentiable
  function of its texture. The rasterization buffers (face id, barycentrics: nvdiffrast on CUDA, the
  C++ kernel on the CPU, via :func:`rasterize_mesh`) are computed once; every render is then a gather
  of trilinear mip lookups, so gradients reach the texture cheaply.
- :func:`refine_texture` is one SIR iteration (paper §V, spec §6.8): render views, noise the renders to
  ``t`` and denoise them with the teacher (DDIM, eta 0), then fit the texture to the refined images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial import cKDTree
from torch import Tensor

from ..config import MeshConfig
from ..io.mesh import TexturedMesh
from ..render.mesh import rasterize_mesh
from ..sir.cameras import Cameras
from ..sir.engine import Reference
from ..sir.refiner import refine
from ..teachers.base import Teacher
from .uv import UVMesh

#: vertical field of view (degrees) of a camera at distance 1 whose image spans exactly one unit
_UNIT_FOVY = math.degrees(2 * math.atan(0.5))


@dataclass
class TexelSurface:
    """The surface point behind each texel whose centre lies inside a chart."""

    covered: Tensor  # [T,T] bool, row 0 = top of the texture image
    index: Tensor  # [N] flat indices (row-major) of the covered texels
    position: Tensor  # [N,3] world position
    normal: Tensor  # [N,3] unit normal (interpolated vertex normals)


def texel_surface(mesh: UVMesh, size: int, backend: str = "auto", device: torch.device | str = "cpu") -> TexelSurface:
    """Rasterize the UV layout at ``size²``: a camera at the origin looking down −z sees the layout
    placed at z = −1 with ``(u, v) ↦ (u − ½, v − ½)``, which puts texel (row r, column c) centre at
    ``u = (c + ½)/size``, ``v = 1 − (r + ½)/size`` — the lookup convention of :func:`sample_texture`."""
    flat = TexturedMesh(
        vertices=torch.from_numpy(np.concatenate([mesh.uvs - 0.5, -np.ones((len(mesh.uvs), 1), np.float32)], 1)),
        faces=torch.from_numpy(mesh.uv_faces),
    ).to(device)
    camera = Cameras(torch.eye(4, device=device)[None], torch.zeros(1), torch.zeros(1), torch.ones(1),
                     size, size, fovy=_UNIT_FOVY, near=0.5, far=2.0)
    out = rasterize_mesh(flat, camera, torch.zeros(3, device=device), backend)
    face_id, bary = out.extras["face_id"][0].cpu(), out.extras["bary"][0].cpu()
    covered = face_id >= 0
    index = covered.reshape(-1).nonzero()[:, 0]
    fid = face_id.reshape(-1)[index]
    b = bary.reshape(-1, 2)[index]
    weights = torch.cat([b, 1 - b.sum(-1, keepdim=True)], -1)[:, :, None]  # [N,3,1]
    corners = torch.from_numpy(mesh.uv_faces)[fid]  # [N,3] UV vertices
    positions = torch.from_numpy(mesh.vertices[mesh.source]).float()
    normals = torch.from_numpy(mesh.vertex_normals()[mesh.source]).float()
    normal = F.normalize((normals[corners] * weights).sum(1), dim=-1)
    return TexelSurface(covered, index, (positions[corners] * weights).sum(1), normal)


def bake_cameras(radius: float, resolution: int, fovy: float) -> Cameras:
    """24 views around the object: 8 azimuths at 20° above and 25° below, 4 at 65° above and below."""
    elevation = [-20.0] * 8 + [25.0] * 8 + [-65.0] * 4 + [65.0] * 4
    azimuth = [45.0 * i for i in range(8)] + [22.5 + 45.0 * i for i in range(8)] + [90.0 * i for i in range(4)] * 2
    return Cameras.orbit(elevation, azimuth, radius, resolution, fovy)


def bake(
    surface: TexelSurface, size: int, images: Tensor, depth: Tensor, cameras: Cameras,
    depth_tolerance: float, sharpness: float = 4.0,
) -> Tensor:
    """Texture ``[size,size,3]`` whose covered texels average ``images [V,3,H,W]`` over the views that
    see them; uncovered texels are zero (see :func:`dilate`).

    A texel is seen by a view when its point projects inside the image, faces the camera and lies
    within ``depth_tolerance`` of the mesh depth ``depth [V,1,H,W]`` there (nothing in front). Weights
    are ``cos(θ)^sharpness`` for the angle between the normal and the direction to the camera.
    """
    device = images.device
    points, normals = surface.position.to(device), surface.normal.to(device)
    viewmats = cameras.viewmats().to(device)
    fx, fy = cameras.focal
    height, width = images.shape[-2:]
    total = torch.zeros(len(points), 3, device=device)
    weight = torch.zeros(len(points), device=device)
    for v in range(len(cameras)):
        cam = points @ viewmats[v, :3, :3].T + viewmats[v, :3, 3]
        z = cam[:, 2].clamp_min(1e-6)
        px, py = fx * cam[:, 0] / z + width / 2, fy * cam[:, 1] / z + height / 2
        col, row = px.floor().long(), py.floor().long()
        inside = (cam[:, 2] > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
        surface_depth = depth[v, 0][row.clamp(0, height - 1), col.clamp(0, width - 1)]
        to_camera = F.normalize(cameras.centers()[v].to(device) - points, dim=-1)
        cosine = (normals * to_camera).sum(-1)
        seen = inside & (cosine > 0) & (surface_depth > 0) & ((cam[:, 2] - surface_depth).abs() < depth_tolerance)
        grid = torch.stack([2 * px / width - 1, 2 * py / height - 1], -1)[None, None]
        colour = F.grid_sample(images[v:v + 1], grid, mode="bilinear", padding_mode="border", align_corners=False)
        w = cosine.clamp_min(0).pow(sharpness) * seen
        total += w[:, None] * colour[0, :, 0].T
        weight += w
    seen = weight > 0
    colours = torch.zeros(len(points), 3, device=device)
    colours[seen] = total[seen] / weight[seen, None]
    if seen.any() and not seen.all():  # the nearest seen surface point lends its colour
        tree = cKDTree(points[seen].cpu().numpy())
        _, nearest = tree.query(points[~seen].cpu().numpy())
        colours[~seen] = colours[seen][torch.from_numpy(nearest).to(device)]
    texture = torch.zeros(size * size, 3, device=device)
    texture[surface.index.to(device)] = colours
    return texture.reshape(size, size, 3)


def dilate(texture: Tensor, covered: Tensor) -> Tensor:
    """Every texel outside ``covered`` takes the value of the nearest covered texel."""
    if covered.all() or not covered.any():
        return texture
    _, (rows, cols) = ndimage.distance_transform_edt(~covered.cpu().numpy(), return_indices=True)
    rows, cols = torch.from_numpy(rows).to(texture.device), torch.from_numpy(cols).to(texture.device)
    return texture[rows, cols]


def mip_pyramid(texture: Tensor) -> list[Tensor]:
    """``texture [C,T,T]`` (T a power of two) and its 2×2 box-filtered halvings down to 1×1."""
    levels = [texture]
    while levels[-1].shape[-1] > 1:
        levels.append(F.avg_pool2d(levels[-1][None], 2)[0])
    return levels


class TextureSampler:
    """Renders of one mesh from fixed cameras as a differentiable function of a ``[T,T,3]`` texture.

    Each of the ``supersample²`` samples per pixel looks the texture up trilinearly: bilinear taps on
    the two mip levels around its level of detail, which comes from the ratio of the face's texel area
    to its screen area in that view. Renders are composited on ``background`` and box-filtered, so
    silhouettes are antialiased like the reference renders.
    """

    def __init__(self, mesh: TexturedMesh, cameras: Cameras, texture_size: int, background: Tensor,
                 backend: str = "auto", supersample: int = 2) -> None:
        device = mesh.device
        cameras = cameras.to(device)
        out = rasterize_mesh(mesh, cameras, background, backend, supersample=supersample)
        face_id, bary = out.extras["face_id"], out.extras["bary"]
        batch, rows, cols = face_id.shape
        self.shape = (batch, rows, cols)
        self.supersample = supersample
        self.background = background.to(device)
        self.coverage = out.alpha  # [B,1,H,W]
        pixel = (face_id >= 0).reshape(-1).nonzero()[:, 0]
        view = pixel // (rows * cols)
        fid = face_id.reshape(-1)[pixel]
        weights = torch.cat([bary.reshape(-1, 2)[pixel], 1 - bary.reshape(-1, 2)[pixel].sum(-1, keepdim=True)], -1)
        corners = mesh.faces[fid]
        uv = (mesh.uvs[corners] * weights[..., None]).sum(1)
        position = (mesh.vertices[corners] * weights[..., None]).sum(1)
        # level of detail: texels per sample step, from the face's UV area over its projected area
        scaled = cameras.with_resolution(cols, rows)
        viewmats = scaled.viewmats()
        cam = torch.einsum("bij,vj->bvi", viewmats[:, :3, :3], mesh.vertices) + viewmats[:, None, :3, 3]
        fx, fy = scaled.focal
        screen = torch.stack([fx * cam[..., 0] / cam[..., 2].clamp_min(1e-6),
                              fy * cam[..., 1] / cam[..., 2].clamp_min(1e-6)], -1)  # [B,V,2]
        screen_area = _area2d(screen[:, mesh.faces])  # [B,F]
        uv_area = _area2d(mesh.uvs[mesh.faces] * texture_size)  # [F]
        footprint = (uv_area[fid] / screen_area[view, fid].clamp_min(1e-12)).sqrt()
        levels = int(math.log2(texture_size)) + 1
        lod = footprint.clamp_min(1e-12).log2().clamp(0, levels - 1)
        low = lod.floor().long().clamp_max(levels - 1)
        high = (low + 1).clamp_max(levels - 1)
        blend = lod - low
        taps = [_bilinear_taps(uv, low, texture_size, 1 - blend), _bilinear_taps(uv, high, texture_size, blend)]
        self.index = torch.cat([t[0] for t in taps], 1)  # [N,8] into the flattened pyramid
        self.weight = torch.cat([t[1] for t in taps], 1)
        self.pixel = pixel
        # how squarely each sample faces its camera (for the reference view's mask)
        tri = mesh.vertices[mesh.faces[fid]]
        normal = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=-1)
        to_camera = F.normalize(cameras.centers()[view] - position, dim=-1)
        facing = torch.zeros(batch * rows * cols, device=device)
        facing[pixel] = (normal * to_camera).sum(-1).clamp_min(0)
        self.facing = F.avg_pool2d(facing.reshape(batch, 1, rows, cols), supersample)  # [B,1,H,W]

    def render(self, texture: Tensor) -> Tensor:
        """Images ``[B,3,H,W]`` of the mesh wearing ``texture [T,T,3]``."""
        flat = torch.cat([level.reshape(3, -1) for level in mip_pyramid(texture.permute(2, 0, 1))], 1)
        colour = (flat[:, self.index] * self.weight).sum(-1)  # [3,N]
        batch, rows, cols = self.shape
        image = self.background[:, None].expand(3, batch * rows * cols)
        image = image.index_copy(1, self.pixel, colour)
        image = image.reshape(3, batch, rows, cols).transpose(0, 1)
        return F.avg_pool2d(image, self.supersample) if self.supersample > 1 else image

    def interior(self, margin: int = 1) -> Tensor:
        """Pixels ``[B,1,H,W]`` fully covered by the mesh and at least ``margin`` pixels from its outline."""
        full = (self.coverage >= 1 - 1e-6).float()
        return -F.max_pool2d(-full, 2 * margin + 1, stride=1, padding=margin) > 0.5


def _area2d(tri: Tensor) -> Tensor:
    """Areas of 2D triangles ``[...,3,2]``."""
    a, b = tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :]
    return 0.5 * (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]).abs()


def _bilinear_taps(uv: Tensor, level: Tensor, size: int, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Flattened-pyramid indices and weights ``([N,4], [N,4])`` of bilinear lookups at ``uv`` (origin
    bottom-left) on mip ``level`` (per sample), edges clamped — as ``grid_sample`` with border padding."""
    side = torch.div(size, 2 ** level, rounding_mode="floor")
    offset = torch.tensor([sum((size >> i) ** 2 for i in range(j)) for j in range(int(math.log2(size)) + 1)],
                          device=uv.device)[level]
    x = uv[:, 0] * side - 0.5
    y = (1 - uv[:, 1]) * side - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    last = side - 1
    cols = torch.stack([torch.minimum(x0.clamp_min(0), last), torch.minimum((x0 + 1).clamp_min(0), last)], -1)
    rows = torch.stack([torch.minimum(y0.clamp_min(0), last), torch.minimum((y0 + 1).clamp_min(0), last)], -1)
    index = offset[:, None] + torch.stack([rows[:, 0] * side + cols[:, 0], rows[:, 0] * side + cols[:, 1],
                                           rows[:, 1] * side + cols[:, 0], rows[:, 1] * side + cols[:, 1]], -1)
    weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1) * scale[:, None]
    return index, weight


@dataclass
class RefineLog:
    steps: int
    loss_first: float
    loss_last: float
    timestep: int
    evaluations: int


def refine_cameras(views: int, radius: float, resolution: int, fovy: float, generator: torch.Generator) -> Cameras:
    """``views`` cameras at elevation 0, evenly spread from an azimuth offset in [−180, −180 + 360/views)."""
    spacing = 360 // views
    base = -180 + int(torch.randint(0, spacing, (1,), generator=generator))
    return Cameras.orbit([0.0] * views, [base + spacing * i for i in range(views)], radius, resolution, fovy)


def refine_texture(
    mesh: TexturedMesh,
    texture: Tensor,
    covered: Tensor,
    teacher: Teacher,
    cfg: MeshConfig,
    radius: float,
    fovy: float,
    background: Tensor,
    generator: torch.Generator,
    reference: Reference | None = None,
    backend: str = "auto",
) -> tuple[Tensor, RefineLog]:
    """One SIR iteration on the texture: targets from the teacher once, then ``cfg.refine_steps`` Adam
    steps (lr ``cfg.refine_lr`` on the texture's logits) of the mean squared error.

    Targets come from :func:`refine` with t1 = t2 = ``cfg.refine_t`` (pure noise adding, no inversion)
    and DDIM sampling with ``cfg.refine_eta``. The error counts only pixels well inside the mesh's
    outline, so that silhouette differences between the extracted mesh and the teacher's images do not
    paint background into the texture. With a ``reference`` view, its squared error is added on the
    pixels inside the input mask whose surface faces the camera (cosine > 0.5), as in spec §6.8.
    """
    device = texture.device
    background = background.to(device)
    cameras = refine_cameras(cfg.refine_views, radius, cfg.refine_resolution, fovy, generator).to(device)
    sampler = TextureSampler(mesh, cameras, texture.shape[0], background, backend)
    before = teacher.evaluations.total
    with torch.no_grad():
        renders = sampler.render(texture)
        targets = refine(teacher, renders, cameras, cfg.refine_t, cfg.refine_t, cfg.refine_denoise_steps,
                         cfg.refine_eta, cfg.refine_guidance, generator).to(device)
    keep = sampler.interior().expand_as(renders)
    terms = [(sampler, targets, keep)]
    if reference is not None:
        ref_sampler = TextureSampler(mesh, reference.camera, texture.shape[0], background, backend)
        ref_keep = ref_sampler.interior() & (reference.mask.to(device) > 0.5) & (ref_sampler.facing > 0.5)
        terms.append((ref_sampler, reference.rgb.to(device), ref_keep.expand(-1, 3, -1, -1)))
    logits = torch.logit(texture.clamp(1e-4, 1 - 1e-4)).detach().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=cfg.refine_lr)
    losses = []
    for _ in range(cfg.refine_steps):
        current = torch.sigmoid(logits)
        loss = sum(((s.render(current) - t).square() * k).sum() / k.sum().clamp_min(1) for s, t, k in terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    refined = dilate(torch.sigmoid(logits).detach(), covered.to(device))
    log = RefineLog(cfg.refine_steps, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                    cfg.refine_t, teacher.evaluations.total - before)
    return refined, log
