"""The Ray executor: a batch's jobs spread over workers of a Ray cluster (the GPUs of one machine, or many
machines), built on Ray Core actors.

- Each worker is an actor holding ``gpus_per_worker`` GPUs (``0.5`` packs two workers on a GPU) and
  ``cpus_per_worker`` CPUs, with the task's pipeline loaded once. The driver (this process) decides which
  jobs must run (``skip_existing``), hands them one at a time to free workers and collects results with
  ``ray.wait``, writing the manifest atomically as each arrives: it stays the one record of the batch,
  and ``skip_existing`` resumes from it across runs.
- A bad input is a failed entry, as locally, never retried. A worker that dies under a job (killed, out of
  memory, its machine lost) has the job retried on a fresh worker, up to ``max_attempts`` tries in all;
  the entry lists every attempt, and the partial files of the dead worker are removed.
- Workers write their outputs into the output folders themselves, so these must be on storage every worker
  reaches (a shared file system). A probe file the driver writes there is looked for by one worker on each
  machine before any job runs; one line says which folder a machine cannot see.
- When this executor starts Ray or connects to a cluster, the code of this ``microdreamer`` package reaches
  the workers through Ray's runtime environment (``py_modules``); the machines need the dependencies
  installed (``pip install "microdreamer[ray]"``). A caller that started Ray itself sets its own.
- Model weights are fetched once per machine, by one of its workers, before the others load them from
  that machine's cache.
- A worker runs ``cpus_per_worker`` torch threads (at least one). Each job seeds its own generator from the
  config's seed wherever it runs, so with the same thread count a job's 3D files equal those of a local run
  byte for byte.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..batch import Attempt, BatchState, BatchTask, Job, JobResult, ManifestEntry, one_line
from ..errors import UserError
from ..io.atomic import check_output_dir, partial_path
from ..wording import plural

#: the package the workers import, shipped to them through Ray's runtime environment
PACKAGE = Path(__file__).resolve().parent.parent
INSTALL = "pip install 'microdreamer[ray]' (or pip install 'ray[default]>=2.9,<3')"
LOGS = "; the workers' logs are in /tmp/ray/session_latest/logs on their machines"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RayExecutor:
    """Runs a batch on Ray workers. ``address``: an existing cluster (``HOST:6379``, ``ray://HOST:10001``),
    default ``RAY_ADDRESS`` or else a Ray instance on this machine for the batch's duration. ``workers``:
    default as many as the cluster's GPUs (or, for work without a GPU, CPUs) hold, at most one per job.
    ``gpus_per_worker``: default 1 when the cluster has GPUs and the task's device is not the CPU, else 0."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker is not None and not 0 <= self.gpus_per_worker < float("inf"):
            raise UserError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker:g}")
        if not 0 < self.cpus_per_worker < float("inf"):
            raise UserError(f"--cpus-per-worker must be more than 0, got {self.cpus_per_worker:g}")
        if self.max_attempts < 1:
            raise UserError(f"--max-attempts must be at least 1, got {self.max_attempts}")
        import_ray()

    def execute(self, jobs: Sequence[Job], task: BatchTask[Any, Any], state: BatchState) -> None:
        todo = []
        for index, (job, entry) in enumerate(zip(jobs, state.entries)):
            try:
                run = state.needs_run(job, entry, task)
            except UserError as error:
                if state.single:
                    raise
                state.failed(entry, error, job)
                run = False
            if run:
                todo.append(index)
            else:
                state.observer.job_started(index, job)
                state.observer.job_finished(index, entry)
        state.save()
        if todo:
            with _connected(self.address) as ray:
                _Dispatch(ray, self, jobs, task, state).run(todo)


