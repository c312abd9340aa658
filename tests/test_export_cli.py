"""The mesh commands as a user meets them: image2mesh, export, eval on meshes, and their one-line refusals."""

import json
import shutil
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
    (["image2mesh", "--teacher", "reference", "--model", "{spot}", "--mesh-method", "marching"], "density or lgm"),
    (["image2mesh", "--teacher", "reference", "--model", "{spot}", "--mesh-method", "lgm", "--representation", "nerf"],
     "a nerf run is already a field"),
    (["export", "{faint}", "--mesh-method", "cubes"], "density or lgm"),
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


# run reports travel; image2mesh resumes at its mesh stage -------------------------------------------

MICRO = """
[schedule]
iterations = 1
steps = 2
init_steps = 2
denoise_steps = 4
[cameras]
views = 2
resolution = 32
[gaussians]
num_points = 200
[mesh]
resolution = 32
faces = 300
texture = 64
bake_resolution = 32
refine_steps = 2
refine_views = 2
refine_resolution = 32
"""
#: an image2mesh run as a user types it in their project folder: relative paths only
RUN = ["image2mesh", "photos/cow.png", "--teacher", "reference", "--model", "spot/spot.obj", "--config", "micro.toml",
       "--no-rembg", "-q"]


def _project(root: Path) -> Path:
    """A user's folder: a copy of the Spot mesh, a photo of it (a render at 30° azimuth) and a tiny config."""
    from PIL import Image

    from microdreamer.sir.cameras import Cameras
    from microdreamer.teachers.reference import ReferenceTeacher

    shutil.copytree(SPOT.parent, root / "spot")
    out = ReferenceTeacher(root / "spot" / "spot.obj", resolution=64).render(Cameras.orbit([0.0], [30.0], 2.0, 64))
    rgba = torch.cat([out.rgb, out.alpha], 1)[0].permute(1, 2, 0).numpy()
    (root / "photos").mkdir()
    Image.fromarray((rgba * 255 + 0.5).astype(np.uint8)).save(root / "photos" / "cow.png")
    (root / "micro.toml").write_text(MICRO)
    return root


@pytest.mark.slow
def test_a_run_folder_moved_elsewhere_still_exports_and_reproduces(tmp_path, monkeypatch, capsys):
    from test_cli import _no_model_load

    from microdreamer.io.provenance import content_hash

    project = _project(tmp_path / "project")
    monkeypatch.chdir(project)
    assert main([*RUN, "--out", "run"]) == 0
    report = json.loads((project / "run" / "cow.json").read_text())
    photo = project / "photos" / "cow.png"
    assert report["input"] == {"relative": "../photos/cow.png", "absolute": str(photo.resolve()),
                               "sha256": content_hash(photo)}
    assert report["config"]["teacher"]["model"]["relative"] == "../spot/spot.obj"

    moved = tmp_path / "moved"
    shutil.move(project, moved)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = moved / "run"
    # export finds the run's model and input image beside the moved report: the mesh the run made, to the byte
    # (refined on the photo's reference view; the mesh's front view instead would give another texture)
    assert main(["export", str(run / "cow.ply"), "--out", "mesh", "-q"]) == 0
    assert Path("mesh/cow.glb").read_bytes() == (run / "cow.glb").read_bytes()
    # --config RUN.json without an image brings the image back and names the outputs after it
    assert main(["image2gs", "--config", str(run / "cow.json"), "--out", "again", "-q"]) == 0
    assert sorted(p.name for p in Path("again").iterdir()) == ["cow.json", "cow.ply", "cow_rgba.png", "cow_views.png"]
    assert Path("again/cow.ply").read_bytes() == (run / "cow.ply").read_bytes()
    assert json.loads(Path("again/cow.json").read_text())["input"]["sha256"] == report["input"]["sha256"]

    # the image changed or gone: one line, exit 2, before any model loads, nothing written
    capsys.readouterr()
    with monkeypatch.context() as m:
        _no_model_load(m)
        (moved / "photos" / "cow.png").write_bytes((run / "cow_views.png").read_bytes())
        assert main(["image2gs", "--config", str(run / "cow.json"), "--out", "changed"]) == 2
        assert "the run's input image" in (err := _error_line(capsys)) and "has changed since the run" in err
        (moved / "photos" / "cow.png").unlink()
        assert main(["image2mesh", "--config", str(run / "cow.json"), "--out", "gone"]) == 2
        assert _error_line(capsys) == (
            f"error: the run's input image cow.png is gone (not at {moved / 'photos' / 'cow.png'} nor at "
            f"{project / 'photos' / 'cow.png'}): pass the image: microdreamer image2mesh IMAGE --config {run / 'cow.json'}")
        assert main(["export", str(run / "cow.ply"), "--out", "gone"]) == 2
        assert _error_line(capsys).endswith("is gone (not at {} nor at {}): pass --image IMAGE, or --no-refine".format(
            moved / "photos" / "cow.png", project / "photos" / "cow.png"))
        shutil.rmtree(moved / "spot")
        assert main(["image2gs", str(run / "cow_rgba.png"), "--config", str(run / "cow.json"), "--out", "gone"]) == 2
        assert _error_line(capsys).startswith("error: the run's model spot.obj is gone")
        assert not Path("changed").exists() and not Path("gone").exists()
    # a bake alone needs neither
    assert main(["export", str(run / "cow.ply"), "--out", "baked", "--no-refine", "-q"]) == 0
    assert json.loads(Path("baked/cow_mesh.json").read_text())["refine"] is None


