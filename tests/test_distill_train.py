"""Stage I as a tool, on a tiny Zero123++: exact resume, two torchrun processes against one with the doubled
batch, checkpoints that survive Ctrl-C and a full disk, a bad data folder, the run folder and the CLI."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from microdreamer.cli import main
from microdreamer.distill import checkpoints as checkpoints_module
from microdreamer.distill.checkpoints import complete_checkpoints, latest_checkpoint, save_checkpoint
from microdreamer.distill.config import Stage1Config
from microdreamer.distill.data import load_conditions
from microdreamer.distill.runs import LOG, NOTICE
from microdreamer.distill.stage1 import run_stage1, stage1_config
from microdreamer.errors import UserError
from microdreamer.io.images import save_image
from tiny_models import build_tiny_zero123plus, prepare_tiny_conditions

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps
GROUPS = ("generator", "student", "optimizer_generator", "optimizer_student")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_zero123plus(tmp_path_factory.mktemp("zero123plus") / "model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Three condition images prepared from RGBA pictures."""
    return prepare_tiny_conditions(tmp_path_factory.mktemp("conditions"))


def _settings(data_dir: Path, tiny_dir: Path, **changes) -> dict:
    return {"data": str(data_dir), "model": str(tiny_dir), "view_size": 8, "validate_every": 0, "device": "cpu",
            "lr_generator": 1e-3, "lr_student": 1e-3, **changes}


def _steps(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records if r["event"] == "step"]


def _same_checkpoints(a, b) -> None:
    for name in GROUPS:
        ta, tb = a.tensors(name), b.tensors(name)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_a_resumed_run_ends_with_the_same_bytes(tmp_path, data_dir, tiny_dir):
    """4 steps in one go, and 2 steps then --resume to 4: the same weights, optimiser states and losses."""
    straight = run_stage1(Stage1Config(**_settings(data_dir, tiny_dir, steps=4, batch_size=2, checkpoint_every=2,
                                                    keep_checkpoints=2)), tmp_path / "straight")
    assert straight.step == 4 and [c.step for c in complete_checkpoints(tmp_path / "straight")] == [2, 4]
    halves = tmp_path / "halves"
    run_stage1(Stage1Config(**_settings(data_dir, tiny_dir, steps=2, batch_size=2, checkpoint_every=2,
                                         keep_checkpoints=2)), halves)
    with (halves / LOG).open("a") as log:  # a record of a step that was not checkpointed before a crash
        log.write(json.dumps({"event": "step", "step": 3, "generator_loss": -1.0}) + "\n{\"event\": \"st")
    config = stage1_config(halves, {"steps": 4}, resume=True)
    resumed = run_stage1(config, halves, resume=True)
    assert (resumed.resumed_from, resumed.step) == (2, 4)
    _same_checkpoints(latest_checkpoint(tmp_path / "straight"), latest_checkpoint(halves))
    assert _steps(halves) == _steps(tmp_path / "straight") and len(_steps(halves)) == 4
    initial = build_tiny_zero123plus(tmp_path / "initial")  # the same seed: the published weights
    from safetensors.torch import load_file

    start = load_file(str(initial / "unet" / "diffusion_pytorch_model.safetensors"))
    trained = latest_checkpoint(halves).tensors("generator")
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the weights did move


def test_resume_refuses_other_settings_and_a_new_run_refuses_an_old_folder(tmp_path, data_dir, tiny_dir):
    run_dir = tmp_path / "run"
    run_stage1(Stage1Config(**_settings(data_dir, tiny_dir, steps=1)), run_dir)
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        stage1_config(run_dir, _settings(data_dir, tiny_dir), resume=False)
    with pytest.raises(UserError, match=r"these differ: lr_student 0.001 → 0.5") as info:
        stage1_config(run_dir, {"lr_student": 0.5, "steps": 3}, resume=True)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="holds no run"):
        stage1_config(tmp_path / "empty", {}, resume=True)
    config = stage1_config(run_dir, {"steps": 2}, resume=True)
    with pytest.raises(UserError, match="global batch of 1, now it would be 2"):
        run_stage1(Stage1Config(**{**config.to_dict(), "batch_size": 2}), run_dir, resume=True)
    assert (run_dir / NOTICE).read_text().count("CC-BY-NC 4.0") == 1


