"""The local executor: every job in this process, one after the other, the pipeline loaded once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..batch import Attempt, BatchState, BatchTask, Job, ManifestEntry, one_line


class LocalExecutor:
    """Runs the jobs in order in this process. The pipeline loads right before the first job that needs it,
    after that job's input was prepared (a bad input fails without waiting for a model)."""

    def execute(self, jobs: Sequence[Job], task: BatchTask[Any, Any], state: BatchState) -> None:
        loaded: list[Any] = []
        for index, (job, entry) in enumerate(zip(jobs, state.entries)):
            state.observer.job_started(index, job)
            start = time.perf_counter()
            try:
                if state.needs_run(job, entry, task):
                    self._run(job, entry, task, state, loaded, start)
            except KeyboardInterrupt:
                entry.status = "interrupted"
                raise
            except _LoadFailed as failure:
                state.failed(entry, failure.error, job)
                raise failure.error from None
            except Exception as error:
                if state.single:
                    raise
                state.failed(entry, error, job)
            finally:
                entry.seconds = round(time.perf_counter() - start, 3)
                state.save()
            state.observer.job_finished(index, entry)

    @staticmethod
    def _run(job: Job, entry: ManifestEntry, task: BatchTask[Any, Any], state: BatchState, loaded: list[Any],
             start: float) -> None:
        def tried(outcome: str, error: str | None = None) -> None:
            entry.tried(Attempt.here("local", outcome, error, time.perf_counter() - start))

        try:
            prepared = task.prepare(job)
            if not loaded:
                loaded.append(_load(task, state))
            result = task.run(loaded[0], job, prepared, state.observer.step)
        except Exception as error:
            if not isinstance(error, _LoadFailed):
                tried("failed", one_line(error, job))
            raise
        entry.record(result)
        tried("done")


def _load(task: BatchTask[Any, Any], state: BatchState) -> Any:
    state.observer.loading(True)
    try:
        return task.load()
    except Exception as error:
        raise _LoadFailed(error) from None
    finally:
        state.observer.loading(False)


class _LoadFailed(Exception):
    """Loading the pipeline failed: every input would fail the same way, so the batch stops."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
