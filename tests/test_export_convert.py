"""``--mesh-method lgm`` (export/convert.py, LGM's convert.py): its three fits, the surface point behind a
pixel, and the method end to end through the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from microdreamer.cli import main
from microdreamer.config import resolve
from microdreamer.export import convert
from microdreamer.export.texture import texel_surface
from microdreamer.export.uv import unwrap
from microdreamer.io.mesh import TexturedMesh
from microdreamer.mesh_metrics import compare_surfaces
from microdreamer.render.mesh import rasterize_faces, rasterize_mesh
from microdreamer.representations.nerf_heads import trunc_exp
from microdreamer.sir.cameras import Cameras
from test_export_cli import TINY as CLI_TINY
from test_export_pipeline import gaussians_on

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"
SPHERE_RADIUS = 0.5
GAUSSIAN_SCALE = 0.012  # σ of the Gaussians covering the sphere


def _sphere() -> TexturedMesh:
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=SPHERE_RADIUS)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32)
    colours = torch.where(vertices[:, :1] > 0, torch.tensor([0.9, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.9]))
    return TexturedMesh(vertices, torch.tensor(sphere.faces), vertex_colors=colours)


def _config(**schedule):
    """The reference preset with small convert settings on the CPU (a smaller hash table than LGM's)."""
    counts = {"field_iterations": 300, "field_resolution": 128, "field_rays": 1024, "vertex_iterations": 0,
              "vertex_resolution": 48, "texture_iterations": 0, "texture_resolution": 48, "texture_views": 2,
              **schedule}
    return resolve("reference", None, {"mesh": {
        "method": "lgm", "faces": 2000, "texture": 64, "refine_steps": 0,
        "lgm": {"resolution": 64, "nerf": {"hash_log2_size": 15}, "cpu": counts}}})


@pytest.fixture(scope="module")
def sphere_fit():
    """Gaussians covering a sphere, and a field fitted to their renders."""
    torch.set_num_threads(1)
    gaussians = gaussians_on(_sphere(), count=6000, scale=GAUSSIAN_SCALE)
    cfg = _config()
    field, losses = convert.fit_field(gaussians, cfg, cfg.mesh.lgm.cpu, torch.Generator().manual_seed(0),
                                      torch.device("cpu"))
    return gaussians, cfg, field, losses


def test_trunc_exp_is_exp_with_its_gradient_clamped():
    x = torch.tensor([-2.0, 0.0, 3.0, 20.0], dtype=torch.float64, requires_grad=True)
    y = trunc_exp(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.exp(x.detach()))
    assert torch.equal(x.grad, torch.exp(x.detach().clamp(max=15)))


def test_frame_scale_matches_the_reference_camera():
    cfg = resolve("reference", None, {"cameras": {"radius": 3.0, "fovy": 49.1}})
    assert convert.frame_scale(cfg) == pytest.approx(2.0, rel=1e-12)  # same fovy: distances scale
    cfg = resolve("reference", None, {"cameras": {"radius": 1.5, "fovy": 30.0}})
    expected = math.tan(math.radians(15)) / math.tan(math.radians(24.55))  # same view width at the object
    assert convert.frame_scale(cfg) == pytest.approx(expected, rel=1e-12)


def test_the_fitted_field_meshes_at_threshold_5_onto_the_sphere(sphere_fit):
    gaussians, cfg, field, losses = sphere_fit
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    grid = convert.field_grid(field, cfg)
    assert grid.values.max() > cfg.mesh.lgm.threshold
    from microdreamer.export.extract import marching_cubes

    vertices, faces = marching_cubes(grid, cfg.mesh.lgm.threshold)
    truth = _sphere()
    s = compare_surfaces(vertices, faces, truth.vertices.double().numpy(), truth.faces.numpy(), samples=20000)
    # What the fit can resolve: the renders' pixel footprint at the farthest camera (LGM distance 3, 128²), plus
    # the Gaussians' own outline ~2σ outside the sphere, plus half a grid spacing of marching cubes.
    footprint = 2 * 3.0 * convert.frame_scale(cfg) * math.tan(math.radians(convert.LGM_FOVY) / 2) / 128
    bound = footprint + 2 * GAUSSIAN_SCALE + grid.spacing / 2
    assert s.chamfer < bound and s.fscore[0.05] > 0.9
    radii = np.linalg.norm(vertices, axis=1)
    assert SPHERE_RADIUS < np.median(radii) < SPHERE_RADIUS + bound  # the σ = 5 level lies in the outer haze


def test_surface_points_are_the_rasterized_points_and_differentiable():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    mesh = TexturedMesh(torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces))
    cameras = Cameras.orbit([15.0], [30.0], 2.0, 32)
    out = rasterize_mesh(mesh, cameras, torch.ones(3), "torch")
    face_id = out.extras["face_id"].reshape(-1)
    pixels = (face_id >= 0).nonzero()[:, 0]
    origins, directions = cameras.rays(pixels[None])
    points = convert.surface_points(mesh.vertices, mesh.faces, face_id[pixels], origins[0], directions[0])
    view = cameras.viewmats()[0]
    depth = points @ view[:3, :3].T[:, 2] + view[2, 3]
    # float32 depths up to ~2: ~20 rounding steps of eps·2 in either computation, ×4 at grazing faces on the
    # outline, where the plane intersection divides by a small d·n
    assert torch.allclose(depth, out.depth.reshape(-1)[pixels], rtol=0, atol=20 * 2 * 1.2e-7 * 4)
    # exact first derivatives with respect to the vertices (float64 finite differences)
    vertices = mesh.vertices.double().requires_grad_(True)
    few = slice(0, len(pixels), max(1, len(pixels) // 16))
    args = (vertices, mesh.faces, face_id[pixels][few], origins[0][few].double(), directions[0][few].double())
    assert torch.autograd.gradcheck(lambda v: convert.surface_points(v, *args[1:]), (vertices,))


def test_silhouette_coverage_is_antialiased_and_differentiable():
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    vertices, faces = torch.tensor(sphere.vertices), torch.tensor(sphere.faces)
    cameras = Cameras.orbit([15.0], [30.0], 2.0, 32)
    mesh = TexturedMesh(vertices.float(), faces)
    face_id = rasterize_faces(mesh, cameras, "torch")[0][0]
    coverage = convert.silhouette_coverage(vertices, faces, face_id, cameras)
    area = rasterize_mesh(mesh, cameras, torch.ones(3), "torch", supersample=8).alpha[0, 0].double()
    hard = (face_id >= 0).double()
    assert coverage.min() >= 0 and coverage.max() <= 1
    interior = -torch.nn.functional.max_pool2d(-hard[None], 3, 1, 1)[0] > 0.5  # away from the outline
    assert torch.equal(coverage[interior], hard[interior])
    # a straight edge's coverage is first order in the hard mask, second order here (the crossing point)
    assert (coverage - area).abs().sum() < 0.5 * (hard - area).abs().sum()
    # exact derivatives with respect to the vertices while no pixel centre changes sides
    assert torch.autograd.gradcheck(
        lambda v: convert.silhouette_coverage(v, faces, face_id, cameras), (vertices.requires_grad_(True),))


def test_vertex_fit_moves_vertices_within_adams_step_bound(sphere_fit):
    gaussians, cfg, field, _ = sphere_fit
    from microdreamer.export.extract import decimate, marching_cubes

    vertices, faces = decimate(*marching_cubes(convert.field_grid(field, cfg), cfg.mesh.lgm.threshold), 1000)
    schedule = cfg.mesh.lgm.cpu.__class__(**{**vars(cfg.mesh.lgm.cpu), "vertex_iterations": 12})
    state = [p.detach().clone() for p in (field.params, *field.feature_network.parameters())]
    moved, losses = convert.fit_vertices(gaussians, field, vertices, faces, cfg, schedule,
                                         torch.Generator().manual_seed(1))
    with torch.no_grad():  # the fit trains the field's colour: put it back for the other tests
        for p, s in zip((field.params, *field.feature_network.parameters()), state):
            p.copy_(s)
    step = np.abs(moved - vertices).max()
    # gradients reach the vertices; Adam moves an offset by at most lr·(1 − β1)/√(1 − β2) a step (Kingma &
    # Ba §2.1), in LGM units, scaled into the run's frame
    bound = 12 * cfg.mesh.lgm.vertex_lr * (1 - 0.9) / math.sqrt(1 - 0.999) * convert.frame_scale(cfg)
    assert 0 < step <= bound * (1 + 1e-3)
    assert len(losses) == 12 and all(np.isfinite(losses))


def test_texture_fit_lowers_the_error_against_the_renders(sphere_fit):
    gaussians, cfg, field, _ = sphere_fit
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=SPHERE_RADIUS)
    mesh = unwrap(sphere.vertices.astype(np.float32), sphere.faces.astype(np.int64), 64, padding=2)
    surface = texel_surface(mesh, 64)
    grey = torch.full((64, 64, 3), 0.5)
    cfg.mesh.lgm.texture_lr = 0.05  # a few steps must show; convert.py's 1e-3 needs hundreds
    schedule = cfg.mesh.lgm.cpu.__class__(**{**vars(cfg.mesh.lgm.cpu), "texture_iterations": 20})
    try:
        texture, losses = convert.fit_texture(gaussians, mesh, grey, surface.covered, cfg, schedule,
                                              torch.Generator().manual_seed(2))
    finally:
        cfg.mesh.lgm.texture_lr = 1e-3
    assert losses[-1] < 0.7 * losses[0]
    assert texture.shape == (64, 64, 3) and not torch.equal(texture, grey)


# the method end to end through the CLI --------------------------------------------------------------

TINY = CLI_TINY + """
[mesh.lgm]
resolution = 48
threshold = 1.1  # the faint Gaussians of one SIR iteration give a faint field (σ ≈ 1 untrained); σ = 5: the sphere test
[mesh.lgm.nerf]
hash_log2_size = 14
lr_network = 0.01  # ten times convert.py's: σ grows within these few steps
[mesh.lgm.cpu]
field_iterations = 60
field_resolution = 32
field_rays = 0
vertex_iterations = 3
vertex_resolution = 48
texture_iterations = 3
texture_resolution = 48
texture_views = 2
"""


@pytest.fixture(scope="module")
def lgm_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lgm")
    (folder / "tiny.toml").write_text(TINY)
    rc = main(["image2mesh", "--teacher", "reference", "--model", str(SPOT), "--config", str(folder / "tiny.toml"),
               "--mesh-method", "lgm", "--out", str(folder / "out"), "--quiet"])
    assert rc == 0
    return folder / "out"


def test_image2mesh_lgm_writes_a_textured_glb_and_records_the_method(lgm_run):
    mesh = trimesh.load(lgm_run / "spot.glb", force="mesh", process=False)
    assert 0 < len(mesh.faces) <= 2000
    assert np.asarray(mesh.visual.material.baseColorTexture).shape[:2] == (128, 128)
    report = json.loads((lgm_run / "spot_mesh.json").read_text())
    assert report["settings"]["method"] == "lgm"
    assert {"field_fit", "vertex_fit", "texture_fit", "refine"} <= set(report["timings"])
    assert report["convert"]["field_loss"][1] < report["convert"]["field_loss"][0]
    run = json.loads((lgm_run / "spot.json").read_text())
    assert run["config"]["mesh"]["method"] == "lgm"


def test_export_repeats_the_run_method_byte_for_byte(lgm_run, tmp_path):
    """The run's report gives the method (no flag); the same seed gives the same file."""
    for name in ("a", "b"):
        assert main(["export", str(lgm_run / "spot.ply"), "--out", str(tmp_path / name), "--no-refine", "--quiet"]) == 0
    assert json.loads((tmp_path / "a" / "spot_mesh.json").read_text())["settings"]["method"] == "lgm"
    assert (tmp_path / "a" / "spot.glb").read_bytes() == (tmp_path / "b" / "spot.glb").read_bytes()


def test_a_nerf_run_refuses_the_lgm_method(tmp_path, capsys):
    from microdreamer.config import NerfConfig
    from microdreamer.representations.nerf import NerfField

    path = tmp_path / "field.safetensors"
    NerfField(NerfConfig(hash_levels=4, hash_log2_size=12), "cpu", torch.Generator().manual_seed(0)).save(path)
    assert main(["export", str(path), "--mesh-method", "lgm", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a nerf run is already a field: use --mesh-method density" in err
    assert not (tmp_path / "out").exists()
