"""Batch runs: many inputs, one loaded pipeline, one manifest.

A command is (list of inputs) × (one pipeline, loaded once) × (a per-input run function). The inputs
become :class:`Job` objects (:func:`expand_inputs` turns files, folders and globs into jobs); the command
supplies a :class:`BatchTask`; :class:`BatchRunner` keeps the books and hands the jobs to an executor
(:mod:`microdreamer.executors`: this process, or workers on a Ray cluster), optionally only one shard of
them. A batch keeps going after a bad input, skips finished ones with ``skip_existing`` and records
everything in a manifest JSON that is rewritten after each job, so an interrupted or crashed batch still
says what finished; a job skipped because it finished earlier keeps what the earlier manifest recorded of
it (seed, config, timings, evaluations, peak memory).
"""

from __future__ import annotations

import glob
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .errors import InputError, UserError
from .io.atomic import atomic_path

if TYPE_CHECKING:
    from .executors.shard import Shard

#: file name endings a folder or glob contributes as images (case-insensitive)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
#: ``<stem><suffix>`` files our commands derive from an input ``<stem>.*``: never inputs themselves
DERIVED_SUFFIXES = ("_rgba", "_views", "_turntable", "_albedo")
#: file types the commands write beside images (reports, splats, meshes, turntables): never inputs, never reported
OUTPUT_SUFFIXES = (".json", ".ply", ".safetensors", ".glb", ".obj", ".mtl", ".mp4", ".gif")
#: a batch's manifest in its output folder, unless named otherwise
MANIFEST_NAME = "manifest.json"
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


