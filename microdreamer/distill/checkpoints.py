"""Checkpoints of a distillation run: each one complete, or not there at all.

``RUN_DIR/checkpoints/step-00000100/`` holds one safetensors file per group of tensors (the generator's and
the student's UNet weights, their Adam states) and ``state.json`` (the step, the run's settings, the
optimisers' hyperparameters and parameter names). No random-generator state is needed: every draw of a
step is keyed by (seed, step, sample) (:mod:`.randomness`).

A checkpoint is written into a hidden temporary folder beside the others, every file flushed to disk, and
then renamed into place in one step; older checkpoints beyond ``keep`` are deleted only after that. A full
disk, Ctrl-C or a crash during the write therefore leaves the previous checkpoint untouched and at most a
temporary folder, which the writer removes when it can and the next run removes otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import UserError

CHECKPOINTS = "checkpoints"
STATE = "state.json"
_NAME = re.compile(r"step-(\d{8})")
_TEMPORARY = ".partial-step-"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE).read_text())

    def tensors(self, name: str) -> dict[str, Tensor]:
        return load_file(str(self.path / f"{name}.safetensors"))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, step: int, groups: dict[str, dict[str, Tensor]], state: dict[str, Any], keep: int
) -> Checkpoint:
    """Write ``groups`` (``name → tensors``, one ``name.safetensors`` each) and ``state`` as the checkpoint of
    ``step``, then delete all but the newest ``keep`` checkpoints. A failed write (disk full, no permission)
    is a :class:`UserError` naming the last good checkpoint; nothing of the failed one is left."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_TEMPORARY}{step:08d}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, tensors in groups.items():
            path = tmp / f"{name}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
            _fsync(path)
        (tmp / STATE).write_text(json.dumps({**state, "step": step, "files": sorted(groups)}, indent=1))
        _fsync(tmp / STATE)
        if final.exists():  # a checkpoint of this step from an earlier, longer run that was resumed before it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final.parent)
    except (OSError, SafetensorError) as exc:
        last = latest_checkpoint(run_dir)
        kept = f"the last good checkpoint is {last.path.name}" if last else "there is no earlier checkpoint"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
        raise UserError(f"cannot write the checkpoint of step {step} in {final.parent} ({reason}); {kept}; "
                        "free space and continue with --resume") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return Checkpoint(final, step)


def complete_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The run's complete checkpoints, oldest first (a folder whose state.json lists files it lacks, e.g. one
    half copied by hand, is not complete)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if not match or not (path / STATE).is_file():
            continue
        try:
            files = json.loads((path / STATE).read_text()).get("files", [])
        except (OSError, ValueError):
            continue
        if all((path / f"{name}.safetensors").is_file() for name in files):
            found.append(Checkpoint(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def remove_partial(run_dir: Path) -> None:
    """Delete the temporary folders of checkpoint writes that were killed."""
    folder = Path(run_dir) / CHECKPOINTS
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(_TEMPORARY):
                shutil.rmtree(path, ignore_errors=True)


# optimiser state ---------------------------------------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, Tensor], list[dict]]:
    """An optimiser's state as tensors keyed ``<state>/<parameter name>`` and its parameter groups (the
    hyperparameters, and the names of their parameters instead of indices), for :func:`load_optimizer`.
    ``names`` are the parameters' names in the order they were given to the optimiser."""
    saved = optimizer.state_dict()
    tensors = {}
    for index, values in saved["state"].items():
        for key, value in values.items():
            tensors[f"{key}/{names[index]}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in saved["param_groups"]]
    return tensors, groups


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict], names: list[str]
) -> None:
    """Restore what :func:`optimizer_tensors` saved into an optimiser over the same named parameters."""
    index = {name: i for i, name in enumerate(names)}
    saved_names = [n for g in groups for n in g["params"]]
    if saved_names != names:
        raise UserError("the checkpoint's optimiser holds other parameters than this model; is it from another model?")
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        what, _, name = key.partition("/")
        state.setdefault(index[name], {})[what] = value
    param_groups = [{**{k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"},
                     "params": [index[n] for n in g["params"]]} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
