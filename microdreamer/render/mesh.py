"""Textured-mesh rendering: rasterize with an interchangeable backend, then shade in torch.

A backend (``torch`` reference, ``cpu`` C++/OpenMP kernel, ``nvdiffrast`` on CUDA) turns camera-space
triangles into per-pixel face ids, perspective-correct barycentrics and depth. Shading is shared:
UVs and vertex colours are interpolated, the texture is looked up with bilinear filtering over a mip
pyramid (level chosen per pixel from the analytic UV footprint, so minified textures do not alias),
and the result is composited over the background. Gradients reach ``texture``, ``vertex_colors``,
``base_color`` and ``background``, not the geometry. Colours are the surface albedo (``albedo``
shading) or the albedo lit by a :class:`KeyLight` (``lit``), which uses the per-pixel normals every
backend's render carries.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..io.mesh import TexturedMesh
from ..sir.cameras import Cameras
from ._build import ExtensionUnavailable, load_extension
from .types import RenderOutput

MESH_BACKENDS = ("auto", "torch", "cpu", "nvdiffrast")
#: normals of faces meeting at a vertex are averaged there unless they differ by more than this angle
CREASE_DEGREES = 60.0

Rasterizer = Callable[..., tuple[Tensor, Tensor, Tensor]]


def resolve_mesh_backend(name: str, device: torch.device | str) -> str:
    """``auto`` → nvdiffrast on CUDA when installed, else the C++ kernel when it builds, else torch."""
    if name not in MESH_BACKENDS:
        raise UserError(f"unknown mesh backend '{name}' (choose one of {', '.join(MESH_BACKENDS)})")
    if name != "auto":
        return name
    if torch.device(device).type == "cuda" and importlib.util.find_spec("nvdiffrast") is not None:
        return "nvdiffrast"
    try:
        load_extension("mesh")
    except ExtensionUnavailable:
        return "torch"
    return "cpu"


def _rasterizer(name: str) -> Rasterizer:
    if name == "torch":
        from .mesh_torch import rasterize_torch

        return rasterize_torch
    if name == "cpu":
        from .mesh_cpu import rasterize_cpu

        def rasterize(*args, **kwargs):
            try:
                return rasterize_cpu(*args, **kwargs)
            except ExtensionUnavailable as exc:
                raise UserError(f"mesh backend cpu is unavailable ({exc}); use backend torch") from exc

        return rasterize
    from .mesh_nvdiffrast import rasterize_nvdiffrast

    return rasterize_nvdiffrast


@dataclass(frozen=True)
class KeyLight:
    """Lambert shading by a key light fixed to the object, plus ambient light (the look of a studio photo):
    colour = albedo · (ambient + key · max(0, n · l)).

    ``direction`` points from the object towards the light in world coordinates (y up, the azimuth-0
    camera on +z): the default lights the object from the upper front-left as that camera sees it, and
    turns with the object, not with the camera. A white surface ranges from 0.4 (turned away from the
    light) to 0.9 (facing it): like a photographed white object it never reaches the white background,
    so its silhouette and shading are visible from every side.
    """

    direction: tuple[float, float, float] = (-1.0, 1.0, 1.0)
    ambient: float = 0.4
    key: float = 0.5

    def factor(self, normals: Tensor) -> Tensor:
        """Brightness ``[...,1]`` of unit ``normals [...,3]``."""
        light = F.normalize(torch.tensor(self.direction, dtype=normals.dtype, device=normals.device), dim=0)
        return self.ambient + self.key * (normals @ light).clamp_min(0)[..., None]


#: a render's shading mode → its light (None: the albedo itself)
SHADINGS: dict[str, KeyLight | None] = {"lit": KeyLight(), "albedo": None}


def shading_light(name: str) -> KeyLight | None:
    """The light of shading mode ``name`` (``lit`` or ``albedo``)."""
    if name not in SHADINGS:
        raise UserError(f"unknown shading '{name}' (choose one of {', '.join(SHADINGS)})")
    return SHADINGS[name]


def rasterize_mesh(
    mesh: TexturedMesh,
    cameras: Cameras,
    background: Tensor,
    backend: str = "auto",
    texture: Tensor | None = None,
    supersample: int = 1,
    light: KeyLight | None = None,
) -> RenderOutput:
    """Render ``mesh`` from each camera, composited over ``background [3]``; ``light`` shades the albedo.

    ``texture [H,W,3]`` overrides ``mesh.texture`` (pass a tensor that requires grad to refine it).
    ``supersample`` s renders at s×s samples per pixel and box-filters them, so ``alpha`` becomes
    antialiased coverage and ``depth`` the coverage-weighted depth (RenderOutput's convention; with
    s = 1 alpha is 0/1). ``extras`` holds ``face_id [B,sH,sW]`` (−1 background), ``bary [B,sH,sW,2]``
    (weights of each face's first two vertices) and ``normal [B,sH,sW,3]`` (world-space unit normals
    turned towards the camera, zero on the background; see :func:`_normals`) on the sample grid.
    """
    if supersample < 1:
        raise ValueError("supersample must be >= 1")
    width, height = cameras.width * supersample, cameras.height * supersample
    cams = cameras.to(mesh.device).with_resolution(width, height)
    face_id, bary, depth, verts = _rasterize(mesh, cams, backend)
    fx, fy = cams.focal
    covered = face_id >= 0
    samples = _Samples.of(face_id, bary)
    colour = samples.scatter(_shade(mesh, texture, verts.detach(), samples, fx, fy, width / 2, height / 2))
    normal = samples.scatter(_normals(mesh, samples, cams.centers()))
    if light is not None:
        colour = colour * light.factor(normal)
    alpha = covered.unsqueeze(-1).to(colour.dtype)
    rgb = colour * alpha + background.to(colour) * (1 - alpha)
    rgb, alpha = rgb.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)
    depth = (depth * covered)[:, None]
    if supersample > 1:
        rgb, alpha, depth = (F.avg_pool2d(x, supersample) for x in (rgb, alpha, depth))
    return RenderOutput(rgb=rgb, alpha=alpha, depth=depth,
                        extras={"face_id": face_id, "bary": bary, "normal": normal})


def rasterize_faces(mesh: TexturedMesh, cameras: Cameras, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The rasterizer's buffers alone, without shading: ``face_id [B,H,W]`` (−1 background), ``bary
    [B,H,W,2]`` and camera-space ``depth [B,H,W]`` (no gradients)."""
    return _rasterize(mesh, cameras.to(mesh.device), backend)[:3]


