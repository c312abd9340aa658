"""Surface metrics against hand-computable cases."""

import numpy as np
import pytest
import torch
import trimesh

from microdreamer.mesh_metrics import Topology, compare_surfaces, sample_surface, topology

SQUARE_V = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
SQUARE_F = np.array([[0, 1, 2], [0, 2, 3]])


def test_identical_meshes_score_perfectly():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    s = compare_surfaces(sphere.vertices, sphere.faces, sphere.vertices, sphere.faces, samples=5000)
    assert s.chamfer == 0.0
    assert s.fscore == {0.01: 1.0, 0.05: 1.0}
    assert s.normal_consistency == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [0.003, 0.02, 0.08])
def test_a_copy_shifted_along_its_normal_is_exactly_that_far(shift):
    # Every point of the shifted square lies straight above a point of the original and vice versa.
    moved = SQUARE_V + [0.0, 0.0, shift]
    s = compare_surfaces(moved, SQUARE_F, SQUARE_V, SQUARE_F, samples=4000)
    assert s.chamfer == pytest.approx(shift, rel=1e-9)
    for tau in (0.01, 0.05):
        expected = 1.0 if shift <= tau else 0.0
        assert s.fscore[tau] == expected and s.precision[tau] == expected and s.recall[tau] == expected
    assert s.normal_consistency == pytest.approx(1.0)


def test_flipped_reference_faces_do_not_lower_normal_consistency():
    s = compare_surfaces(SQUARE_V, SQUARE_F, SQUARE_V, SQUARE_F[:, ::-1], samples=2000)
    assert s.normal_consistency == pytest.approx(1.0)


def test_perpendicular_surfaces_have_zero_normal_consistency():
    wall = SQUARE_V[:, [0, 2, 1]]  # the square turned into the xz plane
    s = compare_surfaces(SQUARE_V, SQUARE_F, wall, SQUARE_F, samples=2000)
    assert s.normal_consistency == pytest.approx(0.0, abs=1e-9)


def test_concentric_spheres_chamfer_is_the_radius_gap():
    inner = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    outer = trimesh.creation.icosphere(subdivisions=5, radius=0.53)
    s = compare_surfaces(outer.vertices, outer.faces, inner.vertices, inner.faces, samples=20000)
    # flat facets sit up to ~0.1 % inside the true sphere and samples are discrete: allow a little slack
    assert s.chamfer == pytest.approx(0.03, abs=2e-3)
    assert s.fscore[0.05] == 1.0 and s.fscore[0.01] == 0.0


def test_samples_are_uniform_by_area():
    big = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # area 3
    small = np.array([[10.0, 0.0, 0.0], [12.0, 0.0, 0.0], [10.0, 1.0, 0.0]])  # area 1
    points, normals = sample_surface(np.concatenate([big, small]), np.array([[0, 1, 2], [3, 4, 5]]), 40000,
                                     torch.Generator().manual_seed(0))
    share_small = (points[:, 0] >= 10).mean()
    assert share_small == pytest.approx(0.25, abs=0.01)
    on_big = points[points[:, 0] < 10]
    assert (on_big[:, 0] / 3 + on_big[:, 1] / 2 <= 1 + 1e-12).all()  # inside the big triangle
    assert np.allclose(np.abs(normals[:, 2]), 1.0)


def test_same_seed_same_samples_and_degenerate_mesh_is_an_error():
    a = sample_surface(SQUARE_V, SQUARE_F, 100, torch.Generator().manual_seed(3))[0]
    b = sample_surface(SQUARE_V, SQUARE_F, 100, torch.Generator().manual_seed(3))[0]
    assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        sample_surface(np.zeros((3, 3)), np.array([[0, 1, 2]]), 10, torch.Generator())


def test_topology_counts_parts_holes_and_boundaries():
    sphere, torus = trimesh.creation.icosphere(subdivisions=2), trimesh.creation.torus(0.5, 0.2)
    assert topology(sphere.vertices, sphere.faces) == Topology(1, 0, 0.0)
    assert topology(torus.vertices, torus.faces) == Topology(1, 0, 1.0)
    both = trimesh.util.concatenate([sphere, torus.apply_translation([3.0, 0, 0])])
    assert topology(both.vertices, both.faces) == Topology(2, 0, 1.0)
    tube = trimesh.creation.cylinder(0.3, 1.0, sections=24)
    open_tube = tube.faces[np.abs(tube.face_normals[:, 2]) < 0.5]  # the side without its caps
    assert topology(tube.vertices, open_tube) == Topology(1, 2, 0.0)
    # vertices split at UV seams (copies at one position) are joined: the surface stays closed
    split = sphere.vertices[sphere.faces].reshape(-1, 3)
    assert topology(split, np.arange(len(split)).reshape(-1, 3)) == Topology(1, 0, 0.0)
    assert topology(tube.vertices, open_tube).closed is False and topology(sphere.vertices, sphere.faces).closed
    # a flat flap (two faces on the same vertices) hinged on an edge is no surface; one face there makes
    # the edge non-manifold and opens a boundary
    a, b = torus.faces[0, :2]
    tip = len(torus.vertices)
    vertices = np.concatenate([torus.vertices, [[0.0, 2.0, 0.0]]])
    flap = np.concatenate([torus.faces, [[a, b, tip], [b, a, tip]]])
    assert topology(vertices, flap) == Topology(1, 0, 1.0, nonmanifold_edges=0, repeated_faces=2)
    fin = topology(vertices, np.concatenate([torus.faces, [[a, b, tip]]]))
    assert (fin.nonmanifold_edges, fin.boundary_loops, fin.repeated_faces) == (1, 1, 0)


def test_topology_of_the_shared_assets_with_a_known_genus():
    from shared_assets import SHARED_ASSETS

    from microdreamer.io.mesh import load_mesh

    for name, genus in (("bob/bob_tri.obj", 1.0), ("spot/spot.obj", 0.0)):
        path = SHARED_ASSETS / name
        if not path.exists():
            pytest.skip(f"{name} not available")
        mesh = load_mesh(path)
        found = topology(mesh.vertices.numpy(), mesh.faces.numpy())
        assert (found.components, found.closed, found.genus) == (1, True, genus)
