"""The Python API: the same files as the command line for the same seed, errors raised (never printed),
progress through the callback, and the examples in examples/ run."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from microdreamer import ReconstructionResult, Pipeline, Progress, UserError
from microdreamer.cli import main
from microdreamer.io.ply import read_gaussian_ply

ROOT = Path(__file__).resolve().parents[1]
SPOT = ROOT / "microdreamer" / "assets" / "spot" / "spot.obj"
TINY = dict(iters=1, steps=2, views=2, res=32, grid=32, faces=500, texture_size=64, refine_steps=1, seed=3)
TINY_CONFIG = {"gaussians": {"num_points": 300}, "mesh": {"bake_resolution": 64, "refine_resolution": 32, "refine_views": 2}}
TINY_TOML = """
[gaussians]
num_points = 300
[mesh]
bake_resolution = 64
refine_resolution = 32
refine_views = 2
"""


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_preset(teacher="reference", model=str(SPOT), overrides=TINY_CONFIG, **TINY)


@pytest.fixture(scope="module")
def result(pipe) -> ReconstructionResult:
    return pipe.image_to_3d()


def test_api_files_equal_the_command_lines_byte_for_byte(tmp_path, pipe, result, one_thread):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    rc = main(["image2mesh", "--teacher", "reference", "--model", str(SPOT), "--config", str(tmp_path / "tiny.toml"),
               *flags, "--out", str(tmp_path / "cli"), "--quiet"])
    assert rc == 0
    result.save(tmp_path / "api")
    pipe.to_mesh(result).save(tmp_path / "api")
    for name in ("spot.ply", "spot_views.png", "spot.glb"):
        assert filecmp.cmp(tmp_path / "cli" / name, tmp_path / "api" / name, shallow=False), name


def test_results_render_evaluate_and_load_back(tmp_path, pipe, result):
    views = result.views
    assert views.shape == (8, 32, 32, 3) and views.dtype == np.uint8
    assert (views < 250).any(axis=-1).mean() > 0.02  # the cow covers part of every sheet, not a blank image
    report = result.save(tmp_path)
    ply = read_gaussian_ply(Path(report.outputs["ply"]))
    assert len(ply.means) == report.primitives == result.model.num_primitives
    scores = result.evaluate(SPOT, resolution=32)
    assert len(scores.views) == 16 and 10.0 < scores.mean_psnr < 60.0
    with pytest.raises(UserError, match="already exists"):
        result.save(tmp_path)  # never overwritten silently
    mesh = pipe.to_mesh(result)
    mesh_report = mesh.save(tmp_path)
    loaded = trimesh.load(mesh_report.outputs[0], force="mesh", process=False)
    assert len(loaded.faces) == mesh.faces <= 500
    assert mesh.evaluate(SPOT, resolution=32).surface.chamfer < 0.1


def test_progress_reaches_the_callback(pipe):
    events: list[Progress] = []
    fresh = Pipeline(pipe.config)
    result = fresh.image_to_3d(on_progress=events.append)
    fresh.to_mesh(result, on_progress=events.append)
    stages = [e.stage for e in events]
    assert stages[:2] == ["load", "load"] and stages.count("load") == 2  # loaded once, for both calls
    sir = [e for e in events if e.stage == "sir"]
    assert [(e.done, e.total) for e in sir] == [(1, 2), (2, 2)]  # the init iteration + --iters 1
    assert [e.info for e in events if e.stage == "mesh"][:2] == ["grid", "marching_cubes"]


def test_errors_are_raised_not_printed_and_come_before_any_model_load(tmp_path, capsys, monkeypatch):
    from microdreamer import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded")

    monkeypatch.setattr(pipeline.ImageTo3D, "__init__", refuse)
    cases = [
        (lambda: Pipeline.from_preset(teacher="nope"), "unknown teacher"),
        (lambda: Pipeline.from_preset(teacher="reference", model=str(SPOT), wings=2), "unknown setting 'wings'"),
        (lambda: Pipeline.from_preset(teacher="reference", model=str(SPOT), views=0), "--views"),
        (lambda: Pipeline.from_preset(teacher="reference", model=str(SPOT)).image_to_3d(tmp_path / "none.png"),
         "not found"),
        (lambda: Pipeline.from_preset(teacher="reference", model=str(SPOT)).image_to_3d(np.zeros((4, 4), np.uint8)),
         "must be"),
        (lambda: Pipeline.from_preset(teacher="reference", model=str(SPOT)).image_to_3d(prompt="a cow"),
         r"image\+text teacher"),
        (lambda: Pipeline.from_preset(teacher="reference", model=str(SPOT)).text_to_3d("a cow"), "text-to-3D teacher"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.slow
@pytest.mark.parametrize("example", ["quickstart.py", "walkthrough.py", "batch_folder.py"])
def test_examples_run(tmp_path, example):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert {"spot.ply", "spot.glb"} <= written or {"cow_front.glb", "cow_side.glb"} <= written, written
    assert "Traceback" not in done.stderr
