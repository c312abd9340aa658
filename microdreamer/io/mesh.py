"""Textured triangle meshes: loading .obj (+mtl+png), .glb and .gltf into one flat, renderable form.

A loaded mesh is one triangle list in world units (y up, as glTF and the shipped OBJ assets are). The
colour of a surface point is ``base_color · texture(uv) · vertex_color``, each factor present or not.
UV seams are handled by split vertices: a vertex that carries two UVs becomes two vertices, so ``uvs``
is per vertex. UVs follow the OBJ/OpenGL convention (origin at the image's bottom-left corner; trimesh
already flips glTF UVs into it), and ``texture`` is stored top row first, as the image file is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

#: colour of meshes that carry neither texture, vertex colours nor a material colour
DEFAULT_COLOR = (0.7, 0.7, 0.7)
#: longest side of a texture atlas built from several textured parts
_ATLAS_MAX_SIDE = 4096
#: texels of edge replication around each atlas tile (keeps bilinear/mip lookups inside the tile)
_ATLAS_PAD = 4


@dataclass
class TexturedMesh:
    """One triangle mesh with optional UV texture and vertex colours (see the module docstring)."""

    vertices: Tensor  # [V,3] float32
    faces: Tensor  # [F,3] int64
    uvs: Tensor | None = None  # [V,2] float32, origin bottom-left
    texture: Tensor | None = None  # [H,W,3] float32 in [0,1], top row first
    vertex_colors: Tensor | None = None  # [V,3] float32 in [0,1]
    base_color: Tensor | None = None  # [3] float32; None means white
    #: renderer scratch space (the texture's mip pyramid, keyed by the texture's identity and version)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.base_color is None:
            self.base_color = torch.ones(3, dtype=torch.float32, device=self.vertices.device)

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    @property
    def has_texture(self) -> bool:
        return self.texture is not None and self.uvs is not None

    def to(self, device: torch.device | str) -> "TexturedMesh":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return TexturedMesh(
            move(self.vertices), move(self.faces), move(self.uvs), move(self.texture),
            move(self.vertex_colors), move(self.base_color),
        )

    def normalized(self) -> "TexturedMesh":
        """Bounding box centred at the origin, longest side 1 (the "unit box" used by the metrics too)."""
        lo, hi = self.vertices.amin(0), self.vertices.amax(0)
        scale = (hi - lo).max().clamp_min(1e-12)
        return replace(self, vertices=(self.vertices - (lo + hi) / 2) / scale, cache={})


@dataclass
class _Part:
    """One scene geometry, already in world coordinates, with its material resolved."""

    vertices: np.ndarray  # [V,3]
    faces: np.ndarray  # [F,3]
    uvs: np.ndarray | None
    image: np.ndarray | None  # [H,W,3] float32
    colors: np.ndarray | None  # [V,3]
    factor: np.ndarray  # [3] material colour, multiplies the rest


def load_mesh(path: str | Path, normalize: bool = True, yaw: float = 0.0) -> TexturedMesh:
    """Read a triangle mesh with its texture or colours; scenes are flattened with their node transforms.

    Skinned glTF meshes come in their bind pose. ``yaw`` turns the mesh about +y by that many degrees
    (right-handed: 90 turns a model that faces −x to face +z, towards the azimuth-0 camera).
    ``normalize`` then fits it in the unit box (:meth:`TexturedMesh.normalized`). Raises
    :class:`UserError` for a missing or unreadable file or one without triangles.
    """
    import trimesh

    path = Path(path)
    if not path.exists():
        raise UserError(f"mesh file not found: {path} (check the path)")
    if not path.is_file():
        raise UserError(f"mesh path is not a file: {path} (give an .obj, .glb or .gltf file)")
    if path.stat().st_size == 0:
        raise UserError(f"mesh file is empty: {path} (expected a triangle mesh: .obj, .glb or .gltf)")
    try:
        scene = trimesh.load(str(path), force="scene")
    except Exception as exc:  # trimesh raises many types for malformed files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(
            f"could not read mesh {path}: not a valid {path.suffix or 'mesh'} file ({reason}); "
            "expected a triangle mesh: .obj, .glb or .gltf"
        ) from exc
    parts = []
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geometry = scene.geometry.get(name)
        if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces) > 0:
            parts.append(_part(geometry, transform))
    if not parts:
        raise UserError(f"{path} contains no triangles (expected a triangle mesh: .obj, .glb or .gltf)")
    mesh = _merge(parts)
    if yaw:
        c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
        turn = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
        mesh.vertices = mesh.vertices @ turn.T
    return mesh.normalized() if normalize else mesh


def _part(geometry, transform: np.ndarray) -> _Part:
    """Resolve one trimesh geometry's visual into uvs/image/colours/factor, in world coordinates."""
    visual = geometry.visual
    uvs = image = colors = None
    factor = np.ones(3, dtype=np.float32)
    if visual.kind == "face":  # flat face colours: give every face its own three vertices
        geometry = geometry.copy()
        face_colors = geometry.visual.face_colors
        geometry.unmerge_vertices()
        visual = geometry.visual
        colors = np.repeat(face_colors[:, :3], 3, axis=0)  # unmerged vertex k belongs to face k // 3
    elif visual.kind == "vertex":
        colors = visual.vertex_colors[:, :3]
    elif visual.kind == "texture":
        material = visual.material
        if hasattr(material, "baseColorFactor"):  # glTF PBR
            picture = material.baseColorTexture
            if material.baseColorFactor is not None:
                factor = _unit_colour(material.baseColorFactor)
        else:  # OBJ SimpleMaterial: Kd only colours untextured surfaces
            picture = getattr(material, "image", None)
            if picture is None and getattr(material, "diffuse", None) is not None:
                factor = _unit_colour(material.diffuse)
        if picture is not None and visual.uv is not None and len(visual.uv) == len(geometry.vertices):
            uvs = np.asarray(visual.uv, dtype=np.float32)
            image = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
        attrs = getattr(visual, "vertex_attributes", {})
        if "color" in attrs and len(attrs["color"]) == len(geometry.vertices):
            colors = np.asarray(attrs["color"])[:, :3]
    else:
        factor = np.asarray(DEFAULT_COLOR, dtype=np.float32)
    if colors is not None:
        colors = _unit_colour(colors)
    vertices = np.asarray(geometry.vertices, np.float64) @ transform[:3, :3].T + transform[:3, 3]
    return _Part(vertices, np.asarray(geometry.faces, dtype=np.int64), uvs, image, colors, factor)


