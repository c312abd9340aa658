"""Geometry extraction: the grid against brute force, marching cubes, interior fill, clean-up, decimation, unwrap."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import trimesh

from microdreamer.config import GaussianConfig
from microdreamer.errors import UserError
from microdreamer.export.extract import (
    DensityGrid,
    GaussianField,
    clean,
    decimate,
    density_grid,
    evaluate_grid,
    marching_cubes,
    smooth,
)
from microdreamer.export.uv import unwrap
from microdreamer.mesh_metrics import topology
from microdreamer.io.ply import GaussianPLY
from microdreamer.representations.gaussians import Gaussians


def gaussians(means, scales, opacities, quats=None) -> Gaussians:
    means = torch.as_tensor(means, dtype=torch.float32)
    n = len(means)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1) if quats is None else torch.as_tensor(quats)
    raw = GaussianPLY(
        means=means,
        f_dc=torch.zeros(n, 3),
        f_rest=torch.zeros(n, 0, 3),
        opacity=torch.logit(torch.as_tensor(opacities, dtype=torch.float32)),
        scale=torch.as_tensor(scales, dtype=torch.float32).log(),
        rotation=quats.float(),
    )
    return Gaussians(GaussianConfig(), "cpu", torch.Generator().manual_seed(0), init=raw)


def random_gaussians(n: int, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return gaussians(
        means=torch.rand(n, 3, generator=g) * 0.6 - 0.3,
        scales=torch.rand(n, 3, generator=g) * 0.05 + 0.005,  # anisotropic, down to thin discs
        opacities=torch.rand(n, generator=g) * 0.98 + 0.01,
        quats=torch.randn(n, 4, generator=g),
    )


def sphere_grid(radius: float, resolution: int = 48, hole: bool = False) -> DensityGrid:
    """A solid ball of ``radius`` at level 0.5 over [−0.5, 0.5]³: the field ramps linearly from 1 to 0
    over 0.04 across the sphere (a reconstruction's fall-off). With ``hole``, the ball is a shell of
    thickness 0.15 around an empty core, open at the top (field 0.2 in a cone around +y)."""
    axis = np.linspace(-0.5, 0.5, resolution)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    values = np.clip(0.5 + (radius - r) / 0.04, 0, 1)
    if hole:
        values = np.minimum(values, np.clip(0.5 + (r - (radius - 0.15)) / 0.04, 0, 1))
        values = np.where(y > 0.9 * r, np.minimum(values, 0.2), values)
    return DensityGrid(values.astype(np.float32), np.array([-0.5, -0.5, -0.5]), 1.0 / (resolution - 1))


def test_grid_matches_the_brute_force_density_within_the_cutoff_error():
    g = random_gaussians(60)
    field = GaussianField.from_gaussians(g)
    origin = torch.tensor([-0.4, -0.35, -0.3], dtype=torch.float64)
    spacing, size = 0.8 / 21, 22  # not a multiple of the block size
    values = evaluate_grid(field, origin, spacing, size)
    axis = [origin[i] + spacing * torch.arange(size, dtype=torch.float64) for i in range(3)]
    points = torch.stack(torch.meshgrid(*axis, indexing="ij"), -1).reshape(-1, 3).float()
    exact = g.density(points, cutoff=math.inf).reshape(size, size, size)
    # every dropped term lies beyond 3 sigmas: below o·exp(−4.5) each
    bound = float((g.opacities.sum() * math.exp(-4.5)).detach()) + 1e-4
    assert (values - exact).abs().max() <= bound
    assert (values - exact).abs().max() < 0.05 * exact.max()


def test_coarse_to_fine_grid_gives_the_same_surface_as_the_full_grid():
    g = random_gaussians(80, seed=1)
    field = GaussianField.from_gaussians(g)
    grid = density_grid(field, 64, 0.5)
    full = evaluate_grid(field, torch.tensor(grid.origin), grid.spacing, 64).numpy()
    near = np.abs(full - 0.5) < 0.25
    assert np.abs(grid.values - full)[near].max() < 0.02 * 0.5 + 1e-3  # only faint Gaussians are interpolated
    assert ((grid.values > 0.5) != (full > 0.5)).sum() <= 0.002 * (full > 0.5).sum()


def test_marching_cubes_of_an_analytic_sphere_recovers_its_radius():
    vertices, faces = marching_cubes(sphere_grid(0.4), 0.5)
    r = np.linalg.norm(vertices, axis=1)
    assert abs(r.mean() - 0.4) < 0.003 and r.max() - r.min() < 0.01
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight and mesh.volume > 0  # closed, faces pointing outwards
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.4**3, rel=0.03)


def test_a_hollow_shell_with_a_hole_gives_only_its_outer_surface():
    vertices, faces = marching_cubes(sphere_grid(0.4, resolution=96, hole=True), 0.5)
    r = np.linalg.norm(vertices, axis=1)
    assert r.min() > 0.3  # no inner wall; the hole leaves a dimple no deeper than the shell depth
    assert np.quantile(r, 0.1) > 0.39
    volume = trimesh.Trimesh(vertices, faces, process=False).volume
    assert volume == pytest.approx(4 / 3 * math.pi * 0.4**3, rel=0.03)


def test_gaussians_sphere_shell_with_thin_spots_is_meshed_solid():
    # Gaussians on a sphere of radius 0.3, faint around the poles: the field there stays below the
    # threshold, so the hollow inside is open at the meshing level (as in real reconstructions).
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(4000, 3, generator=g), dim=-1)
    opacity = torch.where(direction[:, 1].abs() > 0.9, 0.08, 0.8)
    gs = gaussians(0.3 * direction, torch.full((len(direction), 3), 0.012), opacity)
    grid = density_grid(GaussianField.from_gaussians(gs), 96, 0.5)
    assert grid.values.max() > 1 and (grid.values[48, :, 48] < 0.5).all()  # a hole at both poles
    vertices, faces = clean(*marching_cubes(grid, 0.5), min_component=0.05)
    r = np.linalg.norm(vertices, axis=1)
    assert np.quantile(r, 0.01) > 0.29  # no inner wall (it would lie at r ≈ 0.275)
    assert abs(np.median(r) - 0.315) < 0.01
    volume = trimesh.Trimesh(vertices, faces, process=False).volume
    assert volume == pytest.approx(4 / 3 * math.pi * 0.315**3, rel=0.1)


@pytest.mark.parametrize("tunnel_radius, genus", [(3.0, 0), (4.5, 1)])
def test_a_tunnel_a_few_grid_spacings_wide_is_closed_and_a_wider_hole_kept(tunnel_radius, genus):
    # a ball of radius 0.35 bored along x by a cylinder of tunnel_radius grid spacings, the field ramping over
    # one spacing: 6 spacings across are within TUNNEL_CLOSING's reach (7; at 2 it is 5), 9 are not
    resolution = 96
    spacing = 1.0 / (resolution - 1)
    axis = np.linspace(-0.5, 0.5, resolution)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    ball = 0.5 + (0.35 - np.sqrt(x**2 + y**2 + z**2)) / spacing
    bore = 0.5 + (np.sqrt(y**2 + z**2) - tunnel_radius * spacing) / spacing
    values = np.clip(np.minimum(ball, bore), 0, 1).astype(np.float32)
    grid = DensityGrid(values, np.array([-0.5, -0.5, -0.5]), spacing)
    assert topology(*marching_cubes(dataclasses.replace(grid, shell=False), 0.5)).genus == 1  # the bore is there
    vertices, faces = marching_cubes(grid, 0.5)
    assert topology(vertices, faces).genus == genus
    assert np.abs(np.linalg.norm(vertices, axis=1) - 0.35).min() < spacing  # the outer surface stays


def test_clean_drops_a_floating_part_and_orients_parts_outwards():
    big = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    small = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    flipped_faces = big.faces[:, ::-1] + 0  # the big part inside out
    vertices = np.concatenate([big.vertices, small.vertices + [0.8, 0.0, 0.0]])
    faces = np.concatenate([flipped_faces, small.faces + len(big.vertices)])
    v, f = clean(vertices, faces, min_component=0.05)
    assert len(v) == len(big.vertices) and len(f) == len(big.faces)
    mesh = trimesh.Trimesh(v, f, process=False)
    assert mesh.volume > 0 and np.abs(v).max() <= 0.4 + 1e-9
    # a small part above the share stays
    v, f = clean(vertices, faces, min_component=0.001)
    assert len(f) == len(big.faces) + len(small.faces)


def test_decimation_respects_the_budget_and_keeps_the_shape():
    vertices, faces = marching_cubes(sphere_grid(0.4, resolution=64), 0.5)
    assert len(faces) > 5000
    v, f = decimate(vertices, faces, 500)
    assert 400 <= len(f) <= 500
    r = np.linalg.norm(v, axis=1)
    assert np.abs(r - 0.4).max() < 0.01
    mesh = trimesh.Trimesh(v, f, process=False)
    assert mesh.is_watertight and mesh.volume > 0
    same_v, same_f = decimate(vertices, faces, len(faces))
    assert len(same_f) == len(faces)


def test_decimating_thin_legs_keeps_the_topology():
    # a ball with eight legs 2.4 grid spacings thick, decimated to 1,000 faces: collapsing a leg too eagerly folds
    # it into a doubled sheet of faces (fast-simplification's default aggression did, twice)
    resolution = 96
    spacing = 1.0 / (resolution - 1)
    axis = np.linspace(-0.5, 0.5, resolution)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
    values = 0.5 + (0.2 - np.linalg.norm(points, axis=-1)) / spacing
    for k in range(8):
        direction = np.array([math.cos(k * math.pi / 4), 0.3, math.sin(k * math.pi / 4)])
        direction /= np.linalg.norm(direction)
        along = np.clip(points @ direction, 0, 0.45)
        leg = 0.5 + (1.2 * spacing - np.linalg.norm(points - along[..., None] * direction, axis=-1)) / spacing
        values = np.maximum(values, leg)
    grid = DensityGrid(np.clip(values, 0, 1).astype(np.float32), np.array([-0.5, -0.5, -0.5]), spacing, shell=False)
    vertices, faces = clean(*marching_cubes(grid, 0.5), min_component=0.05)
    before = topology(vertices, faces)
    vertices, faces = decimate(smooth(vertices, faces), faces, 1000)
    after = topology(vertices, faces)
    assert len(faces) <= 1000 and (before.components, before.genus) == (after.components, after.genus) == (1, 0)
    assert after.closed and after.repeated_faces == 0 and after.nonmanifold_edges == 0


def test_empty_density_field_is_a_user_error():
    faint = gaussians(torch.zeros(3, 3), torch.full((3, 3), 0.02), torch.full((3,), 0.05))
    grid = density_grid(GaussianField.from_gaussians(faint), 32, 0.5)
    with pytest.raises(UserError, match="empty density field"):
        marching_cubes(grid, 0.5)
    none = gaussians(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(UserError, match="empty density field"):
        density_grid(GaussianField.from_gaussians(none), 32, 0.5)


def test_unwrap_gives_uvs_in_range_on_the_same_surface():
    vertices, faces = decimate(*marching_cubes(sphere_grid(0.4), 0.5), 2000)
    mesh = unwrap(vertices, faces, 256, padding=2)
    assert mesh.uvs.min() >= 0 and mesh.uvs.max() <= 1
    assert np.array_equal(mesh.faces, faces)  # same triangles, in order
    assert np.array_equal(mesh.vertices[mesh.source], vertices[mesh.source])
    uv_tri = mesh.uvs[mesh.uv_faces]
    a, b = uv_tri[:, 1] - uv_tri[:, 0], uv_tri[:, 2] - uv_tri[:, 0]
    uv_area = 0.5 * np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    assert (uv_area > 0).all() and uv_area.sum() < 1  # charts do not cover more than the atlas
    radial = np.einsum("ij,ij->i", mesh.vertex_normals(), vertices / np.linalg.norm(vertices, axis=1, keepdims=True))
    assert radial.min() > 0.8 and radial.mean() > 0.99  # outward unit normals


def test_smoothing_removes_noise_without_shrinking():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    noise = np.random.default_rng(0).normal(0, 0.004, len(sphere.vertices))[:, None]
    noisy = sphere.vertices * (1 + noise / 0.4)
    smoothed = smooth(noisy, np.asarray(sphere.faces))
    r_noisy, r_smooth = np.linalg.norm(noisy, axis=1), np.linalg.norm(smoothed, axis=1)
    assert r_smooth.std() < 0.5 * r_noisy.std()
    assert abs(r_smooth.mean() - 0.4) < 0.002  # Taubin's μ step undoes the λ step's shrinking
