"""NeRF runs as a user starts them: ``text2nerf`` with the tiny MVDream, ``image2nerf`` with the tiny Zero123
(then ``export``, ``render`` and ``eval`` of its NeRF), and ``image2mesh --representation nerf`` resumed at its
mesh stage from a run the Python API saved. Tiny fields (8 levels, 2^14 entries), 32² renders, 4 steps."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from microdreamer import Pipeline
from microdreamer.api import resolve_config
from microdreamer.cli import main
from microdreamer.config import resolve
from microdreamer.errors import UserError
from microdreamer.evaluate import evaluate_model, held_out_scores
from microdreamer.io.images import image_grid
from microdreamer.io.mesh import load_mesh
from microdreamer.pipeline import sheet_cameras
from microdreamer.representations.nerf import NerfField
from microdreamer.sir.schedule import SIRSchedule
from microdreamer.teachers.registry import TEACHERS
from tiny_models import build_tiny_mvdream, build_tiny_zero123

pytestmark = pytest.mark.usefixtures("one_thread")

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"
#: four optimisation steps of a tiny field at 32², and a mesh of it at σ = 5 (the untrained blob peaks at 10)
TINY = """
[schedule]
iterations = 1
steps = 2
init_steps = 2
denoise_steps = 4
[cameras]
resolution = 32
resolutions = []
milestones = []
[nerf]
hash_levels = 8
hash_log2_size = 14
[mesh]
resolution = 32
threshold = 5.0
faces = 500
texture = 64
refine_steps = 2
refine_views = 2
refine_resolution = 32
"""


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def _renders_the_sheet(nerf: Path, sheet: Path) -> None:
    """The saved field, loaded back, renders the run's contact sheet again (8-bit rounding apart)."""
    field = NerfField.load(nerf, "cpu")
    cfg = resolve_config(config=nerf.with_suffix(".json"), needs_teacher=False)
    with torch.no_grad():
        views = field.render(sheet_cameras(cfg), torch.tensor(cfg.background)).rgb
    again = image_grid(views, cols=4).astype(int)
    saved = np.asarray(Image.open(sheet)).astype(int)
    assert again.shape == saved.shape == (2 * 32, 4 * 32, 3) and np.abs(again - saved).max() <= 1
    assert (saved < 250).any(-1).mean() > 0.01  # the object shows, not a blank sheet


def test_every_teacher_has_a_nerf_preset_and_the_commands_pick_it(tmp_path):
    for entry in TEACHERS.values():
        cfg = resolve(entry.preset_for("nerf"))
        assert cfg.representation == "nerf" and cfg.teacher.name == entry.name
        assert cfg.mesh.threshold == 25.0  # threestudio's isosurface_threshold
        assert resolve(entry.preset).representation == "gaussians"
    assert resolve("zero123-xl-nerf").schedule == resolve("stable-zero123-nerf").schedule
    assert resolve_config("mvdream", representation="nerf").preset == "mvdream-nerf"
    assert resolve_config(representation="nerf").preset == "stable-zero123-nerf"
    # a NeRF run's report brings back its preset; asking for Gaussians takes the teacher's own
    report = tmp_path / "run.json"
    report.write_text(json.dumps({"config": {**resolve("stable-zero123-nerf").to_dict(), "seed": 7}}))
    again = resolve_config(config=report, needs_teacher=False)
    assert (again.preset, again.representation, again.seed) == ("stable-zero123-nerf", "nerf", 7)
    gs = resolve_config(config=report, needs_teacher=False, representation="gaussians")
    assert (gs.preset, gs.representation) == ("stable-zero123", "gaussians")
    with pytest.raises(UserError, match="unknown representation 'voxels'"):
        resolve_config(representation="voxels")


