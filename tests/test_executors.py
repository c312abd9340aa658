"""Executors: a batch on Ray workers (results, failed rows, a killed worker) against the local run, and shards
of a batch (by a hash of each input's stem) joined back into the unsharded manifest."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microdreamer import Pipeline
from microdreamer.api import preprocess_images
from microdreamer.batch import Job, expand_inputs
from microdreamer.cli import main
from microdreamer.errors import UserError
from microdreamer.executors import Shard, make_executor
from microdreamer.executors.shard import merge_manifests, shard_of
from microdreamer.io.atomic import partial_path
from microdreamer.pipeline import ImageTask, PreprocessOptions
from microdreamer.sir.cameras import Cameras
from microdreamer.teachers.reference import ReferenceTeacher

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"
TINY = dict(iters=1, steps=2, views=2, res=32, seed=3)
TINY_CONFIG = {"gaussians": {"num_points": 300}}
#: what a manifest entry records of where and how long a job ran: the rest must not depend on the executor
WHERE_AND_WHEN = ("seconds", "timings", "peak_memory", "note", "attempts")
OUTPUT_FILES = ("{}.ply", "{}_views.png", "{}_rgba.png")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Four RGBA renders of Spot and a truncated PNG."""
    folder = tmp_path_factory.mktemp("photos")
    teacher = ReferenceTeacher(SPOT, resolution=64)
    for index, azimuth in enumerate([0.0, 40.0, 80.0, 120.0]):
        out = teacher.render(Cameras.orbit([0.0], [azimuth], 2.0, 64))
        rgba = torch.cat([out.rgb, out.alpha], 1)[0].permute(1, 2, 0).numpy()
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8)).save(folder / f"cow{index}.png")
    (folder / "broken.png").write_bytes((folder / "cow0.png").read_bytes()[:150])
    return folder


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_preset(teacher="reference", model=str(SPOT), overrides=TINY_CONFIG, **TINY)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, pipe, photos, one_thread) -> Path:
    """The batch run in this process, on one thread (as each Ray worker below runs)."""
    out = tmp_path_factory.mktemp("local")
    pipe.run_batch([photos], out)
    return out


def _entries(out: Path, name: str = "manifest.json") -> list[dict]:
    """A manifest's entries without where and how long each ran, output paths relative to ``out``."""
    text = (out / name).read_text().replace(str(out), "OUT")
    return [{k: v for k, v in e.items() if k not in WHERE_AND_WHEN} for e in json.loads(text)["entries"]]


def _same_files(a: Path, b: Path, stems: list[str]) -> None:
    for stem in stems:
        for name in OUTPUT_FILES:
            assert filecmp.cmp(a / name.format(stem), b / name.format(stem), shallow=False), name.format(stem)


# Ray ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the session: the executors find it started and use it as it is."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the task below, on the workers
    yield ray
    ray.shutdown()


def test_a_ray_batch_equals_the_local_run_and_a_bad_input_is_one_failed_row(tmp_path_factory, ray_session, pipe,
                                                                            photos, local_run):
    out = tmp_path_factory.mktemp("ray")  # as deep as the local run's (reports record the model's relative path)
    executor = make_executor("ray", workers=2, cpus_per_worker=1)
    manifest = pipe.run_batch([photos], out, executor=executor)
    assert [(e.stem, e.status) for e in manifest.entries] == [
        ("broken", "failed"), ("cow0", "done"), ("cow1", "done"), ("cow2", "done"), ("cow3", "done")]
    broken = manifest.entries[0]
    assert broken.input.endswith("broken.png") and broken.error.startswith("truncated or corrupt") and "\n" not in broken.error
    assert [(a["outcome"], a["error"]) for a in broken.attempts] == [("failed", broken.error)]  # never retried
    assert {a["worker"] for e in manifest.entries for a in e.attempts} <= {"ray-1", "ray-2"}
    assert all(len(e.attempts) == 1 and e.attempts[0]["pid"] != os.getpid() for e in manifest.entries)
    # the same files byte for byte, the same manifest apart from where and how long each job ran
    _same_files(local_run, out, ["cow0", "cow1", "cow2", "cow3"])
    assert _entries(out) == _entries(local_run)
    assert [(e["stem"], [a["outcome"] for a in e["attempts"]]) for e in json.loads((out / "manifest.json").read_text())["entries"]] == [
        (e["stem"], [a["outcome"] for a in e["attempts"]]) for e in json.loads((local_run / "manifest.json").read_text())["entries"]]
    # --skip-existing resumes from the manifest: nothing runs again
    again = pipe.run_batch([photos], out, executor=executor, skip_existing=True)
    assert [e.status for e in again.entries] == ["failed", "skipped", "skipped", "skipped", "skipped"]
    assert again.entries[1].timings == manifest.entries[1].timings and again.entries[1].attempts == []