@contextmanager
def _connected(address: str | None) -> Iterator[Any]:
    """Ray, started here (or connected to ``address``) for the batch, unless the caller started it."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = dict(runtime_env={"py_modules": [str(PACKAGE)]}, log_to_driver=False,
                                   logging_level=logging.WARNING)
    if address is None and "RAY_ADDRESS" not in os.environ:
        options["include_dashboard"] = False  # a Ray instance of our own
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        where = address or os.environ.get("RAY_ADDRESS", "this machine")
        raise UserError(f"cannot start or reach the Ray cluster at {where} ({one_line(error)[:200]}); check "
                        "--address (a running cluster: ray start --head)") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass
class _Outcome:
    """What a worker's call returns: a result, or the error (one line) and whether it is the input's own."""

    result: Any = None
    error: str | None = None
    user_error: bool = False

    def raise_error(self) -> None:
        raise (UserError if self.user_error else RuntimeError)(self.error)


def _call(function: Any, job: Job | None = None) -> _Outcome:
    try:
        return _Outcome(function())
    except Exception as error:
        return _Outcome(None, one_line(error, job), isinstance(error, UserError))


class _Worker:
    """The actor: one task, its pipeline loaded once."""

    def __init__(self, task: BatchTask[Any, Any], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.task = task
        self.pipeline: Any = None

    def where(self) -> tuple[str, str, int]:
        """(Ray node id, host name, process id)."""
        import ray

        return ray.get_runtime_context().get_node_id(), socket.gethostname(), os.getpid()

    def probe(self, probes: list[str]) -> str | None:
        """What is wrong with the first of the probe files the driver wrote into the output folders that this
        worker cannot see, or whose folder it cannot write in; None when all are fine."""
        for probe in map(Path, probes):
            if not probe.is_file():
                return f"{probe.parent} does not hold the probe file {probe.name} the driver wrote there"
            try:
                check_output_dir(probe.parent, "the output folder")
            except UserError as error:
                return str(error)
        return None

    def fetch(self) -> _Outcome:
        return _call(self.task.fetch)

    def load(self) -> _Outcome:
        """Load the pipeline; the outcome's result is :meth:`where` the worker runs."""
        outcome = _call(self.task.load)
        self.pipeline = outcome.result
        return _Outcome(self.where(), outcome.error, outcome.user_error)

    def run(self, job: Job) -> _Outcome:
        def run() -> JobResult:
            return self.task.run(self.pipeline, job, self.task.prepare(job), lambda done, total, info: None)

        return _call(run, job)


@dataclass
class _Handle:
    """A worker as the driver knows it."""

    actor: Any
    name: str  # ray-1, ray-2, … in the order they were started
    node: str = ""
    host: str = ""
    pid: int = 0


@dataclass
class _Call:
    kind: str  # "load" or "run"
    worker: _Handle
    index: int = -1  # the job of a run
    start: float = 0.0


