"""Batch machinery without models: input expansion, the runner's failure handling, skip-existing, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microdreamer.batch import (
    BatchObserver,
    BatchRunner,
    Job,
    JobResult,
    expand_inputs,
    ignored_files,
    is_single_input,
)
from microdreamer.errors import InputError, UserError


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_folder_expansion_keeps_images_and_drops_derived_hidden_and_other_files(tmp_path: Path):
    for name in ["b.jpg", "a.PNG", "my.cat.v2.webp", "a_rgba.png", "a_views.png", "b_turntable.gif",
                 "b_albedo.png", "lone_rgba.png", ".hidden.png", "notes.txt", "a.json", "a.glb", "c.heic"]:
        _touch(tmp_path / name)
    (tmp_path / "sub.png").mkdir()
    jobs = expand_inputs([tmp_path])
    # a_rgba/a_views/b_turntable/b_albedo are derived from a and b; lone_rgba has no source beside it
    assert [j.source.name for j in jobs] == ["a.PNG", "b.jpg", "lone_rgba.png", "my.cat.v2.webp"]
    assert [j.stem for j in jobs] == ["a", "b", "lone_rgba", "my.cat.v2"]
    assert all(j.problem is None and j.input == str(j.source) for j in jobs)
    # a command may exclude more (preprocess skips every *_rgba.png)
    jobs = expand_inputs([tmp_path], exclude=lambda p: p.name.endswith("_rgba.png"))
    assert [j.stem for j in jobs] == ["a", "b", "my.cat.v2"]
    # other files and earlier outputs are named, not dropped silently; hidden files and the non-image files
    # the commands write are left out
    earlier = ["a_rgba.png", "a_views.png", "b_albedo.png"]
    assert [p.name for p in ignored_files([tmp_path])] == ["c.heic", "notes.txt", *earlier]
    assert [p.name for p in ignored_files([str(tmp_path / "*.*"), tmp_path])] == ["c.heic", "notes.txt", *earlier]
    excluded = ignored_files([tmp_path], exclude=lambda p: p.name.endswith("_rgba.png"))
    assert [p.name for p in excluded] == ["c.heic", "notes.txt", *earlier, "lone_rgba.png"]
    assert ignored_files([tmp_path / "notes.txt", tmp_path / "a.PNG", tmp_path / "missing"]) == []  # named files are inputs


def test_files_globs_missing_duplicates_and_stem_clashes(tmp_path: Path):
    a = _touch(tmp_path / "x" / "cat.png")
    b = _touch(tmp_path / "y" / "cat.jpg")
    c = _touch(tmp_path / "y" / "dog.png")
    notes = _touch(tmp_path / "notes.txt")
    jobs = expand_inputs([a, str(tmp_path / "y" / "*.png"), a, notes, tmp_path / "missing.png",
                          str(tmp_path / "none" / "*.jpg"), b, tmp_path / "x"])
    assert [(j.stem, j.source) for j in jobs] == [
        ("cat", a), ("dog", c), ("notes", notes), ("missing", None), ("*", None), ("cat", b)
    ]
    problems = [j.problem for j in jobs]
    assert problems[:3] == [None, None, None]  # a named file is an input whatever its suffix
    assert "input image not found" in problems[3] and "no image matches" in problems[4]
    assert "same outputs" in problems[5] and str(a) in problems[5]
    # outputs beside each input: equal stems in different folders do not clash
    assert [j.problem for j in expand_inputs([a, b], unique_stems=False)] == [None, None]
    # an empty folder is a problem, not silence
    (tmp_path / "empty").mkdir()
    (job,) = expand_inputs([tmp_path / "empty"])
    assert job.source is None and "holds no images" in job.problem


def test_single_input_detection(tmp_path: Path):
    image = _touch(tmp_path / "a.png")
    assert is_single_input([]) and is_single_input([image]) and is_single_input([tmp_path / "missing.png"])
    assert not is_single_input([image, image])
    assert not is_single_input([tmp_path])
    assert not is_single_input([str(tmp_path / "*.png")])


class FakeTask:
    """Writes ``<stem>.out``; inputs whose file says "bad" fail in prepare; counts loads and runs."""

    def __init__(self, out_dir: Path, interrupt_on: str | None = None, load_error: Exception | None = None):
        self.out_dir = out_dir
        self.interrupt_on = interrupt_on
        self.load_error = load_error
        self.loads = 0
        self.runs: list[str] = []

    def outputs(self, job: Job) -> list[Path]:
        return [self.out_dir / f"{job.stem}.out"]

    def prepare(self, job: Job) -> str:
        text = job.source.read_text()
        if text == "bad":
            raise UserError(f"{job.source} is bad")
        if text == "bug":
            raise ZeroDivisionError("division by zero")
        return text

    def load(self) -> str:
        self.loads += 1
        if self.load_error is not None:
            raise self.load_error
        return "pipeline"

    def run(self, pipeline: str, job: Job, prepared: str, progress) -> JobResult:
        assert pipeline == "pipeline"
        progress(1, 2, "half")
        if job.stem == self.interrupt_on:
            raise KeyboardInterrupt
        progress(2, 2, "done")
        self.runs.append(job.stem)
        out = self.outputs(job)[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(prepared)
        return JobResult({"out": str(out)}, seed=1, config={"k": 1}, timings={"t": 0.5},
                         evaluations={"total": 3}, note="ok")


class Recorder(BatchObserver):
    def __init__(self):
        self.events: list[tuple] = []

    def batch_started(self, total):
        self.events.append(("batch", total))

    def step(self, done, total, info):
        self.events.append(("step", done, total, info))

    def job_finished(self, index, entry):
        self.events.append(("finished", index, entry.status))


@pytest.fixture
def inputs(tmp_path: Path) -> list[Job]:
    src = tmp_path / "in"
    for name, text in [("a", "A"), ("b", "bad"), ("c", "C"), ("d", "bug")]:
        _touch(src / f"{name}.png", text)
    return expand_inputs([src])


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def test_bad_inputs_are_recorded_and_the_batch_goes_on(tmp_path: Path, inputs):
    out, manifest = tmp_path / "out", tmp_path / "out" / "manifest.json"
    task, observer = FakeTask(out), Recorder()
    result = BatchRunner("fake", out, manifest=manifest, observer=observer).run(inputs, task)
    assert task.loads == 1 and task.runs == ["a", "c"]
    assert [e.status for e in result.entries] == ["done", "failed", "done", "failed"]
    assert result.failed and result.counts() == {"done": 2, "failed": 2, "skipped": 0, "interrupted": 0, "pending": 0}
    assert result.entries[1].error.endswith("b.png is bad")
    assert result.entries[3].error == "ZeroDivisionError: division by zero"  # unexpected errors keep their type
    assert ("step", 2, 2, "done") in observer.events and observer.events[0] == ("batch", 4)
    data = _manifest(manifest)
    assert data == json.loads(json.dumps(result.to_dict())) and not data["interrupted"]
    done = data["entries"][0]
    assert (done["seed"], done["config"], done["timings"], done["evaluations"]) == (1, {"k": 1}, {"t": 0.5}, {"total": 3})
    assert done["outputs"] == {"out": str(out / "a.out")} and (out / "a.out").read_text() == "A"


def test_skip_existing_does_no_work_and_never_loads(tmp_path: Path, inputs):
    out = tmp_path / "out"
    BatchRunner("fake", out).run(inputs, FakeTask(out))
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    task = FakeTask(out)
    result = BatchRunner("fake", out, manifest=out / "m.json", skip_existing=True).run(inputs, task)
    assert task.loads == 0 and task.runs == []
    assert [e.status for e in result.entries] == ["skipped", "failed", "skipped", "failed"]
    assert result.entries[0].outputs == {"a.out": str(out / "a.out")}
    assert {p: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "m.json"} == before
    # without skip_existing, the finished inputs run again
    task = FakeTask(out)
    BatchRunner("fake", out).run(inputs, task)
    assert task.runs == ["a", "c"]


def test_a_resumed_batch_keeps_what_the_earlier_manifest_recorded_of_skipped_jobs(tmp_path: Path, inputs):
    out, manifest = tmp_path / "out", tmp_path / "out" / "manifest.json"
    BatchRunner("fake", out, manifest=manifest).run(inputs, FakeTask(out))
    first = {e["stem"]: e for e in _manifest(manifest)["entries"]}
    (out / "c.out").unlink()  # c runs again; a is skipped
    for _ in range(2):  # and skipped again: what was kept is kept once more
        task = FakeTask(out)
        BatchRunner("fake", out, manifest=manifest, skip_existing=True).run(inputs, task)
        entries = {e["stem"]: e for e in _manifest(manifest)["entries"]}
        assert entries["a"]["status"] == "skipped" and entries["a"]["note"] == "outputs exist"
        kept = ("seed", "config", "timings", "evaluations", "peak_memory")
        assert {k: entries["a"][k] for k in kept} == {k: first["a"][k] for k in kept}
        assert entries["a"]["timings"] == {"t": 0.5}
    assert [e["status"] for e in _manifest(manifest)["entries"]] == ["skipped", "failed", "skipped", "failed"]
    # nothing is taken from a manifest that cannot be read, or without skip_existing
    manifest.write_text("{not json")
    result = BatchRunner("fake", out, manifest=manifest, skip_existing=True).run(inputs, FakeTask(out))
    assert result.entries[0].status == "skipped" and result.entries[0].timings == {} and result.entries[0].seed is None


def test_single_input_errors_propagate(tmp_path: Path, inputs):
    with pytest.raises(UserError, match="b.png is bad"):
        BatchRunner("fake", tmp_path, single=True).run([inputs[1]], FakeTask(tmp_path))
    with pytest.raises(UserError, match="input image not found"):
        BatchRunner("fake", tmp_path, single=True).run(expand_inputs([tmp_path / "nope.png"]), FakeTask(tmp_path))


def test_a_load_failure_stops_the_batch_and_is_recorded(tmp_path: Path, inputs):
    manifest = tmp_path / "m.json"
    task = FakeTask(tmp_path / "out", load_error=UserError("model not cached"))
    with pytest.raises(UserError, match="model not cached"):
        BatchRunner("fake", tmp_path, manifest=manifest).run(inputs, task)
    assert task.loads == 1
    data = _manifest(manifest)
    assert [e["status"] for e in data["entries"]] == ["failed", "pending", "pending", "pending"]
    assert data["entries"][0]["error"] == "model not cached"


def test_interruption_marks_the_running_job_and_writes_the_manifest(tmp_path: Path, inputs):
    out, manifest = tmp_path / "out", tmp_path / "m.json"
    with pytest.raises(KeyboardInterrupt):
        BatchRunner("fake", out, manifest=manifest).run(inputs, FakeTask(out, interrupt_on="c"))
    data = _manifest(manifest)
    assert data["interrupted"] and data["finished"] is not None
    assert [e["status"] for e in data["entries"]] == ["done", "failed", "interrupted", "pending"]
    assert sorted(p.name for p in out.iterdir()) == ["a.out"]


def test_outputs_may_not_replace_the_manifest(tmp_path: Path):
    src = _touch(tmp_path / "in" / "manifest.png", "M")
    result = BatchRunner("fake", tmp_path, manifest=tmp_path / "manifest.out").run(
        expand_inputs([src, src.parent]), FakeTask(tmp_path)
    )
    (entry,) = result.entries
    assert entry.status == "failed" and "batch manifest" in entry.error
    assert json.loads((tmp_path / "manifest.out").read_text())["entries"][0]["status"] == "failed"


def test_an_input_error_is_recorded_without_the_path_its_entry_names(tmp_path: Path):
    a, b = _touch(tmp_path / "a.png"), _touch(tmp_path / "b.png")
    other = tmp_path / "other.png"

    class Task(FakeTask):
        def prepare(self, job: Job) -> str:
            raise InputError(job.source if job.stem == "a" else other, "the file is empty")

    jobs = [Job("a", str(a), a), Job("b", str(b), b)]
    result = BatchRunner("fake", tmp_path / "out").run(jobs, Task(tmp_path / "out"))
    assert [e.error for e in result.entries] == ["the file is empty", f"{other}: the file is empty"]
    with pytest.raises(InputError) as error:  # a single input's error is printed alone: it keeps the path
        BatchRunner("fake", tmp_path / "out", single=True).run(jobs[:1], Task(tmp_path / "out"))
    assert str(error.value) == f"{a}: the file is empty"
