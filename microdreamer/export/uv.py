"""UV unwrapping with xatlas: charts, packed into one square atlas.

A vertex on a chart border carries one UV per chart, so the unwrapped mesh has *UV vertices*, each
pointing at its position vertex (``source``); the geometry itself keeps one vertex per position.
UVs follow the OBJ/OpenGL convention used across the package (origin at the texture's bottom-left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..io.mesh import TexturedMesh

#: a chart may cover at most this share of the surface: many small charts parametrise much faster
#: than a few large ones (xatlas's cost grows steeply with chart size)
MAX_CHART_SHARE = 1 / 200
#: xatlas's chart-growing refinement passes; on marching-cubes meshes one pass costs ~7× the rest of
#: the unwrap and only merges charts (seams are padded anyway, see ``texture.dilate``)
CHART_ITERATIONS = 0


@dataclass
class UVMesh:
    """A triangle mesh with a UV atlas; ``faces = source[uv_faces]``."""

    vertices: np.ndarray  # [V,3] float64 positions
    uvs: np.ndarray  # [U,2] float32 in [0,1], origin bottom-left
    uv_faces: np.ndarray  # [F,3] int64 indices into uvs
    source: np.ndarray  # [U] int64 position vertex of each UV vertex

    @property
    def faces(self) -> np.ndarray:
        return self.source[self.uv_faces]

    def vertex_normals(self) -> np.ndarray:
        """Area-weighted unit normals per position vertex ``[V,3]`` (shared across UV seams)."""
        faces = self.faces
        tri = self.vertices[faces]
        face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2·area
        normals = np.zeros_like(self.vertices)
        for corner in range(3):
            np.add.at(normals, faces[:, corner], face_normals)
        return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-20)

    def textured(self, texture: torch.Tensor | None = None) -> TexturedMesh:
        """The renderable form: one vertex per UV vertex (positions repeated along seams)."""
        return TexturedMesh(
            vertices=torch.from_numpy(self.vertices[self.source].astype(np.float32)),
            faces=torch.from_numpy(self.uv_faces),
            uvs=torch.from_numpy(self.uvs),
            texture=texture,
        )


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int) -> UVMesh:
    """Charts and a packing for a ``texture_size²`` atlas with ``padding`` texels between charts."""
    import xatlas

    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices.astype(np.float32), faces.astype(np.uint32))
    charts = xatlas.ChartOptions()
    charts.max_chart_area = float(area * MAX_CHART_SHARE)
    charts.max_iterations = CHART_ITERATIONS
    packing = xatlas.PackOptions()
    packing.resolution = texture_size
    packing.padding = padding
    packing.bilinear = True
    packing.blockAlign = True
    atlas.generate(charts, packing)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas packed {atlas.atlas_count} atlases instead of one")
    source, uv_faces, uvs = atlas.get_mesh(0)
    return UVMesh(
        vertices=np.asarray(vertices, np.float64),
        uvs=np.clip(uvs, 0.0, 1.0).astype(np.float32),
        uv_faces=uv_faces.astype(np.int64),
        source=source.astype(np.int64),
    )