@pytest.mark.slow
def test_text2nerf_batch_reloads_renders_resumes_and_reproduces(tmp_path, capsys, monkeypatch, tiny):
    from microdreamer import pipeline

    model = build_tiny_mvdream(tmp_path / "mvdream")

    def argv(out: Path, *prompts: str) -> list[str]:
        return ["text2nerf", *prompts, "--model", str(model), "--config", str(tiny), "--out", str(out),
                "--device", "cpu", "--seed", "5", "-q"]

    out = tmp_path / "out"
    assert main(argv(out, "a corgi", "a red cat") + ["--video-format", "gif"]) == 0
    stems = ("a_corgi", "a_red_cat")
    names = [f"{s}{suffix}" for s in stems for suffix in (".json", ".safetensors", "_turntable.gif", "_views.png")]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["manifest.json"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "text2nerf" and manifest["counts"]["done"] == 2
    report = json.loads((out / "a_corgi.json").read_text())
    cfg = report["config"]
    assert (cfg["preset"], cfg["representation"], cfg["teacher"]["name"]) == ("mvdream-nerf", "nerf", "mvdream")
    assert cfg["guidance"]["scale"] == 7.5 and cfg["nerf"]["background"] == "envmap"  # Table I, threestudio
    assert report["prompt"] == "a corgi" and set(report["outputs"]) == {"nerf", "views", "report", "video"}
    schedule = SIRSchedule.from_config(resolve("mvdream-nerf", tiny).schedule)
    assert report["evaluations"]["guided"] == schedule.guided_passes and report["optimisation_steps"] == 4
    field = NerfField.load(out / "a_corgi.safetensors", "cpu")
    assert report["primitives"] == field.num_primitives > 0 and field.envmap is not None
    assert Image.open(out / "a_corgi_turntable.gif").n_frames == 90
    _renders_the_sheet(out / "a_corgi.safetensors", out / "a_corgi_views.png")

    # resume: nothing is redone, the teacher is not even loaded
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(pipeline.ImageTo3D, "__init__", lambda *a, **k: pytest.fail("the teacher was loaded"))
        assert main(argv(out, "a corgi", "a red cat") + ["--skip-existing", "--json"]) == 0
    assert [e["status"] for e in json.loads(capsys.readouterr().out)["entries"]] == ["skipped", "skipped"]
    assert main(argv(out, "a corgi")) == 2 and "already exists" in _error_line(capsys)  # never overwritten

    # the same prompt and seed alone: the same field, byte for byte
    alone = tmp_path / "alone"
    assert main(argv(alone, "a corgi")) == 0
    assert (alone / "a_corgi.safetensors").read_bytes() == (out / "a_corgi.safetensors").read_bytes()


def test_image2nerf_then_export_render_and_eval_of_its_nerf(tmp_path, capsys, tiny):
    model = build_tiny_zero123(tmp_path / "zero123")
    rgba = np.zeros((64, 64, 4), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    rgba[(yy - 32) ** 2 + (xx - 30) ** 2 < 18**2] = (200, 80, 40, 255)
    photo = tmp_path / "photo.png"
    Image.fromarray(rgba).save(photo)
    out = tmp_path / "out"
    assert main(["image2nerf", str(photo), "--model", str(model), "--config", str(tiny), "--out", str(out),
                 "--device", "cpu", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo.json", "photo.safetensors", "photo_rgba.png",
                                                      "photo_views.png"]
    report = json.loads((out / "photo.json").read_text())
    assert (report["config"]["preset"], report["config"]["teacher"]["name"]) == ("stable-zero123-nerf",
                                                                                 "stable-zero123")
    assert report["config"]["nerf"]["radius"] == 2.0 and report["config"]["loss"]["reference_rgb"] == 0.1
    nerf = out / "photo.safetensors"
    _renders_the_sheet(nerf, out / "photo_views.png")

    # the mesh: the run's report beside the file names the teacher, the image and the mesh settings
    assert main(["export", str(nerf), "--device", "cpu", "-q"]) == 0
    mesh = trimesh.load(out / "photo.glb", force="mesh", process=False)
    assert 0 < len(mesh.faces) <= 500
    assert np.asarray(mesh.visual.material.baseColorTexture).shape[:2] == (64, 64)
    mesh_report = json.loads((out / "photo_mesh.json").read_text())
    assert mesh_report["settings"]["threshold"] == 5.0 and mesh_report["refine"]["steps"] == 2

    spin = tmp_path / "spin.gif"
    assert main(["render", str(nerf), "--video", str(spin), "--frames", "3", "--res", "32", "-q"]) == 0
    assert Image.open(spin).n_frames == 3 and Image.open(spin).size == (32, 32)

    scores = tmp_path / "scores.json"
    assert main(["eval", str(nerf), "--reference", str(SPOT), "--res", "32", "--json", str(scores)]) == 0
    printed = json.loads(scores.read_text())
    direct = held_out_scores(NerfField.load(nerf, "cpu").render, load_mesh(SPOT), torch.device("cpu"), 2.0, 32,
                             (1.0, 1.0, 1.0))
    assert len(printed["views"]) == 16 and printed["shading"] == "lit"
    assert [v["psnr"] for v in printed["views"]] == pytest.approx([v.psnr for v in direct], abs=1e-6)


def test_image2mesh_of_a_nerf_resumes_the_mesh_stage_of_a_run_the_api_saved(tmp_path, capsys, tiny):
    pipe = Pipeline.from_config(tiny, teacher="reference", model=str(SPOT), representation="nerf", device="cpu")
    assert pipe.config.preset == "reference-nerf" and pipe.config.representation == "nerf"
    result = pipe.image_to_3d()
    assert isinstance(result.model, NerfField) and result.representation == "nerf"
    out = tmp_path / "out"
    report = result.save(out)
    assert set(report.outputs) == {"nerf", "views", "report"}
    assert Path(report.outputs["nerf"]).name == "spot.safetensors"
    # scored in memory as `eval` scores the saved file: the held-out views at radius 2, not the run's 3.8
    in_memory = result.evaluate(SPOT, resolution=32)
    saved = evaluate_model(out / "spot.safetensors", SPOT, torch.device("cpu"), resolution=32)
    assert saved.shading == in_memory.shading == "lit"
    assert [v.psnr for v in in_memory.views] == pytest.approx([v.psnr for v in saved.views], abs=1e-6)
    pipe.to_mesh(result).save(tmp_path / "api")

    argv = ["image2mesh", "--teacher", "reference", "--model", str(SPOT), "--config", str(tiny), "--representation",
            "nerf", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    assert "spot.safetensors exists without its mesh" in _error_line(capsys)
    assert main([*argv, "--skip-existing", "--json", "-q"]) == 0
    entry = json.loads(capsys.readouterr().out)["entries"][0]
    assert entry["status"] == "done" and entry["note"].startswith("mesh stage only (spot.safetensors")
    # the field reloaded from its file meshes as the one in memory did, refinement included
    assert (out / "spot.glb").read_bytes() == (tmp_path / "api" / "spot.glb").read_bytes()
    assert json.loads((out / "spot_mesh.json").read_text())["refine"]["steps"] == 2