def _rasterize(mesh: TexturedMesh, cameras: Cameras, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Face ids, barycentrics, depth and the camera-space vertices ``[B,V,3]``."""
    viewmats = cameras.viewmats()
    verts = torch.einsum("bij,vj->bvi", viewmats[:, :3, :3], mesh.vertices) + viewmats[:, None, :3, 3]
    fx, fy = cameras.focal
    w, h = cameras.width, cameras.height
    face_id, bary, depth = _rasterizer(resolve_mesh_backend(backend, mesh.device))(
        verts, mesh.faces, w, h, fx, fy, w / 2, h / 2, cameras.near, cameras.far
    )
    return face_id, bary, depth, verts


def corner_normals(mesh: TexturedMesh) -> Tensor:
    """Unit normals ``[F,3,3]`` at each face's corners, cached on the mesh: the area-weighted mean of the
    normals of the faces around the corner's position (vertices split at UV seams are joined again) that
    differ from the face's own by at most :data:`CREASE_DEGREES`, so hard edges stay hard and faces of
    opposite orientation (two-sided sheets) do not cancel."""
    key = (mesh.vertices.data_ptr(), mesh.vertices._version, mesh.faces.data_ptr(), mesh.faces._version,
           tuple(mesh.faces.shape))
    if mesh.cache.get("normals_key") != key:
        with torch.no_grad():
            tri = mesh.vertices[mesh.faces].double()  # [F,3,3]
            area_normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
            unit = F.normalize(area_normal, dim=-1)
            _, position = torch.unique(mesh.vertices, dim=0, return_inverse=True)
            at = position[mesh.faces].reshape(-1)  # joined vertex of each corner [3F]
            face = torch.arange(len(mesh.faces), device=at.device).repeat_interleave(3)
            # every (corner, face around the corner's position) pair, from the corners sorted by position
            order = torch.argsort(at, stable=True)
            count = torch.bincount(at)
            first = torch.cumsum(count, 0) - count  # where each position's corners start in ``order``
            fan = count[at]
            corner = torch.arange(len(at), device=at.device).repeat_interleave(fan)
            within = torch.arange(len(corner), device=at.device) - (torch.cumsum(fan, 0) - fan).repeat_interleave(fan)
            other = face[order[first[at[corner]] + within]]
            cos = (unit[face[corner]] * unit[other]).sum(-1, keepdim=True)
            weight = torch.where(cos >= math.cos(math.radians(CREASE_DEGREES)), area_normal[other], 0.0)
            summed = torch.zeros(len(at), 3, dtype=tri.dtype, device=tri.device).index_add_(0, corner, weight)
            normals = F.normalize(summed, dim=-1).reshape(-1, 3, 3).float()
        mesh.cache.update(normals_key=key, normals=normals)
    return mesh.cache["normals"]


@dataclass
class _Samples:
    """The covered samples of a render as one flat list: flat index into ``[B·H·W]``, view, face and the
    barycentric weights ``[N,3,1]`` of the face's corners."""

    shape: tuple[int, int, int]  # B, H, W
    pixel: Tensor
    view: Tensor
    face: Tensor
    weights: Tensor

    @classmethod
    def of(cls, face_id: Tensor, bary: Tensor) -> "_Samples":
        b, h, w = face_id.shape
        pixel = (face_id >= 0).reshape(-1).nonzero()[:, 0]
        bary = bary.reshape(-1, 2)[pixel]
        weights = torch.cat([bary, 1 - bary.sum(-1, keepdim=True)], -1)[..., None]
        view = torch.div(pixel, h * w, rounding_mode="floor")
        return cls((b, h, w), pixel, view, face_id.reshape(-1)[pixel], weights)

    def scatter(self, values: Tensor) -> Tensor:
        """Per-sample ``values [N,C]`` → ``[B,H,W,C]``, zero where nothing was hit."""
        full = torch.zeros(math.prod(self.shape), values.shape[-1], dtype=values.dtype, device=values.device)
        return full.index_copy(0, self.pixel, values).reshape(*self.shape, -1)


def _normals(mesh: TexturedMesh, samples: _Samples, centers: Tensor) -> Tensor:
    """World-space unit normals ``[N,3]`` of the surface at each sample: :func:`corner_normals` interpolated
    with the barycentrics, turned to the side of the face that the camera at ``centers [B,3]`` sees (both
    sides of a face are drawn, so an open surface seen from behind is lit on its back)."""
    normal = F.normalize((corner_normals(mesh)[samples.face] * samples.weights).sum(-2), dim=-1)
    tri = mesh.vertices[mesh.faces[samples.face]]  # [N,3,3]
    facing = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    towards = ((centers.to(tri)[samples.view] - tri[:, 0]) * facing).sum(-1, keepdim=True)
    return torch.where(towards < 0, -normal, normal)


def _shade(
    mesh: TexturedMesh, texture: Tensor | None, verts: Tensor, samples: _Samples,
    fx: float, fy: float, cx: float, cy: float,
) -> Tensor:
    """Albedo ``[N,3]`` of the covered samples: base colour × texture(uv) × vertex colour, where present."""
    _, h, w = samples.shape
    pixel, view, fid, weights = samples.pixel, samples.view, samples.face, samples.weights
    corners = mesh.faces[fid]  # [N,3]
    colour = mesh.base_color.expand(len(pixel), 3)
    texture = mesh.texture if texture is None else texture
    if texture is not None and mesh.uvs is not None:
        uv = (mesh.uvs[corners] * weights).sum(-2)
        with torch.no_grad():
            row = torch.div(pixel % (h * w), w, rounding_mode="floor")
            ray = torch.stack([((pixel % w) + 0.5 - cx) / fx, (row + 0.5 - cy) / fy], -1).to(verts.dtype)
            footprint = _uv_footprint(verts, mesh.faces, mesh.uvs, view, fid, ray, uv, fx, fy, texture.shape[:2])
        wrap = bool(((mesh.uvs < 0) | (mesh.uvs > 1)).any())
        colour = colour * sample_texture(texture, uv, footprint, wrap, _pyramid(mesh, texture))
    if mesh.vertex_colors is not None:
        colour = colour * (mesh.vertex_colors[corners] * weights).sum(-2)
    return colour


def _uv_footprint(
    verts: Tensor, faces: Tensor, uvs: Tensor, view: Tensor, fid: Tensor, ray: Tensor, uv: Tensor,
    fx: float, fy: float, size: tuple[int, int],
) -> Tensor:
    """Texels covered by one pixel step at each shaded sample ``[N]``, from the exact derivative of the
    perspective UV map (``view``/``fid``: camera and face of each sample, ``ray``: its (x/z, y/z)).

    Per face, u(d) = (n_u · d) / (s · d) for the pixel ray d, with n_u = Σ_i uv_i,u (p_j × p_k) and
    s = Σ_i p_j × p_k, so ∂u/∂x_pixel = (n_u,x − u s_x) / ((s · d) fx), and likewise for v and y.
    """
    from .mesh_torch import triangle_setup

    a, _ = triangle_setup(verts, faces)  # [B,F,3,3]
    n = torch.einsum("bfik,fic->bfck", a, uvs[faces])[view, fid]  # [N,2(u,v),3]
    s = a.sum(2)[view, fid]  # [N,3]
    sd = s[:, 0] * ray[:, 0] + s[:, 1] * ray[:, 1] + s[:, 2]
    sd = torch.where(sd.abs() > 1e-12, sd, 1e-12)[:, None]
    scale = torch.tensor([size[1], size[0]], device=uv.device, dtype=uv.dtype)  # texels per unit of u, v
    d_dx = (n[..., 0] - uv * s[:, None, 0]) / (sd * fx) * scale
    d_dy = (n[..., 1] - uv * s[:, None, 1]) / (sd * fy) * scale
    return torch.maximum(d_dx.norm(dim=-1), d_dy.norm(dim=-1))


def _pyramid(mesh: TexturedMesh, texture: Tensor) -> list[Tensor] | None:
    """The mip pyramid of a texture that cannot change under us, cached on the mesh; None otherwise."""
    if texture.requires_grad and torch.is_grad_enabled():
        return None
    key = (texture.data_ptr(), texture._version, tuple(texture.shape), texture.dtype, texture.device)
    if mesh.cache.get("mip_key") != key:
        with torch.no_grad():
            levels = [texture]
            while max(levels[-1].shape[:2]) > 1:
                levels.append(_halve(levels[-1]))
        mesh.cache.update(mip_key=key, mip_levels=levels)
    return mesh.cache["mip_levels"]


def sample_texture(
    texture: Tensor, uv: Tensor, footprint: Tensor | None = None, wrap: bool = False,
    pyramid: list[Tensor] | None = None,
) -> Tensor:
    """Bilinear lookup of ``texture [Ht,Wt,C]`` at ``uv [...,2]`` (origin bottom-left) → ``[...,C]``.

    With ``footprint`` (texels per pixel step, ``uv.shape[:-1]``) the lookup blends the two nearest
    levels of a box-filtered mip pyramid (trilinear filtering); the pyramid is built from ``texture``
    with differentiable ops unless a precomputed one (``texture`` first) is given. ``wrap`` repeats
    the texture outside [0,1], otherwise edges are clamped.
    """
    if wrap:
        uv = uv - uv.floor()
    shape = uv.shape[:-1]
    grid = torch.stack([2 * uv[..., 0] - 1, 1 - 2 * uv[..., 1]], -1).reshape(1, 1, -1, 2).to(texture.dtype)

    def lookup(image: Tensor, points: Tensor) -> Tensor:  # image [h,w,C], points [1,1,n,2] → [n,C]
        out = F.grid_sample(image.permute(2, 0, 1)[None], points, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out[0, :, 0].T

    channels = texture.shape[2]
    if footprint is None:
        return lookup(texture, grid).reshape(*shape, channels)
    levels = max(texture.shape[0], texture.shape[1]).bit_length()  # as many as _halve makes
    lod = footprint.reshape(-1).clamp_min(1e-12).log2().clamp(0, levels - 1)
    top = int(lod.max().ceil()) if lod.numel() else 0
    result = torch.zeros(lod.shape[0], channels, dtype=texture.dtype, device=texture.device)
    level = texture
    for index in range(top + 1):
        if index > 0:
            level = pyramid[index] if pyramid is not None else _halve(level)
        weight = (1 - (lod - index).abs()).clamp_min(0)
        chosen = (weight > 0).nonzero()[:, 0]
        if len(chosen):
            term = weight[chosen, None] * lookup(level, grid[:, :, chosen])
            result = result.index_add(0, chosen, term)
    return result.reshape(*shape, channels)


def _halve(image: Tensor) -> Tensor:
    """Next mip level of ``[h,w,C]``: 2×2 box filter (area resampling for odd sizes)."""
    h, w, c = image.shape
    if h % 2 or w % 2:
        small = F.interpolate(image.permute(2, 0, 1)[None], size=(max(1, h // 2), max(1, w // 2)), mode="area")
        return small[0].permute(1, 2, 0)
    pairs = image.reshape(h // 2, 2, w // 2, 2 * c)
    rows = pairs[:, 0] + pairs[:, 1]
    return (rows[..., :c] + rows[..., c:]) * 0.25
