"""The command line as a user meets it: bad input fails in one line with exit 2, runs write loadable files."""

import json
from pathlib import Path

import pytest

from microdreamer.cli import main

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.toml"
    f.write_text(
        "[schedule]\niterations = 2\nsteps = 2\ninit_steps = 2\ndenoise_steps = 10\n"
        "[cameras]\nviews = 2\nresolution = 48\n[gaussians]\nnum_points = 300\nbackend = \"torch\"\n"
    )
    return f


@pytest.mark.parametrize(
    "args, message",
    [
        (["image2gs", "{tmp}/missing.png"], "input image not found"),
        (["image2gs", "{tmp}/notes.png"], "not an image"),
        (["image2gs", "{tmp}/notes.png", "--teacher", "nope"], "unknown teacher 'nope'"),
        (["image2gs", "--teacher", "reference", "--model", "{tmp}/notes.png", "--preset", "nope"], "unknown preset"),
        (["image2gs", "--teacher", "reference", "--model", "{tmp}/none.obj"], "none.obj"),
        (["image2gs", "--teacher", "reference", "--model", "{tmp}/notes.obj"], "notes.obj"),
        (["image2gs", "--teacher", "reference", "--model", "{spot}", "--iters", "0"], "--iters"),
        (["image2gs", "--teacher", "reference", "--model", "{spot}", "--iters", "abc"], "--iters"),
        (["image2gs", "--teacher", "reference", "--model", "{spot}", "--device", "cuda:7"], "cuda"),
        (["image2gs", "--teacher", "reference"], "--model MESH"),
        (["eval", "{tmp}/none.ply", "--reference", "{spot}"], "result not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys, args, message):
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "notes.obj").write_text("this is not a mesh")
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path, spot=SPOT) for a in args] + (["--out", str(out)] if args[0] == "image2gs" else [])
    assert main(argv) == 2
    err = _error_line(capsys)
    assert message in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_image2gs_reference_run_writes_loadable_outputs_and_eval_reads_them(tmp_path: Path, capsys, tiny_config):
    import trimesh
    from PIL import Image

    from microdreamer.config import GaussianConfig
    from microdreamer.representations.gaussians import Gaussians

    out = tmp_path / "out"
    argv = ["image2gs", "--teacher", "reference", "--model", str(SPOT), "--config", str(tiny_config),
            "--out", str(out), "--seed", "3", "-q"]
    assert main(argv) == 0
    ply, sheet, report = out / "spot.ply", out / "spot_views.png", out / "spot.json"
    assert sorted(p.name for p in out.iterdir()) == ["spot.json", "spot.ply", "spot_views.png"]
    gaussians = Gaussians.load(ply, GaussianConfig(), __import__("torch").device("cpu"))
    assert gaussians.num_primitives > 0
    assert Image.open(sheet).size == (4 * 48, 2 * 48)
    data = json.loads(report.read_text())
    assert data["seed"] == 3 and data["config"]["schedule"]["iterations"] == 2
    assert data["primitives"] == gaussians.num_primitives
    assert data["evaluations"]["total"] > 0 and data["evaluations"]["guided"] > 0
    assert {"sir.render", "sir.backward", "sir.teacher", "sir.update", "export"} <= set(data["timings"])
    assert trimesh.load(ply, process=False) is not None  # a standard PLY other tools open

    # never overwrite silently; the existing file is untouched
    before = ply.read_bytes()
    assert main(argv) == 2
    assert "already exists" in _error_line(capsys)
    assert ply.read_bytes() == before

    # same seed, same result
    again = tmp_path / "again"
    assert main(argv[:-5] + ["--out", str(again), "--seed", "3", "-q"]) == 0
    assert (again / "spot.ply").read_bytes() == before

    scores = tmp_path / "scores.json"
    assert main(["eval", str(ply), "--reference", str(SPOT), "--json", str(scores), "--res", "64"]) == 0
    result = json.loads(scores.read_text())
    assert len(result["views"]) == 16 and 5.0 < result["mean_psnr"] < 60.0