def _unit_colour(values) -> np.ndarray:
    """uint8 (0..255) or float (0..1) colours, RGB or RGBA → float32 RGB in [0,1]."""
    values = np.asarray(values)
    scaled = values / 255.0 if np.issubdtype(values.dtype, np.integer) else values
    return np.clip(scaled[..., :3], 0.0, 1.0).astype(np.float32)


def _merge(parts: list[_Part]) -> TexturedMesh:
    """Concatenate parts; several textured parts share one atlas, material colours are baked in."""
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    vertices = np.concatenate([p.vertices for p in parts])
    faces = np.concatenate([p.faces + o for p, o in zip(parts, offsets)])
    mesh = TexturedMesh(torch.from_numpy(vertices.astype(np.float32)), torch.from_numpy(faces))
    textured = [p.image is not None for p in parts]
    with_colors = any(p.colors is not None for p in parts)
    if len(parts) == 1:
        (part,) = parts
        if part.image is not None:
            mesh.uvs, mesh.texture = torch.from_numpy(part.uvs), torch.from_numpy(part.image * part.factor)
        else:
            mesh.base_color = torch.from_numpy(part.factor)
        if part.colors is not None:
            mesh.vertex_colors = torch.from_numpy(part.colors)
        return mesh
    if any(textured):
        uvs, atlas = _atlas(parts)
        mesh.uvs, mesh.texture = torch.from_numpy(uvs), torch.from_numpy(atlas)
        factors = [np.ones(3, np.float32)] * len(parts)  # baked into the atlas tiles
    else:
        factors = [p.factor for p in parts]
        with_colors = True  # per-part material colours become vertex colours
    if with_colors:
        colors = [
            (p.colors if p.colors is not None else np.ones((len(p.vertices), 3), np.float32)) * f
            for p, f in zip(parts, factors)
        ]
        mesh.vertex_colors = torch.from_numpy(np.concatenate(colors).astype(np.float32))
    return mesh


def _atlas(parts: list[_Part]) -> tuple[np.ndarray, np.ndarray]:
    """Pack every part's texture (or a solid tile of its material colour) into a square-cell grid.

    Each cell holds one tile resized to the cell, padded by edge replication; UVs are clamped to
    [0,1] (a repeating texture cannot wrap inside an atlas) and remapped into their cell.
    """
    columns = math.ceil(math.sqrt(len(parts)))
    rows = math.ceil(len(parts) / columns)
    largest = max(max(p.image.shape[:2]) if p.image is not None else 8 for p in parts)
    cell = min(largest + 2 * _ATLAS_PAD, _ATLAS_MAX_SIDE // max(columns, rows))
    inner = cell - 2 * _ATLAS_PAD
    atlas = np.zeros((rows * cell, columns * cell, 3), np.float32)
    uvs = []
    for i, part in enumerate(parts):
        row, col = divmod(i, columns)
        if part.image is not None:
            image = torch.from_numpy(part.image).permute(2, 0, 1)[None]
            image = torch.nn.functional.interpolate(image, (inner, inner), mode="bilinear", antialias=True)
            tile = image[0].permute(1, 2, 0).clamp(0, 1).numpy() * part.factor
            uv = np.clip(part.uvs, 0.0, 1.0)
        else:
            tile = np.broadcast_to(part.factor, (inner, inner, 3))
            uv = np.full((len(part.vertices), 2), 0.5, np.float32)
        padded = np.pad(tile, ((_ATLAS_PAD, _ATLAS_PAD), (_ATLAS_PAD, _ATLAS_PAD), (0, 0)), mode="edge")
        atlas[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = padded
        u = (col * cell + _ATLAS_PAD + uv[:, 0] * inner) / (columns * cell)
        v = 1.0 - (row * cell + _ATLAS_PAD + (1.0 - uv[:, 1]) * inner) / (rows * cell)
        uvs.append(np.stack([u, v], -1))
    return np.concatenate(uvs).astype(np.float32), atlas
