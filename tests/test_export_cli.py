"""The mesh commands as a user meets them: image2mesh, export, eval on meshes, and their one-line refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from microdreamer.cli import main
from microdreamer.io.ply import GaussianPLY, write_gaussian_ply

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"
TINY = """
[schedule]
iterations = 2
steps = 2
init_steps = 2
denoise_steps = 10
[cameras]
views = 2
resolution = 48
[gaussians]
num_points = 300
[mesh]
resolution = 64
faces = 2000
texture = 128
bake_resolution = 64
refine_steps = 3
refine_views = 4
refine_resolution = 64
"""


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One tiny image2mesh run on the reference teacher's front view."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "tiny.toml").write_text(TINY)
    out = folder / "out"
    rc = main(["image2mesh", "--teacher", "reference", "--model", str(SPOT), "--config", str(folder / "tiny.toml"),
               "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_image2mesh_writes_the_gaussians_and_a_textured_glb(run):
    names = sorted(p.name for p in run.iterdir())
    assert names == ["spot.glb", "spot.json", "spot.ply", "spot_mesh.json", "spot_views.png"]
    mesh = trimesh.load(run / "spot.glb", force="mesh", process=False)
    assert 0 < len(mesh.faces) <= 2000
    assert np.asarray(mesh.visual.material.baseColorTexture).shape[:2] == (128, 128)
    assert mesh.visual.uv.min() >= 0 and mesh.visual.uv.max() <= 1
    extent = mesh.vertices.max(0) - mesh.vertices.min(0)
    assert extent.max() == pytest.approx(1.0, abs=1e-4) and np.allclose(mesh.bounds.mean(0), 0, atol=1e-4)
    report = json.loads((run / "spot_mesh.json").read_text())
    assert report["refine"]["steps"] == 3 and report["faces"] == len(mesh.faces)


def test_eval_scores_a_mesh_result(run, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    assert main(["eval", str(run / "spot.glb"), "--reference", str(SPOT), "--res", "64", "--json", str(scores)]) == 0
    data = json.loads(scores.read_text())
    assert set(data["fscore"]) == {"0.01", "0.05"} and 0 <= data["fscore"]["0.05"] <= 1
    assert data["chamfer"] > 0 and 0 < data["normal_consistency"] <= 1 and len(data["views"]) == 16
    assert data["frame"] == "run"  # spot_mesh.json beside the GLB says how the export moved it
    assert "F-score@0.05" in capsys.readouterr().out
    alone = tmp_path / "alone.glb"
    alone.write_bytes((run / "spot.glb").read_bytes())
    assert main(["eval", str(alone), "--reference", str(SPOT), "--res", "32", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["frame"] == "unit box"


def test_export_reads_the_run_report_and_refines(run, tmp_path):
    out = tmp_path / "again"
    assert main(["export", str(run / "spot.ply"), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "spot_mesh.json").read_text())
    assert report["refine"]["evaluations"] == 10  # the run's reference teacher, from spot.json
    assert report["settings"]["faces"] == 2000  # the run's [mesh] settings
    same = json.loads((run / "spot_mesh.json").read_text())
    assert report["faces"] == same["faces"] and report["refine"]["loss_last"] == pytest.approx(same["refine"]["loss_last"])


def test_export_obj_without_refinement(run, tmp_path):
    out = tmp_path / "obj"
    assert main(["export", str(run / "spot.ply"), "--out", str(out), "--format", "obj", "--up", "z", "--scale", "3",
                 "--no-refine", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["spot.mtl", "spot.obj", "spot_albedo.png", "spot_mesh.json"]
    assert json.loads((out / "spot_mesh.json").read_text())["refine"] is None
    mesh = trimesh.load(out / "spot.obj", force="mesh", process=False)
    assert (mesh.vertices.max(0) - mesh.vertices.min(0)).max() == pytest.approx(3.0, abs=1e-3)


def _faint_ply(path: Path) -> Path:
    n = 50
    write_gaussian_ply(path, GaussianPLY(
        means=torch.rand(n, 3, generator=torch.Generator().manual_seed(0)) - 0.5, f_dc=torch.zeros(n, 3),
        f_rest=torch.zeros(n, 0, 3), opacity=torch.full((n,), -6.0), scale=torch.full((n, 3), -4.0),
        rotation=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1)))
    return path


@pytest.mark.parametrize("args, message", [
    (["export", "{tmp}/missing.ply"], "result not found"),
    (["export", "{mesh_ply}"], "not a 3DGS file"),
    (["export", "{tmp}/notes.ply"], "PLY"),
    (["export", "{faint}"], "empty density field"),
    (["export", "{faint}", "--faces", "0"], "face budget"),
    (["export", "{faint}", "--to", "nerf"], "--to must be mesh"),
    (["export", "{faint}", "--texture-size", "1000"], "power of two"),
    (["export", "{faint}", "--up", "z"], "Y-up"),
    (["export", "{faint}", "--teacher", "stable-zero123"], "needs the run's input image"),
    (["image2mesh", "--teacher", "reference", "--model", "{spot}", "--faces", "0"], "face budget"),
    (["image2mesh", "--teacher", "reference", "--model", "{spot}", "--format", "fbx"], "glb, obj or ply"),
    (["image2mesh"], "needs an input image"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "notes.ply").write_text("not a ply at all")
    mesh_ply = tmp_path / "cow_mesh.ply"
    mesh_ply.write_bytes(trimesh.creation.icosphere(subdivisions=1).export(file_type="ply"))
    faint = _faint_ply(tmp_path / "faint.ply")
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path, spot=SPOT, mesh_ply=mesh_ply, faint=faint) for a in args] + ["--out", str(out)]
    assert main(argv) == 2
    assert message in _error_line(capsys)
    assert not out.exists() or not any(out.iterdir())
