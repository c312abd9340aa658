"""Batch runs: many inputs, one loaded pipeline, one manifest.

A command is (list of inputs) × (one pipeline, loaded once) × (a per-input run function). The inputs
become :class:`Job` objects (:func:`expand_inputs` turns files, folders and globs into jobs); the command
supplies a :class:`BatchTask`; :class:`BatchRunner` runs every job, keeps going after a bad input, skips
finished ones with ``skip_existing`` and records everything in a manifest JSON that is rewritten after
each job, so an interrupted or crashed batch still says what finished; a job skipped because it finished
earlier keeps what the earlier manifest recorded of it (seed, config, timings, evaluations, peak memory).
"""

from __future__ import annotations

import glob
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from .errors import InputError, UserError
from .io.atomic import atomic_path

#: file name endings a folder or glob contributes as images (case-insensitive)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
#: ``<stem><suffix>`` files our commands derive from an input ``<stem>.*``: never inputs themselves
DERIVED_SUFFIXES = ("_rgba", "_views", "_turntable", "_albedo")
#: file types the commands write beside images (reports, splats, meshes, turntables): never inputs, never reported
OUTPUT_SUFFIXES = (".json", ".ply", ".glb", ".obj", ".mtl", ".mp4", ".gif")
#: entry states; ``pending`` entries were never reached (the batch was interrupted or aborted first)
STATUSES = ("done", "failed", "skipped", "interrupted", "pending")

StepCallback = Callable[[int, int, str], None]  # (steps done, total steps, what the step was)