def _torchrun_stage1(tmp_path: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """``distill stage1`` in 2 gloo processes of batch 1 under torchrun; the finished run and its folder.

    A process killed by a signal (once in CI: rank 0 aborted inside gloo, SIGABRT, while rank 1 lived) is
    reported as a warning with the processes' own output and the run is tried once more in a new folder; a
    second failure, or any failure of our code (exit code 1 with its message), fails the test."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}

    def run(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "microdreamer", "distill", "stage1", "--out", str(out), "--batch-size", "1", *args],
            env=env, capture_output=True, text=True, timeout=300,
        )

    def report(done: subprocess.CompletedProcess) -> str:
        """The processes' own last lines (before torchrun's report of which rank failed), then torchrun's."""
        own = done.stderr.split("torch.distributed.elastic.multiprocessing.api")[0]
        return f"{own[-4000:]}\n...\n{done.stderr[-600:]}"

    out = tmp_path / "two"
    done = run(out)
    if done.returncode != 0 and re.search(r"failed \(exitcode: -\d+\)", done.stderr):
        warnings.warn(f"torchrun: a process was killed by a signal; trying once more. Its output:\n{report(done)}")
        out = tmp_path / "two-again"
        done = run(out)
    assert done.returncode == 0, report(done)
    return done, out


def test_two_torchrun_processes_equal_one_with_the_doubled_batch(tmp_path, data_dir, tiny_dir):
    """torchrun with 2 gloo processes of batch 1 against one process of batch 2, two steps.

    Each sample draws the same numbers either way (keyed by its place in the global batch), so the gradients
    differ only by float32 rounding: the batch is reduced in another grouping (two means of one, averaged by
    the all-reduce, against one mean of two) by kernels that block a batch of 1 and of 2 differently. The
    first step's Adam moments (0.1·g and 0.001·g²) and the logged losses of both steps agree to that rounding.
    Not bit for bit, and not the weights to rounding: Adam's update lr·m/(√v + 1e-8) is close to lr·sign(g),
    so where a gradient entry is near 0 rounding can flip its step; every weight stays within the
    two steps' bound 2·2·lr of the other run's."""
    settings = _settings(data_dir, tiny_dir, steps=2, checkpoint_every=1, keep_checkpoints=2)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    done, two_dir = _torchrun_stage1(tmp_path, args)
    assert done.stderr.count("done: step 2") == 1  # only rank 0 reports (and writes)
    run_stage1(Stage1Config(**settings, batch_size=2), tmp_path / "one")
    two, one = complete_checkpoints(two_dir), complete_checkpoints(tmp_path / "one")
    assert [c.step for c in two] == [c.step for c in one] == [1, 2]
    assert two[0].state()["global_batch"] == one[0].state()["global_batch"] == 2
    # gradients: sums of up to ~10³ products (batch × positions) grouped differently; 2¹⁰ ε of the largest entry
    for name in ("optimizer_generator", "optimizer_student"):
        a, b = one[0].tensors(name), two[0].tensors(name)
        moments = [k for k in a if k.startswith("exp_avg")]
        for key in moments:
            scale = a[key].abs().max().item()
            assert (a[key] - b[key]).abs().max().item() <= 1024 * EPS32 * scale, key
        assert all(a[k].abs().max() > 0 for k in moments if k.startswith("exp_avg/"))
    for name in ("generator", "student"):
        a, b = one[1].tensors(name), two[1].tensors(name)
        assert all((a[k] - b[k]).abs().max().item() <= 4 * 1e-3 for k in a)
    for x, y in zip(_steps(tmp_path / "one"), _steps(tmp_path / "two")):
        for key in ("generator_loss", "student_loss", "weight", "t_generator", "t_student"):
            assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)


