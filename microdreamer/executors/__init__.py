"""Executors: where a batch's jobs run. ``local`` runs them one after another in this process; ``ray``
spreads them over the workers of a Ray cluster (:mod:`.ray`, the optional ``ray`` extra). Either runs all
the jobs or one shard of them (:mod:`.shard`, for the array jobs of Slurm and other schedulers)."""

from __future__ import annotations

from typing import Any

from ..batch import Executor
from ..errors import UserError
from .local import LocalExecutor
from .shard import Shard

EXECUTORS = ("local", "ray")

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "Shard", "make_executor"]


def make_executor(executor: Executor | str | None = None, **ray_options: Any) -> Executor:
    """An executor by name (None: local) with the :class:`~.ray.RayExecutor` options given (None = default),
    or ``executor`` itself."""
    options = {k: v for k, v in ray_options.items() if v is not None}
    if executor is None or executor == "local":
        if options:
            raise UserError(f"--{next(iter(options)).replace('_', '-')} needs --executor ray")
        return LocalExecutor()
    if executor == "ray":
        from .ray import RayExecutor

        return RayExecutor(**options)
    if isinstance(executor, str):
        raise UserError(f"unknown executor '{executor}' (use {' or '.join(EXECUTORS)})")
    if options:
        raise UserError("executor options go with an executor name, not an executor object")
    return executor
