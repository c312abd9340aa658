"""Surface metrics between two triangle meshes given in the same frame (the unit box, by convention).

Both surfaces are sampled uniformly by area; nearest neighbours come from a k-d tree.

- **Chamfer distance** (L1 form): ``½ (mean_a min_b ‖a − b‖ + mean_b min_a ‖b − a‖)`` with Euclidean
  (not squared) distances, in the units of the meshes.
- **F-score at τ**: harmonic mean of precision (share of predicted samples within τ of the reference)
  and recall (share of reference samples within τ of the prediction).
- **Normal consistency**: mean ``|n_a · n_b|`` between each sample's face normal and the normal of its
  nearest sample on the other surface, averaged over both directions (orientation-free, so a reference
  with flipped faces is not penalised).

Each surface is sampled with its own generator seeded from ``seed``, so the same mesh on both sides
gives the same samples and exactly zero distance.

**Topology** (:func:`topology`): connected parts, boundary loops and genus from the Euler characteristic,
per part ``g = (2 − χ − b) / 2`` with χ = V − E + F and b boundary loops, summed over the parts (vertices
at the same position are one vertex, so UV seams do not open the surface; faces on the same three vertices
count modulo 2, so a flat two-face flap, which decimation can leave, is no surface). The genus is that of
a manifold surface: where edges are shared by more than two faces (counted apart) it means little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

DEFAULT_SAMPLES = 100_000
DEFAULT_THRESHOLDS = (0.01, 0.05)


@dataclass
class SurfaceScores:
    chamfer: float
    fscore: dict[float, float]
    precision: dict[float, float]
    recall: dict[float, float]
    normal_consistency: float


def sample_surface(
    vertices: np.ndarray, faces: np.ndarray, count: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points uniform by area on the triangles, with their unit face normals ``([n,3], [n,3])``."""
    tri = np.asarray(vertices, np.float64)[np.asarray(faces)]  # [F,3,3]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    if not np.isfinite(double_area).all() or double_area.sum() <= 0:
        raise ValueError("the mesh has no surface area to sample")
    face = torch.multinomial(torch.from_numpy(double_area), count, replacement=True, generator=generator).numpy()
    r = torch.rand(count, 2, generator=generator, dtype=torch.float64).numpy()
    s = np.sqrt(r[:, :1])  # (1 − √r1, √r1(1 − r2), √r1 r2) is uniform on a triangle
    weights = np.concatenate([1 - s, s * (1 - r[:, 1:]), s * r[:, 1:]], 1)
    points = np.einsum("nk,nkc->nc", weights, tri[face])
    normals = cross[face] / np.maximum(double_area[face], 1e-300)[:, None]
    return points, normals


def compare_surfaces(
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    ref_vertices: np.ndarray,
    ref_faces: np.ndarray,
    samples: int = DEFAULT_SAMPLES,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    seed: int = 0,
) -> SurfaceScores:
    """Chamfer, F-scores and normal consistency of a predicted surface against a reference one."""
    pred, pred_n = sample_surface(pred_vertices, pred_faces, samples, torch.Generator().manual_seed(seed))
    ref, ref_n = sample_surface(ref_vertices, ref_faces, samples, torch.Generator().manual_seed(seed))
    to_ref, near_ref = cKDTree(ref).query(pred)  # accuracy side: predicted samples → reference
    to_pred, near_pred = cKDTree(pred).query(ref)  # completeness side: reference samples → prediction
    chamfer = 0.5 * (to_ref.mean() + to_pred.mean())
    precision = {t: float((to_ref <= t).mean()) for t in thresholds}
    recall = {t: float((to_pred <= t).mean()) for t in thresholds}
    fscore = {
        t: 0.0 if precision[t] + recall[t] == 0 else 2 * precision[t] * recall[t] / (precision[t] + recall[t])
        for t in thresholds
    }
    consistency = 0.5 * (
        np.abs((pred_n * ref_n[near_ref]).sum(1)).mean() + np.abs((ref_n * pred_n[near_pred]).sum(1)).mean()
    )
    return SurfaceScores(float(chamfer), fscore, precision, recall, float(consistency))


@dataclass
class Topology:
    components: int  # connected parts
    boundary_loops: int  # 0 for closed surfaces
    genus: float  # summed over the parts; a half means a non-manifold or non-orientable part
    nonmanifold_edges: int = 0  # edges of more than two faces
    repeated_faces: int = 0  # faces dropped as pairs on the same three vertices

    @property
    def closed(self) -> bool:
        return self.boundary_loops == 0


def topology(vertices: np.ndarray, faces: np.ndarray) -> Topology:
    """Parts, boundary loops and genus of a triangle mesh (see the module docstring)."""
    _, joined = np.unique(np.asarray(vertices), axis=0, return_inverse=True)
    tri = joined.reshape(-1)[np.asarray(faces)]
    tri = tri[(tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2])]
    _, first, copies = np.unique(np.sort(tri, axis=1), axis=0, return_index=True, return_counts=True)
    odd = np.sort(first[copies % 2 == 1])
    repeated = len(tri) - len(odd)
    tri = tri[odd]
    n = int(joined.max()) + 1
    edges = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), axis=1)
    edges, uses = np.unique(edges, axis=0, return_counts=True)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    parts, label = connected_components(graph, directed=False)
    used = np.zeros(n, bool)
    used[tri.reshape(-1)] = True
    kept = np.unique(label[used])  # parts with a face (lone vertices are not surfaces)
    boundary = edges[uses == 1]
    loop_graph = coo_matrix((np.ones(len(boundary)), (boundary[:, 0], boundary[:, 1])), shape=(n, n))
    _, loop = connected_components(loop_graph, directed=False)
    on_boundary = np.zeros(n, bool)
    on_boundary[boundary.reshape(-1)] = True
    v = np.bincount(label[used], minlength=parts)
    e = np.bincount(label[edges[:, 0]], minlength=parts)
    f = np.bincount(label[tri[:, 0]], minlength=parts)
    loops = np.zeros(parts, int)
    pairs = np.unique(np.stack([label[on_boundary], loop[on_boundary]]), axis=1)  # (part, loop) once each
    np.add.at(loops, pairs[0], 1)
    chi = v - e + f
    genus = (2 - chi - loops) / 2
    return Topology(len(kept), int(loops[kept].sum()), float(genus[kept].sum()), int((uses > 2).sum()), repeated)