class _Dispatch:
    """One batch on the cluster: start the workers, hand out jobs, collect results, replace dead workers."""

    def __init__(self, ray: Any, options: RayExecutor, jobs: Sequence[Job], task: BatchTask[Any, Any],
                 state: BatchState) -> None:
        self.ray = ray
        self.options = options
        self.jobs = jobs
        self.task = task
        self.state = state
        self.gpus, count = self._size()
        self.count = count
        self.actor_class = ray.remote(_Worker)
        self.started: list[_Handle] = []
        self.free: list[_Handle] = []
        self.calls: dict[Any, _Call] = {}
        self.load_deaths = 0

    def _size(self) -> tuple[float, int]:
        """GPUs per worker and how many workers the cluster holds."""
        o = self.options
        resources = self.ray.cluster_resources()
        have_gpus, have_cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
        wants_gpu = self.task.device_name.split(":")[0] not in ("cpu", "mps")
        gpus = o.gpus_per_worker if o.gpus_per_worker is not None else (1.0 if have_gpus and wants_gpu else 0.0)
        if gpus > have_gpus:
            raise UserError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {plural(int(have_gpus), 'GPU')}")
        if o.cpus_per_worker > have_cpus:
            raise UserError(f"--cpus-per-worker {o.cpus_per_worker:g}: the Ray cluster has {have_cpus:g} CPUs")
        fit = int(have_cpus // o.cpus_per_worker)
        if gpus:
            fit = min(fit, int(have_gpus // gpus))
        if o.workers is not None and o.workers > fit:
            raise UserError(f"--workers {o.workers}: the Ray cluster ({have_cpus:g} CPUs, {plural(int(have_gpus), 'GPU')}) "
                            f"has room for {plural(fit, 'worker')} of {o.cpus_per_worker:g} CPU and {gpus:g} GPU each")
        return gpus, o.workers or fit

    def run(self, todo: list[int]) -> None:
        queue = deque(todo)
        try:
            workers = [self._spawn() for _ in range(min(self.count, len(todo)))]
            try:
                self._prepare_nodes(workers, todo)
            except self.ray.exceptions.RayActorError as error:
                raise RuntimeError(f"a Ray worker did not start: {type(error).__name__}{LOGS}") from None
            for worker in workers:
                self._load(worker)
            while queue or any(call.kind == "run" for call in self.calls.values()):
                while self.free and queue:
                    self._dispatch(queue.popleft())
                (ref,), _ = self.ray.wait(list(self.calls), num_returns=1)
                self._collect(ref, queue)
        except BaseException as error:
            for call in self.calls.values():
                if call.kind == "run":
                    self.state.entries[call.index].status = (
                        "interrupted" if isinstance(error, KeyboardInterrupt) else "pending")
            raise
        finally:
            for worker in self.started:
                self.ray.kill(worker.actor)
            for call in self.calls.values():
                if call.kind == "run":
                    self._remove_partials(call)

    def _spawn(self) -> _Handle:
        o = self.options
        actor = self.actor_class.options(num_cpus=o.cpus_per_worker, num_gpus=self.gpus, max_restarts=0,
                                         max_task_retries=0).remote(self.task, max(1, int(o.cpus_per_worker)))
        worker = _Handle(actor, f"ray-{len(self.started) + 1}")
        self.started.append(worker)
        return worker

    def _prepare_nodes(self, workers: list[_Handle], todo: list[int]) -> None:
        """Where each worker runs; then on each machine (by one of its workers) the probe of the output
        folders and the fetch of the weights."""
        for worker, place in zip(workers, self.ray.get([w.actor.where.remote() for w in workers])):
            worker.node, worker.host, worker.pid = place
        per_node = list({w.node: w for w in workers}.values())
        folders = sorted({p.parent for i in todo for p in self.task.outputs(self.jobs[i])})
        probes = [folder / f".microdreamer-probe-{uuid.uuid4().hex}" for folder in folders]
        try:
            for probe in probes:
                probe.parent.mkdir(parents=True, exist_ok=True)
                probe.touch()
            for worker, problem in zip(per_node, self.ray.get([w.actor.probe.remote(list(map(str, probes)))
                                                                for w in per_node])):
                if problem is not None:
                    raise UserError(f"the output folder is not on storage every Ray worker reaches: on {worker.host}, "
                                    f"{problem}; give --out a folder on a file system every machine mounts "
                                    "(or --executor local)")
        finally:
            for probe in probes:
                probe.unlink(missing_ok=True)
        for outcome in self.ray.get([w.actor.fetch.remote() for w in per_node]):
            if outcome.error is not None:
                outcome.raise_error()

    def _load(self, worker: _Handle) -> None:
        self.calls[worker.actor.load.remote()] = _Call("load", worker)

    def _dispatch(self, index: int) -> None:
        worker = self.free.pop()
        self.state.observer.job_started(index, self.jobs[index])
        self.calls[worker.actor.run.remote(self.jobs[index])] = _Call("run", worker, index, time.perf_counter())

    def _collect(self, ref: Any, queue: deque[int]) -> None:
        call = self.calls.pop(ref)
        try:
            outcome = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as error:  # the worker died (or cannot be reached)
            self._died(call, error, queue)
            return
        if call.kind == "load":
            if outcome.error is not None:
                outcome.raise_error()  # every job would fail the same way: the batch stops
            call.worker.node, call.worker.host, call.worker.pid = outcome.result
        else:
            entry = self._tried(call, "done" if outcome.error is None else "failed", outcome.error)
            if outcome.error is None:
                entry.record(outcome.result)
            elif self.state.single:
                outcome.raise_error()
            else:
                self.state.failed(entry, outcome.error)
            self._close(call.index)
        self.free.append(call.worker)

    def _tried(self, call: _Call, outcome: str, error: str | None) -> ManifestEntry:
        entry, worker = self.state.entries[call.index], call.worker
        entry.tried(Attempt(worker.name, worker.host, worker.pid, outcome, error,
                            round(time.perf_counter() - call.start, 3)))
        entry.seconds = round(sum(a["seconds"] for a in entry.attempts), 3)
        return entry

    def _close(self, index: int) -> None:
        self.state.save()
        self.state.observer.job_finished(index, self.state.entries[index])

    def _died(self, call: _Call, error: Exception, queue: deque[int]) -> None:
        """A worker died: its job is tried again (up to ``max_attempts`` tries), and a fresh worker replaces
        it while jobs are waiting."""
        worker = call.worker
        self.ray.kill(worker.actor)
        reason = f"worker {worker.name} on {worker.host} (pid {worker.pid}) died: {type(error).__name__}"
        if call.kind == "run":
            self._remove_partials(call)
            entry = self._tried(call, "crashed", reason)
            if len(entry.attempts) < self.options.max_attempts:
                queue.appendleft(call.index)
                self.state.save()
            elif self.state.single:
                raise RuntimeError(f"{reason}, {plural(len(entry.attempts), 'time')}")
            else:
                self.state.failed(entry, f"its worker died in each of {plural(len(entry.attempts), 'attempt')} "
                                         f"(last: {reason})")
                self._close(call.index)
        else:
            self.load_deaths += 1
            if self.load_deaths >= self.options.max_attempts:
                raise RuntimeError(f"Ray workers died while loading the pipeline {plural(self.load_deaths, 'time')} "
                                   f"(last: {reason}){LOGS}")
        if queue:
            self._load(self._spawn())

    def _remove_partials(self, call: _Call) -> None:
        """The temporary files a killed worker leaves (outputs are renamed into place only when complete)."""
        for path in self.task.outputs(self.jobs[call.index]):
            partial_path(path, call.worker.pid).unlink(missing_ok=True)