@pytest.mark.slow
def test_image2mesh_stopped_in_the_mesh_stage_resumes_there(tmp_path, monkeypatch, capsys):
    from microdreamer import pipeline

    monkeypatch.chdir(_project(tmp_path))
    assert main([*RUN, "--out", "whole"]) == 0
    with monkeypatch.context() as m:
        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        m.setattr(pipeline, "make_mesh", interrupt)
        assert main([*RUN, "--out", "out"]) == 130
    gaussians = ["cow.json", "cow.ply", "cow_rgba.png", "cow_views.png"]
    assert sorted(p.name for p in Path("out").iterdir()) == gaussians
    stamps = {p.name: p.stat().st_mtime_ns for p in Path("out").iterdir()}
    capsys.readouterr()
    # a plain rerun refuses with advice that works; so does a resume with other settings
    assert main([*RUN, "--out", "out"]) == 2
    assert _error_line(capsys) == (
        "error: out/cow.ply exists without its mesh (an earlier run stopped before the mesh stage): pass "
        "--skip-existing to make the mesh from it, --overwrite to redo the run, or choose another --out")
    assert main([*RUN, "--out", "out", "--skip-existing", "--seed", "1"]) == 2
    assert _error_line(capsys) == (
        "error: out/cow.json holds a run with other settings (seed: 0 there, 1 here): give its settings "
        "(--config out/cow.json) to make its mesh, --overwrite to redo the run, or choose another --out")
    # --skip-existing makes the mesh alone, from the saved Gaussians: the mesh an uninterrupted run makes
    assert main([*RUN, "--out", "out", "--skip-existing", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["entries"]
    assert entry["status"] == "done" and entry["note"].startswith("mesh stage only (cow.ply from the earlier run); ")
    earlier = json.loads(Path("out/cow.json").read_text())
    assert {k: entry["timings"][k] for k in earlier["timings"]} == earlier["timings"]  # the Gaussians' run, kept
    assert "mesh.refine" in entry["timings"] and "mesh.load_teacher" in entry["timings"]
    assert entry["seed"] == 0 and entry["evaluations"] == earlier["evaluations"]
    assert {p.name: p.stat().st_mtime_ns for p in Path("out").iterdir() if p.name in stamps} == stamps
    assert Path("out/cow.glb").read_bytes() == Path("whole/cow.glb").read_bytes()
    assert sorted(p.name for p in Path("out").iterdir()) == sorted(gaussians + ["cow.glb", "cow_mesh.json"])


def test_skip_existing_is_advised_only_where_it_would_keep_the_outputs(tmp_path):
    from microdreamer.errors import UserError
    from microdreamer.pipeline import check_outputs_free

    ply, video = tmp_path / "cow.ply", tmp_path / "cow_turntable.gif"
    ply.write_text("splats")
    check_outputs_free([ply, video], overwrite=True)
    with pytest.raises(UserError) as partly:  # a rerun asking for a video as well: skipping would not happen
        check_outputs_free([ply, video], overwrite=False)
    assert str(partly.value) == f"{ply} already exists: pass --overwrite to replace it, or choose another --out"
    video.write_text("frames")
    with pytest.raises(UserError) as all_there:
        check_outputs_free([ply, video], overwrite=False)
    assert str(all_there.value) == (f"{ply} already exists: pass --overwrite to replace it, --skip-existing to keep "
                                    "it, or choose another --out")
