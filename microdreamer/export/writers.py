"""Mesh files: GLB with an embedded texture, OBJ + MTL + PNG, PLY with vertex colours.

Orientation and scale, the same for every format: the object's bounding box is centred at the origin
and scaled so that its longest side is ``scale`` (1: the unit box), in the units of the file (glTF:
metres). ``up="y"`` keeps the world axes of the run, which are glTF's: +y up, and the input view's
camera on +z, so the object's front faces +z. ``up="z"`` turns the object by +90° about x, so its
top points along +z and its front faces −y (the front view of Z-up tools such as Blender); glTF
files are Y-up by definition, so this is offered for OBJ and PLY only.

All files of one export appear together: each is written under a temporary name and renamed once
every one of them is complete.
"""

from __future__ import annotations

import io
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..io.atomic import atomic_path
from ..render.mesh import sample_texture
from .uv import UVMesh

#: x, y, z of the output from the world's, per up axis (proper rotations)
_UP = {"y": np.eye(3), "z": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])}


@dataclass(frozen=True)
class OutputFrame:
    """World (the run's frame) → file: ``R_up · (x − center) · scale / size``; kept in the export report
    so that a mesh file can be put back into its run's frame (e.g. to compare it with the Gaussians)."""

    center: tuple[float, float, float]  # centre of the world bounding box
    size: float  # its longest side
    scale: float
    up: str

    @classmethod
    def fit(cls, vertices: np.ndarray, up: str, scale: float) -> "OutputFrame":
        lo, hi = vertices.min(0), vertices.max(0)
        return cls(tuple(float(c) for c in (lo + hi) / 2), max(float((hi - lo).max()), 1e-12), scale, up)

    def to_file(self, points: np.ndarray) -> np.ndarray:
        return (points - np.asarray(self.center)) * (self.scale / self.size) @ _UP[self.up].T

    def to_world(self, points: np.ndarray) -> np.ndarray:
        return points @ _UP[self.up] * (self.size / self.scale) + np.asarray(self.center)


@dataclass
class MeshAsset:
    """What every writer needs, already in the output frame."""

    vertices: np.ndarray  # [V,3] positions
    normals: np.ndarray  # [V,3] unit vertex normals
    uvs: np.ndarray  # [U,2] origin bottom-left
    uv_faces: np.ndarray  # [F,3] into uvs
    source: np.ndarray  # [U] position vertex of each UV vertex
    texture: np.ndarray  # [T,T,3] uint8, top row first
    frame: OutputFrame

    @property
    def faces(self) -> np.ndarray:
        return self.source[self.uv_faces]

    def vertex_colors(self) -> np.ndarray:
        """``[V,3]`` uint8: the texture at each vertex, averaged over the vertex's UV copies."""
        texture = torch.from_numpy(self.texture.astype(np.float32) / 255.0)
        at_uv = sample_texture(texture, torch.from_numpy(self.uvs)).numpy()
        total = np.zeros((len(self.vertices), 3))
        np.add.at(total, self.source, at_uv)
        count = np.bincount(self.source, minlength=len(self.vertices))[:, None]
        return np.clip(np.round(total / np.maximum(count, 1) * 255), 0, 255).astype(np.uint8)


def output_frame(mesh: UVMesh, texture: torch.Tensor, up: str, scale: float) -> MeshAsset:
    """Centre, scale and orient ``mesh`` (see the module docstring); texture in [0,1] → uint8."""
    frame = OutputFrame.fit(mesh.vertices, up, scale)
    normals = mesh.vertex_normals() @ _UP[up].T
    image = (texture.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return MeshAsset(frame.to_file(mesh.vertices), normals, mesh.uvs, mesh.uv_faces, mesh.source, image, frame)


def output_paths(out_dir: Path, stem: str, fmt: str) -> list[Path]:
    """The files an export in ``fmt`` writes, main file first."""
    if fmt == "glb":
        return [out_dir / f"{stem}.glb"]
    if fmt == "obj":
        return [out_dir / f"{stem}.obj", out_dir / f"{stem}.mtl", out_dir / f"{stem}_albedo.png"]
    if fmt == "ply":
        return [out_dir / f"{stem}_mesh.ply"]
    raise UserError(f"unknown mesh format '{fmt}' (choose glb, obj or ply)")


def write_mesh(asset: MeshAsset, out_dir: Path, stem: str, fmt: str) -> list[Path]:
    """Write ``asset`` in ``fmt``; returns the paths (see :func:`output_paths`)."""
    paths = output_paths(out_dir, stem, fmt)
    with ExitStack() as stack:
        temporary = [stack.enter_context(atomic_path(p)) for p in paths]
        if fmt == "glb":
            temporary[0].write_bytes(glb_bytes(asset))
        elif fmt == "obj":
            temporary[0].write_text(obj_text(asset, paths[1].name))
            temporary[1].write_text(mtl_text(paths[2].name))
            Image.fromarray(asset.texture).save(temporary[2], format="PNG")
        else:
            temporary[0].write_bytes(ply_bytes(asset))
    return paths


def glb_bytes(asset: MeshAsset) -> bytes:
    """Binary glTF: one mesh, per-vertex UVs and normals (shared across UV seams, so no shading seams),
    a PBR material with the texture as base colour (metallic 0, roughness 1: plain albedo)."""
    import trimesh
    from trimesh.exchange.gltf import export_glb
    from trimesh.visual.material import PBRMaterial

    material = PBRMaterial(baseColorTexture=Image.fromarray(asset.texture), metallicFactor=0.0,
                           roughnessFactor=1.0, doubleSided=False)
    mesh = trimesh.Trimesh(
        vertices=asset.vertices[asset.source], faces=asset.uv_faces, vertex_normals=asset.normals[asset.source],
        visual=trimesh.visual.TextureVisuals(uv=asset.uvs, material=material), process=False,
    )
    return export_glb(trimesh.Scene(mesh), include_normals=True)


def obj_text(asset: MeshAsset, mtl_name: str) -> str:
    """Wavefront OBJ: one position per vertex (the surface stays welded), UVs and normals indexed apart."""
    out = io.StringIO()
    out.write(f"# microdreamer textured mesh\nmtllib {mtl_name}\n")
    np.savetxt(out, asset.vertices, fmt="v %.6f %.6f %.6f")
    np.savetxt(out, asset.uvs, fmt="vt %.6f %.6f")
    np.savetxt(out, asset.normals, fmt="vn %.5f %.5f %.5f")
    out.write("usemtl albedo\n")
    position, uv = asset.faces + 1, asset.uv_faces + 1
    corners = np.stack([position, uv, position], -1).reshape(len(position), 9)
    np.savetxt(out, corners, fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    return out.getvalue()


def mtl_text(texture_name: str) -> str:
    return (
        "newmtl albedo\nKa 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\n"
        f"d 1.0\nillum 1\nmap_Kd {texture_name}\n"
    )


def ply_bytes(asset: MeshAsset) -> bytes:
    """Binary PLY with welded vertices, their normals and colours (the texture averaged per vertex)."""
    import trimesh

    colors = np.concatenate([asset.vertex_colors(), np.full((len(asset.vertices), 1), 255, np.uint8)], 1)
    mesh = trimesh.Trimesh(vertices=asset.vertices, faces=asset.faces, vertex_normals=asset.normals,
                           vertex_colors=colors, process=False)
    return mesh.export(file_type="ply")