#: how long the killer waits for the victim's flag, and the victim for its killer: far beyond what a busy
#: machine needs to start the Ray workers and reach the victim (a CI run under load took over 120 s), below
#: pytest-timeout's 1800 s, so a broken kill fails the test instead of hanging it
WAIT_S = 1200


class DiesOnce(ImageTask):
    """The first try of ``victim`` leaves a partial output, writes its worker's pid to ``flag`` and waits to
    be killed; every other try runs as usual."""

    victim = "cow1"
    flag = Path()

    def run(self, pipeline, job, prepared, progress):
        if job.stem == self.victim and not self.flag.exists():
            partial_path(self.outputs(job)[0], os.getpid()).write_text("half")
            self.flag.write_text(str(os.getpid()))
            time.sleep(WAIT_S)  # killed within milliseconds of the flag
        return super().run(pipeline, job, prepared, progress)


def _kill_when_flagged(flag: Path) -> threading.Thread:
    def kill() -> None:
        deadline = time.monotonic() + WAIT_S
        while not (flag.exists() and flag.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(flag.read_text()), signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def _dies_once(pipe: Pipeline, out: Path, flag: Path) -> DiesOnce:
    task = DiesOnce(pipe.config, None, out)
    task.flag = flag
    return task


def test_a_killed_worker_has_its_input_retried_on_another_within_the_bound(tmp_path, ray_session, pipe, photos,
                                                                               local_run):
    from microdreamer.batch import BatchRunner
    from microdreamer.executors.ray import RayExecutor

    jobs = [j for j in expand_inputs([photos]) if j.stem != "broken"]
    out, flag = tmp_path / "out", tmp_path / "flag"
    killer = _kill_when_flagged(flag)
    runner = BatchRunner("image2gs", out, manifest=out / "manifest.json", executor=RayExecutor(workers=2))
    manifest = runner.run(jobs, _dies_once(pipe, out, flag))
    killer.join(1)
    assert [e.status for e in manifest.entries] == ["done"] * 4
    victim = manifest.entries[1]
    crashed, done = victim.attempts
    assert crashed["outcome"] == "crashed" and crashed["pid"] == int(flag.read_text()) and "died" in crashed["error"]
    assert done["outcome"] == "done" and (done["worker"], done["pid"]) != (crashed["worker"], crashed["pid"])
    assert json.loads((out / "manifest.json").read_text())["entries"][1]["attempts"] == victim.attempts
    assert not list(out.glob(".*partial*"))  # the dead worker's partial file is gone
    _same_files(local_run, out, ["cow0", "cow1", "cow2", "cow3"])

    # with one attempt allowed, the input fails (one line, the attempt recorded) and the batch goes on
    out, flag = tmp_path / "bounded", tmp_path / "flag2"
    killer = _kill_when_flagged(flag)
    manifest = BatchRunner("image2gs", out, executor=RayExecutor(workers=1, max_attempts=1)).run(
        jobs[:2], _dies_once(pipe, out, flag))
    killer.join(1)
    assert [e.status for e in manifest.entries] == ["done", "failed"]
    assert manifest.entries[1].error.startswith("its worker died in each of 1 attempt (last: worker ray-1")
    assert [a["outcome"] for a in manifest.entries[1].attempts] == ["crashed"]


def test_workers_the_cluster_cannot_hold_are_one_line_before_any_starts(tmp_path, ray_session, photos):
    for options, message in [
        (dict(workers=3), "--workers 3: the Ray cluster (2 CPUs, 0 GPUs) has room for 2 workers of 1 CPU and 0 GPU each"),
        (dict(gpus_per_worker=1), "--gpus-per-worker 1: the Ray cluster has 0 GPUs"),
        (dict(cpus_per_worker=4), "--cpus-per-worker 4: the Ray cluster has 2 CPUs"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            preprocess_images([photos], tmp_path, executor=make_executor("ray", **options))
        assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no probe file left, no output
        assert {e["status"] for e in json.loads((tmp_path / "manifest.json").read_text())["entries"]} == {"pending"}


def test_a_worker_that_cannot_see_the_output_folder_says_which(tmp_path):
    from microdreamer.executors.ray import _Worker

    worker = _Worker(ImageTask(Pipeline.from_preset(teacher="reference", model=str(SPOT)).config, None, tmp_path), 1)
    (tmp_path / ".probe").touch()
    assert worker.probe([str(tmp_path / ".probe")]) is None
    assert worker.probe([str(tmp_path / ".probe"), str(tmp_path / "x" / ".probe")]) == (
        f"{tmp_path / 'x'} does not hold the probe file .probe the driver wrote there")


def test_executor_options_are_checked_in_one_line(tmp_path, capsys, monkeypatch):
    base = ["preprocess", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
    for extra, message in [
        (["--address", "host:6379"], "--address needs --executor ray"),
        (["--executor", "dask"], "unknown executor 'dask' (use local or ray)"),
        (["--shard", "2/2"], "--shard I/N needs 0 <= I < N, got 2/2"),
        (["--shard", "1of2"], "--shard takes I/N"),
    ]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(base + ["--executor", "ray"]) == 2
    assert "--executor ray needs Ray, which is not installed: pip install 'microdreamer[ray]'" in capsys.readouterr().err


# shards ------------------------------------------------------------------------------------------------


def test_shards_merged_equal_the_unsharded_manifest(tmp_path, photos, capsys):
    inputs = [photos, tmp_path / "missing.png"]
    options = PreprocessOptions(remove_background="none", size=32)
    whole = preprocess_images(inputs, tmp_path / "whole", options=options)
    out = tmp_path / "sharded"
    for index in (1, 0):
        part = preprocess_images(inputs, out, options=options, shard=f"{index}/2")
        assert part.shard["count"] == 2 and part.shard["inputs"] == len(whole.entries)
    paths = [out / "manifest.shard-0-of-2.json", out / "manifest.shard-1-of-2.json"]
    for index, path in enumerate(paths):
        assert [e["stem"] for e in json.loads(path.read_text())["entries"]] == [
            e.stem for e in whole.entries if shard_of(e.stem, 2) == index]
    merged = merge_manifests(paths)
    assert [e.stem for e in merged.entries] == [e.stem for e in whole.entries]
    # the command joins them too: the whole batch's manifest, in the unsharded order, exit 1 as an input failed
    assert main(["manifest", "merge", str(out), "--quiet"]) == 1
    assert _entries(out) == _entries(tmp_path / "whole")
    assert main(["manifest", "merge", str(out)]) == 2
    assert "manifest.json already exists: pass --overwrite" in capsys.readouterr().err
    # every shard must be there, once
    with pytest.raises(UserError, match=r"shard 1/2 is missing \(manifest.shard-1-of-2.json\)"):
        merge_manifests(paths[:1])
    copy = out / "copy.json"
    copy.write_text(paths[0].read_text())
    with pytest.raises(UserError, match="shard 0/2 is given twice"):
        merge_manifests([paths[0], copy, paths[1]])
    with pytest.raises(UserError, match="is not a shard's manifest"):
        merge_manifests([tmp_path / "whole" / "manifest.json"])


def test_an_inputs_shard_is_a_hash_of_its_stem_and_adding_inputs_moves_no_other():
    stems = [f"photo_{i:03d}" for i in range(60)]
    assert all(shard_of(s, 4) == int(hashlib.sha256(s.encode()).hexdigest(), 16) % 4 for s in stems)
    before = {s: shard_of(s, 4) for s in stems}
    assert set(before.values()) == {0, 1, 2, 3}
    jobs = [Job(s, f"in/{s}.png") for s in stems]
    more = jobs[:30] + [Job(f"new_{i}", f"in/new_{i}.png") for i in range(20)] + jobs[30:]
    for index in range(4):
        taken, record = Shard(index, 4).select(more)
        assert [j.stem for j in taken if j.stem in before] == [s for s in stems if before[s] == index]
        assert [more[p] for p in record["positions"]] == taken
    # a shard never depends on the order or the spelling of the other inputs
    assert Shard(1, 4).select(list(reversed(jobs)))[0] == list(reversed(Shard(1, 4).select(jobs)[0]))


def test_the_command_starts_ray_for_the_batch_and_matches_a_local_run(tmp_path, photos):
    """A fresh process: ``--executor ray`` starts Ray on this machine (this package reaching the workers through
    its runtime environment), runs the batch and stops Ray; the files equal a local run's."""
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-m", "microdreamer", "preprocess", str(photos), "--no-rembg", "--size", "32", "--quiet"]
    ray_run = subprocess.run(args + ["--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "1"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert ray_run.returncode == 1, ray_run.stderr  # the broken PNG failed, as it fails locally
    assert "failed: " in ray_run.stderr and "broken.png" in ray_run.stderr
    assert main(["preprocess", str(photos), "--no-rembg", "--size", "32", "--quiet", "--out", str(tmp_path / "local")]) == 1
    for index in range(4):
        name = f"cow{index}_rgba.png"
        assert filecmp.cmp(tmp_path / "ray" / name, tmp_path / "local" / name, shallow=False), name
    entries = json.loads((tmp_path / "ray" / "manifest.json").read_text())["entries"]
    assert {a["worker"] for e in entries for a in e["attempts"]} == {"ray-1"}
