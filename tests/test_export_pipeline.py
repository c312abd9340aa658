"""``export_mesh`` end to end on Gaussians that cover a known textured mesh, plus its refusals."""

import json

import numpy as np
import pytest
import torch
import trimesh

from microdreamer.config import GaussianConfig, RunConfig, resolve
from microdreamer.errors import UserError
from microdreamer.evaluate import evaluate_mesh, held_out_cameras
from microdreamer.export import export_mesh, mesh_output_paths
from microdreamer.io.mesh import TexturedMesh, load_mesh
from microdreamer.io.ply import GaussianPLY
from microdreamer.mesh_metrics import compare_surfaces, sample_surface
from microdreamer.metrics import psnr
from microdreamer.render.mesh import rasterize_mesh, sample_texture
from microdreamer.representations.gaussians import SH_C0, Gaussians
from microdreamer.teachers.reference import ReferenceTeacher

BLUE_RED = torch.tensor([[0.1, 0.2, 0.9], [0.9, 0.2, 0.1]])


def two_tone_ellipsoid() -> TexturedMesh:
    """An ellipsoid in the unit box, blue on the −x side and red on the +x side (vertex colours)."""
    sphere = trimesh.creation.icosphere(subdivisions=4)
    vertices = torch.tensor(sphere.vertices * [0.5, 0.35, 0.3], dtype=torch.float32)
    colors = BLUE_RED[(vertices[:, 0] > 0).long()]
    return TexturedMesh(vertices, torch.tensor(sphere.faces), vertex_colors=colors)


def gaussians_on(mesh: TexturedMesh, count: int = 6000, opacity: float = 0.9, scale: float = 0.015,
                 cfg: GaussianConfig | None = None) -> Gaussians:
    """Isotropic Gaussians spread over ``mesh``'s surface, coloured like it (a stand-in for a trained run)."""
    points, _ = sample_surface(mesh.vertices.numpy(), mesh.faces.numpy(), count, torch.Generator().manual_seed(0))
    points = torch.from_numpy(points).float()
    nearest = torch.cdist(points, mesh.vertices).argmin(1)
    colors = mesh.vertex_colors[nearest]
    raw = GaussianPLY(
        means=points,
        f_dc=(colors - 0.5) / SH_C0,
        f_rest=torch.zeros(count, 0, 3),
        opacity=torch.full((count,), float(torch.logit(torch.tensor(opacity)))),
        scale=torch.full((count, 3), float(np.log(scale))),
        rotation=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(count, 1),
    )
    return Gaussians(cfg or GaussianConfig(), "cpu", torch.Generator().manual_seed(0), init=raw)


def small_config(**mesh) -> RunConfig:
    return resolve("reference", None, {"mesh": {
        "resolution": 96, "faces": 4000, "texture": 128, "bake_resolution": 128, "refine_steps": 8,
        "refine_views": 4, "refine_resolution": 64, **mesh}})


@pytest.fixture(scope="module")
def scene():
    mesh = two_tone_ellipsoid()
    return mesh, gaussians_on(mesh), ReferenceTeacher(mesh, resolution=64, shading="albedo")  # colours checked