def batch_manifest_path(manifest: Path | None, out: Path | None, single: bool, shard: Shard | None = None) -> Path | None:
    """Where a batch's manifest goes: ``manifest``, else ``OUT/manifest.json`` for a batch (none for a single
    input, or without ``out``); a shard's is named after the shard (``manifest.shard-I-of-N.json``)."""
    path = manifest if manifest is not None or single or out is None else out / MANIFEST_NAME
    return path if path is None or shard is None else shard.manifest_path(path)


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
class Attempt:
    """One try of a job by one worker, as the manifest records it."""

    worker: str  # "local" (this process), or the Ray worker ("ray-2")
    host: str
    pid: int
    outcome: str  # done | failed (the input's own error) | crashed (the worker died under it)
    error: str | None = None
    seconds: float = 0.0

    @classmethod
    def here(cls, worker: str, outcome: str, error: str | None = None, seconds: float = 0.0) -> "Attempt":
        """An attempt made by this process."""
        return cls(worker, socket.gethostname(), os.getpid(), outcome, error, round(seconds, 3))


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
    attempts: list[dict[str, Any]] = field(default_factory=list)  # each an :class:`Attempt`; none when not run

    def tried(self, attempt: Attempt) -> None:
        self.attempts.append(asdict(attempt))

    def record(self, result: JobResult) -> None:
        """A finished run's report."""
        self.status = "done"
        self.outputs, self.seed, self.config = result.outputs, result.seed, result.config
        self.timings, self.evaluations, self.note = result.timings, result.evaluations, result.note
        self.peak_memory = result.peak_memory

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
    shard: dict[str, Any] | None = None  # a shard's manifest: which shard, of what (executors.shard.Shard.select)

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        """A manifest read back from its JSON (fields this version does not know are left out)."""
        names = {f.name for f in fields(ManifestEntry)}
        entries = [ManifestEntry(**{k: v for k, v in row.items() if k in names}) for row in data["entries"]]
        top = {f.name for f in fields(cls)} - {"entries"}
        return cls(**{k: v for k, v in data.items() if k in top}, entries=entries)

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        """The manifest at ``path``; a :class:`UserError` when it cannot be read as one."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except OSError as error:
            raise UserError(f"cannot read the manifest {path} ({error.strerror or error})") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{path} is not a batch manifest (unreadable JSON, or no entries)") from None

    @staticmethod
    def finished_entries(path: Path | None) -> dict[str, ManifestEntry]:
        """The entries of jobs a manifest at ``path`` records as finished (done, or skipped with outputs that
        an earlier run made), by stem; none when there is no readable manifest there."""
        try:
            entries = Manifest.read(path).entries if path is not None else []
        except UserError:
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

    def fetch(self) -> None:
        """Make what :meth:`load` reads available on this machine (a teacher's weights into the download
        cache). A remote executor calls it once per machine before its workers load; locally ``load``
        fetches what it needs itself."""

    def load(self) -> PipelineT:
        """The pipeline, called once per worker, before the first job that needs it."""

    def run(self, pipeline: PipelineT, job: Job, prepared: PreparedT, progress: StepCallback) -> JobResult:
        """Run one input and write its outputs (atomically)."""


class BatchObserver:
    """Progress hooks; the default does nothing (the CLI draws progress bars)."""

    def batch_started(self, total: int) -> None: ...

    def loading(self, active: bool) -> None: ...

    def job_started(self, index: int, job: Job) -> None: ...

    def step(self, done: int, total: int, info: str) -> None: ...

    def job_finished(self, index: int, entry: ManifestEntry) -> None: ...


def one_line(error: BaseException, job: Job | None = None) -> str:
    """An error as the manifest records it beside ``job``'s input: one line, a :class:`UserError`'s message
    (without the input's own path) or another error with its type."""
    if job is not None and isinstance(error, InputError) and error.path == job.source:
        error = UserError(error.reason)
    text = " ".join(str(error).split())
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


class BatchState:
    """The books of a running batch, which an executor keeps as its jobs finish: the manifest (rewritten
    after each change), what an earlier manifest recorded of finished jobs, and the observer."""

    def __init__(
        self, manifest: Manifest, path: Path | None, *, skip_existing: bool, single: bool, observer: BatchObserver
    ) -> None:
        self.manifest = manifest
        self.path = path
        self.skip_existing = skip_existing
        self.single = single
        self.observer = observer
        self.earlier = Manifest.finished_entries(path) if skip_existing else {}

    @property
    def entries(self) -> list[ManifestEntry]:
        return self.manifest.entries

    def needs_run(self, job: Job, entry: ManifestEntry, task: BatchTask[Any, Any]) -> bool:
        """Whether ``job`` must run: False when ``skip_existing`` finds all its outputs (``entry`` is then
        marked skipped); a :class:`UserError` when it cannot run at all (its input is missing, or its
        outputs would replace the manifest)."""
        if job.problem is not None:
            raise UserError(job.problem)
        outputs = task.outputs(job)
        if self.path is not None and self.path.resolve() in {p.resolve() for p in outputs}:
            raise UserError(f"{job.input}: its outputs would replace the batch manifest {self.path}")
        if not (self.skip_existing and outputs and all(p.exists() for p in outputs)):
            return True
        entry.status = "skipped"
        entry.outputs = {p.name: str(p) for p in outputs}
        entry.note = "outputs exist"
        if job.stem in self.earlier:
            entry.keep_record_of(self.earlier[job.stem])
        return False

    def failed(self, entry: ManifestEntry, error: BaseException | str, job: Job | None = None) -> None:
        entry.status, entry.error = "failed", error if isinstance(error, str) else one_line(error, job)

    def save(self) -> None:
        if self.path is not None:
            self.manifest.write(self.path)


class Executor(Protocol):
    """Runs a batch's jobs (:mod:`microdreamer.executors`)."""

    def execute(self, jobs: Sequence[Job], task: BatchTask[Any, Any], state: BatchState) -> None:
        """Run every job (``state.entries[i]`` is ``jobs[i]``'s) and record each in ``state`` as it ends.
        A failing input fails its entry (with ``state.single`` its error propagates); a failing load
        propagates once the manifest says so; ``KeyboardInterrupt`` marks the running jobs ``interrupted``
        and propagates."""


class BatchRunner:
    """Runs a :class:`BatchTask` over jobs with an executor (default: in this process).

    In a batch (``single=False``) a failing input is recorded and the batch goes on; with ``single=True``
    (one named input) its error propagates unchanged. Loading the pipeline failing aborts the batch: the
    error propagates once the manifest is written. ``KeyboardInterrupt`` marks the running job
    ``interrupted``, writes the manifest and propagates. The manifest (when ``manifest`` is a path) is
    rewritten after every job. ``ignored`` (from :func:`ignored_files`) lands in the manifest as ``ignored``
    (not images) and ``earlier_outputs`` (images). With a ``shard`` only that shard's jobs run (and are in
    the manifest).
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
        executor: Executor | None = None,
        shard: Shard | None = None,
    ) -> None:
        from .executors.local import LocalExecutor  # the executors build on this module

        self.command = command
        self.ignored = [str(p) for p in ignored if not _is_image(Path(p))]
        self.earlier_outputs = [str(p) for p in ignored if _is_image(Path(p))]
        self.out_dir = Path(out_dir)
        self.manifest_path = manifest
        self.skip_existing = skip_existing
        self.single = single
        self.observer = observer or BatchObserver()
        self.executor = executor or LocalExecutor()
        self.shard = shard

    def run(self, jobs: Sequence[Job], task: BatchTask[PipelineT, PreparedT]) -> Manifest:
        manifest = Manifest(
            self.command, str(self.out_dir), _now(), ignored=list(self.ignored),
            earlier_outputs=list(self.earlier_outputs),
        )
        if self.shard is not None:
            jobs, manifest.shard = self.shard.select(jobs)
        manifest.entries = [ManifestEntry(job.input, job.stem) for job in jobs]
        state = BatchState(manifest, self.manifest_path, skip_existing=self.skip_existing, single=self.single,
                           observer=self.observer)
        self.observer.batch_started(len(jobs))
        try:
            self.executor.execute(jobs, task, state)
        except KeyboardInterrupt:
            manifest.interrupted = True
            raise
        finally:
            manifest.finished = _now()
            state.save()
        return manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