@dataclass(frozen=True)
class Job:
    """One input of a batch. ``source`` is None for a run without an input file (a prompt, or the reference
    teacher's own front view); ``problem`` is set when the input could not be found, and fails the job."""

    stem: str  # outputs are named after it
    input: str  # what the user gave, as shown in the manifest
    source: Path | None = None
    problem: str | None = None


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _members(spec: str | Path) -> list[Path] | None:
    """The entries of a folder, or the matches of a glob pattern that names no existing file, sorted by
    name; None for any other spec (a file, or a path that does not exist)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return sorted(path.iterdir())
    if not path.exists() and _has_glob(text):
        return [Path(p) for p in sorted(glob.glob(text, recursive=True))]
    return None


def _visible_files(paths: list[Path]) -> list[Path]:
    return [f for f in paths if f.is_file() and not f.name.startswith(".")]


def is_single_input(specs: Sequence[str | Path]) -> bool:
    """At most one input spec, and not a folder or a glob: a plain run, where errors end the command."""
    return len(specs) <= 1 and (not specs or _members(specs[0]) is None)


def _derived(files: list[Path]) -> set[Path]:
    """Files named ``<stem><derived suffix>`` (:data:`DERIVED_SUFFIXES`) beside an input ``<stem>.*`` of the
    same group."""
    stems = {(f.parent, f.stem) for f in files}
    derived = set()
    for f in files:
        base, _, tail = f.stem.rpartition("_")
        if base and f"_{tail}" in DERIVED_SUFFIXES and (f.parent, base) in stems:
            derived.add(f)
    return derived


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _split_images(files: list[Path], exclude: Callable[[Path], bool] | None) -> tuple[list[Path], list[Path]]:
    """The visible image files among ``files``: (inputs, earlier outputs), the latter derived from another
    input beside them or rejected by ``exclude``."""
    images = [f for f in _visible_files(files) if _is_image(f)]
    derived = _derived(images)
    earlier = [f for f in images if f in derived or (exclude is not None and exclude(f))]
    return [f for f in images if f not in earlier], earlier


def expand_inputs(
    specs: Sequence[str | Path], *, exclude: Callable[[Path], bool] | None = None, unique_stems: bool = True
) -> list[Job]:
    """Files, folders and glob patterns → jobs, in the given order (folders and globs sorted by name).

    A file named directly is always an input. Folders and globs contribute their image files
    (:data:`IMAGE_SUFFIXES`, hidden files left out), except files a command derived from another input
    beside them (``cat_rgba.png`` next to ``cat.jpg``) and those ``exclude`` rejects. A missing file, an
    empty folder or a glob without matches becomes a job that fails with that problem; the same file given
    twice runs once; with ``unique_stems`` (outputs in one folder) two inputs with the same stem would
    write the same outputs, so the later one fails.
    """
    jobs: list[Job] = []
    seen: set[Path] = set()
    owners: dict[str, Path] = {}
    for spec in specs:
        text = str(spec)
        path = Path(text).expanduser()
        members = _members(text)
        if members is not None:
            files, _ = _split_images(members, exclude)
            if not files and path.is_dir():
                jobs.append(Job(path.name or text, text, None, f"folder {text} holds no images (png, jpg, webp)"))
            elif not files:
                jobs.append(Job(path.stem or text, text, None, f"no image matches {text}"))
        elif path.exists():
            files = [path]
        else:
            jobs.append(Job(path.stem or text, text, None, f"input image not found: {text}"))
            continue
        for file in files:
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            stem = file.stem
            problem = None
            if unique_stems and stem in owners:
                problem = f"{file} would write the same outputs as {owners[stem]} (both are named '{stem}'); rename one"
            else:
                owners[stem] = file
            jobs.append(Job(stem, str(file), file, problem))
    return jobs


def ignored_files(specs: Sequence[str | Path], *, exclude: Callable[[Path], bool] | None = None) -> list[Path]:
    """Visible files in the folders and glob matches of ``specs`` that :func:`expand_inputs` (with the same
    ``exclude``) does not take as inputs, so that a command can say what it left out: files that are not
    images (``notes.txt``, ``photo.heic``) and images that are earlier outputs (``cat_rgba.png``). The
    other file types the commands write (:data:`OUTPUT_SUFFIXES`) are not listed."""
    ignored: list[Path] = []
    for spec in specs:
        members = _members(spec) or []
        visible = _visible_files(members)
        others = [f for f in visible if not _is_image(f) and f.suffix.lower() not in OUTPUT_SUFFIXES]
        for f in others + _split_images(members, exclude)[1]:
            if f not in ignored:
                ignored.append(f)
    return ignored


@dataclass
class JobResult:
    """What a finished job reports to the manifest."""

    outputs: dict[str, str]
    seed: int | None = None
    config: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    evaluations: dict[str, int] = field(default_factory=dict)
    peak_memory: dict[str, float] = field(default_factory=dict)  # GiB, see pipeline.peak_memory
    note: str = ""  # one line for the log: "5000 Gaussians, 41.2 s SIR"


@dataclass
class ManifestEntry:
    input: str
    stem: str
    status: str = "pending"
    seed: int | None = None
    config: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    evaluations: dict[str, int] = field(default_factory=dict)
    peak_memory: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    note: str = ""
    seconds: float = 0.0

    def keep_record_of(self, earlier: "ManifestEntry") -> None:
        """Take what ``earlier`` (the same job, finished by an earlier run) recorded of the run that made it."""
        self.seed, self.config, self.timings = earlier.seed, earlier.config, earlier.timings
        self.evaluations, self.peak_memory = earlier.evaluations, earlier.peak_memory


@dataclass
class Manifest:
    command: str
    out_dir: str
    started: str
    finished: str | None = None
    interrupted: bool = False
    entries: list[ManifestEntry] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files in input folders/globs that are not images
    earlier_outputs: list[str] = field(default_factory=list)  # images there that earlier runs wrote

    def counts(self) -> dict[str, int]:
        return {s: sum(e.status == s for e in self.entries) for s in STATUSES}

    @property
    def failed(self) -> bool:
        return any(e.status == "failed" for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"] = self.counts()
        return data

    def write(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))

    @staticmethod
    def finished_entries(path: Path | None) -> dict[str, ManifestEntry]:
        """The entries of jobs a manifest at ``path`` records as finished (done, or skipped with outputs that
        an earlier run made), by stem; none when there is no readable manifest there."""
        try:
            rows = json.loads(path.read_text())["entries"] if path is not None else []
            names = {f.name for f in fields(ManifestEntry)}
            entries = [ManifestEntry(**{k: v for k, v in row.items() if k in names}) for row in rows]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
        return {e.stem: e for e in entries if e.status in ("done", "skipped")}


PipelineT = TypeVar("PipelineT")
PreparedT = TypeVar("PreparedT")


class BatchTask(Protocol, Generic[PipelineT, PreparedT]):
    """What a command plugs into :class:`BatchRunner`."""

    def outputs(self, job: Job) -> list[Path]:
        """The files a finished job leaves (all present ⇒ ``skip_existing`` skips the job)."""

    def prepare(self, job: Job) -> PreparedT:
        """Per-input work that needs no model (load, preprocess); errors fail this input only."""

    def load(self) -> PipelineT:
        """The pipeline, called once, right before the first job that needs it."""

    def run(self, pipeline: PipelineT, job: Job, prepared: PreparedT, progress: StepCallback) -> JobResult:
        """Run one input and write its outputs (atomically)."""


class BatchObserver:
    """Progress hooks; the default does nothing (the CLI draws progress bars)."""

    def batch_started(self, total: int) -> None: ...

    def loading(self, active: bool) -> None: ...

    def job_started(self, index: int, job: Job) -> None: ...

    def step(self, done: int, total: int, info: str) -> None: ...

    def job_finished(self, index: int, entry: ManifestEntry) -> None: ...


def _one_line(error: BaseException, job: Job) -> str:
    """The error as the manifest records it beside ``job``'s input: one line, without the input's path."""
    if isinstance(error, InputError) and error.path == job.source:
        error = UserError(error.reason)
    text = " ".join(str(error).split())
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


class BatchRunner:
    """Runs a :class:`BatchTask` over jobs.

    In a batch (``single=False``) a failing input is recorded and the batch goes on; with ``single=True``
    (one named input) its error propagates unchanged. Loading the pipeline failing aborts the batch: the
    error propagates once the manifest is written. ``KeyboardInterrupt`` marks the running job
    ``interrupted``, writes the manifest and propagates. The manifest (when ``manifest`` is a path) is
    rewritten after every job. ``ignored`` (from :func:`ignored_files`) lands in the manifest as ``ignored``
    (not images) and ``earlier_outputs`` (images).
    """

    def __init__(
        self,
        command: str,
        out_dir: Path,
        *,
        manifest: Path | None = None,
        skip_existing: bool = False,
        single: bool = False,
        observer: BatchObserver | None = None,
        ignored: Sequence[Path] = (),
    ) -> None:
        self.command = command
        self.ignored = [str(p) for p in ignored if not _is_image(Path(p))]
        self.earlier_outputs = [str(p) for p in ignored if _is_image(Path(p))]
        self.out_dir = Path(out_dir)
        self.manifest_path = manifest
        self.skip_existing = skip_existing
        self.single = single
        self.observer = observer or BatchObserver()

    def run(self, jobs: Sequence[Job], task: BatchTask[PipelineT, PreparedT]) -> Manifest:
        manifest = Manifest(
            self.command, str(self.out_dir), _now(), ignored=list(self.ignored),
            earlier_outputs=list(self.earlier_outputs),
        )
        manifest.entries = [ManifestEntry(job.input, job.stem) for job in jobs]
        earlier = Manifest.finished_entries(self.manifest_path) if self.skip_existing else {}
        self.observer.batch_started(len(jobs))
        loaded: list[PipelineT] = []
        try:
            for index, (job, entry) in enumerate(zip(jobs, manifest.entries)):
                self.observer.job_started(index, job)
                start = time.perf_counter()
                try:
                    self._run_job(job, entry, task, loaded, earlier.get(job.stem))
                except KeyboardInterrupt:
                    entry.status = "interrupted"
                    raise
                except _LoadFailed as failure:
                    entry.status, entry.error = "failed", _one_line(failure.error, job)
                    raise failure.error from None
                except Exception as error:
                    if self.single:
                        raise
                    entry.status, entry.error = "failed", _one_line(error, job)
                finally:
                    entry.seconds = round(time.perf_counter() - start, 3)
                    self._save(manifest)
                self.observer.job_finished(index, entry)
        except KeyboardInterrupt:
            manifest.interrupted = True
            raise
        finally:
            manifest.finished = _now()
            self._save(manifest)
        return manifest

    def _run_job(
        self, job: Job, entry: ManifestEntry, task: BatchTask[PipelineT, PreparedT], loaded: list[PipelineT],
        earlier: ManifestEntry | None,
    ) -> None:
        if job.problem is not None:
            raise UserError(job.problem)
        outputs = task.outputs(job)
        if self.manifest_path is not None and self.manifest_path.resolve() in {p.resolve() for p in outputs}:
            raise UserError(f"{job.input}: its outputs would replace the batch manifest {self.manifest_path}")
        if self.skip_existing and outputs and all(p.exists() for p in outputs):
            entry.status = "skipped"
            entry.outputs = {p.name: str(p) for p in outputs}
            entry.note = "outputs exist"
            if earlier is not None:
                entry.keep_record_of(earlier)
            return
        prepared = task.prepare(job)
        if not loaded:
            self.observer.loading(True)
            try:
                loaded.append(task.load())
            except KeyboardInterrupt:
                raise
            except Exception as error:
                raise _LoadFailed(error) from None
            finally:
                self.observer.loading(False)
        result = task.run(loaded[0], job, prepared, self.observer.step)
        entry.status = "done"
        entry.outputs, entry.seed, entry.config = result.outputs, result.seed, result.config
        entry.timings, entry.evaluations, entry.note = result.timings, result.evaluations, result.note
        entry.peak_memory = result.peak_memory

    def _save(self, manifest: Manifest) -> None:
        if self.manifest_path is not None:
            manifest.write(self.manifest_path)


class _LoadFailed(Exception):
    """Loading the pipeline failed: every input would fail the same way, so the batch stops."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