def test_export_reproduces_the_surface_and_its_colours(tmp_path, scene):
    mesh, gaussians, teacher = scene
    report = export_mesh(gaussians, tmp_path, "ellipsoid", small_config(), teacher=teacher)
    paths = mesh_output_paths(tmp_path, "ellipsoid", "glb")
    assert report.outputs == [str(p) for p in paths]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ellipsoid.glb", "ellipsoid_mesh.json"]
    assert set(report.timings) == {"grid", "marching_cubes", "cleanup", "decimation", "uv", "bake", "refine", "write"}
    assert report.faces <= 4000 and report.faces_by_stage["marching_cubes"] > 4000
    assert report.refine["evaluations"] == 10 and report.refine["loss_last"] < report.refine["loss_first"]
    saved = json.loads(paths[1].read_text())
    assert saved["faces"] == report.faces and saved["settings"]["texture"] == 128

    # put back into the run's frame by the export report: this dense layer of Gaussians meshes ~2.5σ
    # (0.035) outside the surface it covers, which the unit-box fit below hides
    reference = tmp_path / "truth.obj"
    trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy()).export(reference)
    in_run = evaluate_mesh(paths[0], reference, torch.device("cpu"), resolution=64, samples=20000)
    assert in_run.frame == "run" and in_run.surface.fscore[0.05] > 0.95 and 0.02 < in_run.surface.chamfer < 0.045
    result = load_mesh(paths[0])  # unit box, as the reference
    truth = mesh.normalized()
    scores = compare_surfaces(result.vertices.numpy(), result.faces.numpy(), truth.vertices.numpy(),
                              truth.faces.numpy(), samples=20000)
    assert scores.fscore[0.05] > 0.95 and scores.chamfer < 0.02 and scores.normal_consistency > 0.9
    cams = held_out_cameras(resolution=64)
    white = torch.ones(3)
    ours = rasterize_mesh(result, cams, white, supersample=2).rgb
    theirs = rasterize_mesh(truth, cams, white, supersample=2).rgb
    assert psnr(ours.clamp(0, 1), theirs.clamp(0, 1)).mean() > 20
    # the texture itself: blue on one side, red on the other
    uv = result.uvs
    side = result.vertices[:, 0] > 0.1
    colour = sample_texture(result.texture, uv)
    assert (colour[side, 0] > colour[side, 2]).float().mean() > 0.95
    assert (colour[result.vertices[:, 0] < -0.1, 2] > colour[result.vertices[:, 0] < -0.1, 0]).float().mean() > 0.95


def test_same_seed_same_files(tmp_path, scene):
    _, gaussians, teacher = scene
    cfg = small_config(refine_steps=2)
    export_mesh(gaussians, tmp_path / "a", "x", cfg, teacher=teacher)
    export_mesh(gaussians, tmp_path / "b", "x", cfg, teacher=teacher)
    assert (tmp_path / "a" / "x.glb").read_bytes() == (tmp_path / "b" / "x.glb").read_bytes()


@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_other_formats_and_z_up_without_a_teacher(tmp_path, scene, fmt):
    _, gaussians, _ = scene
    report = export_mesh(gaussians, tmp_path, "e", small_config(format=fmt, up="z", scale=2.0))
    assert "refine" not in report.timings and report.refine is None
    main = tmp_path / report.outputs[0].split("/")[-1]
    loaded = trimesh.load(main, force="mesh", process=False)
    extent = loaded.vertices.max(0) - loaded.vertices.min(0)
    assert extent.max() == pytest.approx(2.0, abs=1e-4)
    assert np.argmax(extent) == 0 and extent[1] < extent[2]  # x longest; the 0.35 height now on z


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, scene):
    _, gaussians, _ = scene
    cfg = small_config(refine_steps=0)
    (tmp_path / "e.glb").write_bytes(b"keep")
    with pytest.raises(UserError, match="already exists"):
        export_mesh(gaussians, tmp_path, "e", cfg)
    assert (tmp_path / "e.glb").read_bytes() == b"keep" and not (tmp_path / "e_mesh.json").exists()
    export_mesh(gaussians, tmp_path, "e", cfg, overwrite=True)
    assert (tmp_path / "e.glb").read_bytes()[:4] == b"glTF"


def test_empty_density_field_writes_nothing(tmp_path):
    faint = gaussians_on(two_tone_ellipsoid(), count=200, opacity=0.02)
    with pytest.raises(UserError, match="empty density field") as info:
        export_mesh(faint, tmp_path / "out", "e", small_config())
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("setting,value,message", [
    ("faces", 0, "face budget"), ("texture", 1000, "power of two"), ("up", "x", "must be y or z"),
    ("format", "fbx", "glb, obj or ply"), ("refine_t", 180, "DDIM timestep"), ("scale", 0.0, "positive"),
])
def test_bad_mesh_settings_are_one_line_errors(setting, value, message):
    with pytest.raises(UserError, match=message) as info:
        resolve("reference", None, {"mesh": {setting: value}})
    assert "\n" not in str(info.value)


def test_z_up_is_refused_for_glb_only():
    with pytest.raises(UserError, match="Y-up"):
        resolve("reference", None, {"mesh": {"up": "z"}})
    assert resolve("reference", None, {"mesh": {"up": "z", "format": "obj"}}).mesh.up == "z"