def test_a_checkpoint_write_stopped_by_ctrl_c_or_a_full_disk_leaves_the_previous_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    first = save_checkpoint(run_dir, 5, {"generator": weights, "student": weights}, {"note": "first"}, keep=1)
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    real_save = checkpoints_module.save_file

    def stop_after_one(stop):
        calls = []

        def save(tensors, path, **kwargs):
            calls.append(path)
            if len(calls) == 2:
                Path(path).write_bytes(b"half a file")
                raise stop
            real_save(tensors, path, **kwargs)

        return save

    monkeypatch.setattr(checkpoints_module, "save_file", stop_after_one(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run_dir, 10, {"generator": weights, "student": weights}, {"note": "second"}, keep=1)
    monkeypatch.setattr(checkpoints_module, "save_file", stop_after_one(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(UserError, match=r"\(No space left on device\); the last good checkpoint is step-00000005") as info:
        save_checkpoint(run_dir, 10, {"generator": weights, "student": weights}, {"note": "second"}, keep=1)
    assert "\n" not in str(info.value)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000005"]  # no partial folder
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    latest = latest_checkpoint(run_dir)
    assert latest.step == 5 and latest.state()["note"] == "first"
    assert torch.equal(latest.tensors("student")["w"], weights["w"])
    monkeypatch.setattr(checkpoints_module, "save_file", real_save)
    save_checkpoint(run_dir, 10, {"generator": weights, "student": weights}, {"note": "second"}, keep=1)
    assert [c.step for c in complete_checkpoints(run_dir)] == [10]  # the older one goes once the new one is complete


def test_an_incomplete_checkpoint_folder_is_not_resumed_from(tmp_path):
    run_dir = tmp_path / "run"
    weights = {"generator": {"w": torch.zeros(2)}, "student": {"w": torch.ones(2)}}
    save_checkpoint(run_dir, 1, weights, {}, keep=3)
    newer = save_checkpoint(run_dir, 2, weights, {}, keep=3)
    (newer.path / "student.safetensors").unlink()  # e.g. a half-copied run folder
    assert latest_checkpoint(run_dir).step == 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{"), "cannot be read as JSON"),
        (lambda d: (d / "p1.png").unlink(), "1 listed file missing \\(p1.png\\)"),
        (lambda d: (d / "p2.png").write_bytes(b"not a png"), "p2.png is not a readable image"),
        (lambda d: save_image(d / "p0.png", np.zeros((4, 6, 3), np.uint8)), "p0.png is 6×4, condition images are square"),
    ],
)
def test_a_bad_data_folder_is_one_line_before_the_model_loads(tmp_path, data_dir, damage, message, monkeypatch):
    import shutil

    bad = Path(shutil.copytree(data_dir, tmp_path / "data"))
    damage(bad)
    from microdreamer.generators.zero123plus import Zero123PlusGenerator

    monkeypatch.setattr(Zero123PlusGenerator, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(UserError, match=message) as info:
        run_stage1(Stage1Config(data=str(bad), view_size=8), tmp_path / "run")
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


def test_the_command_line_trains_validates_resumes_and_says_the_licence(tmp_path, data_dir, tiny_dir, capsys):
    out = tmp_path / "run"
    args = ["distill", "stage1", "--out", str(out), "--data", str(data_dir), "--model", str(tiny_dir), "--view-size", "8",
            "--device", "cpu", "--validate-every", "1", "--validation-images", "2", "--validation-steps", "2"]
    assert main([*args, "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "non-commercial" in err and "validation at step 1: PSNR" in err and "done: step 1" in err
    records = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert [r["event"] for r in records] == ["validation", "step", "checkpoint", "validation"]
    assert all(np.isfinite(r["psnr"]) for r in records if r["event"] == "validation")
    from PIL import Image

    with Image.open(out / records[-1]["sheet"]) as sheet:  # 2 rows: condition | one-step grid | teacher grid
        assert sheet.size == (8 + 16 + 16, 2 * 24)
    assert "CC-BY-NC 4.0" in (out / NOTICE).read_text()
    assert main([*args, "--steps", "2"]) == 2  # the folder holds a run
    assert "pass --resume" in capsys.readouterr().err
    assert main(["distill", "stage1", "--out", str(out), "--resume", "--steps", "2", "--seed", "3"]) == 2
    assert "seed 0 → 3" in capsys.readouterr().err
    assert main(["distill", "stage1", "--out", str(out), "--resume", "--steps", "2"]) == 0
    assert "resuming at step 1 of 2" in capsys.readouterr().err
    assert latest_checkpoint(out).step == 2
    assert main(["models", "list", "--cache-dir", str(tmp_path / "hub")]) == 0
    assert "distill" in capsys.readouterr().out


def test_load_conditions_reads_a_prepared_folder(data_dir):
    conditions = load_conditions(data_dir)
    assert len(conditions) == 3 and conditions.size == 320
    image = conditions.image(0)
    assert image.shape == (1, 3, 320, 320)
    assert torch.allclose(image[0, :, 0, 0], torch.full((3,), 127 / 255))  # the gray background
