"""The training loop both GECO stages share: run folder, resume, steps, checkpoints, validation, processes.

A stage is a :class:`Trainer`: the networks it trains, each with its Adam optimiser, and one training step.
:func:`run_training` does the rest the same way for both:

- settings are checked and the data read before anything loads; under ``torchrun`` the processes join
  one group (:mod:`.distributed`), each takes a contiguous slice of the global batch, gradients are averaged
  and only rank 0 writes;
- the run folder (:mod:`.runs`) gets ``config.json``, ``NOTICE.txt`` and ``log.jsonl`` (one JSON record per
  step, checkpoint and validation);
- checkpoints (:mod:`.checkpoints`) hold all trained weights and optimiser states; ``--resume`` loads the
  newest complete one and continues exactly: every random number of a step is keyed by (seed, step,
  sample) (:mod:`.randomness`), so a run stopped and resumed ends with the same bytes as one that never
  stopped;
- validation runs at the start and every ``validate_every`` steps (rank 0);
- on CUDA the networks run under bf16 autocast with float32 weights and optimiser state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..io.atomic import atomic_path, check_output_dir
from ..pipeline import resolve_device, versions
from .checkpoints import Checkpoint, latest_checkpoint, load_optimizer, optimizer_tensors, remove_partial, save_checkpoint
from .config import TrainingConfig
from .distributed import World, all_agree, average_gradients, join_world, leave_world, mean_over_world
from .runs import LICENCE_NOTICES, LOG, NOTICE, RUN_CONFIG, trim_log, write_json

Event = dict[str, Any]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; bf16 only on CUDA."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise UserError(f"--precision bf16 (autocast) needs a CUDA device, not {device.type}; use fp32")
    return precision


def resolve_run_device(name: str, world: World) -> torch.device:
    """The device of this process: under torchrun on CUDA, the GPU of its local rank."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


class Validator(Protocol):
    def run(self, step: int, run_dir: Path) -> Event:
        """Validate at ``step``, write what it shows under ``run_dir`` and return the log record."""
        ...


class Trainer:
    """What a stage trains: named networks, each with its Adam optimiser, and one step of training.

    Subclasses register their networks with :meth:`train` and implement :meth:`train_step`; they may build
    data before the first step (:meth:`prepare`) and validate (:meth:`validator`)."""

    #: the stats a step returns, in the order they are averaged over the processes
    STATS: tuple[str, ...] = ()

    def __init__(self, config: TrainingConfig, world: World, device: torch.device) -> None:
        self.config, self.world, self.device = config, world, device
        self.bf16 = resolve_precision(config.precision, device) == "bf16"
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def precision(self) -> AbstractContextManager[Any]:
        """bf16 autocast on CUDA when asked for, else nothing."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def train(self, name: str, module: nn.Module, lr: float) -> None:
        """Train ``module`` (its float32 weights) as ``name`` with Adam at ``lr``."""
        module.float().train().requires_grad_(True)
        self.modules[name] = module
        self.optimizers[name] = torch.optim.Adam(module.parameters(), lr=lr, betas=self.config.betas)

    @property
    def steps(self) -> int:
        """The step the run trains up to."""
        return self.config.steps

    def prepare(self, run_dir: Path, emit: Callable[[Event], None]) -> Event | None:
        """Work before the first step (after the run folder is written); returns a log record or None."""
        return None

    def validator(self) -> Validator | None:
        """The periodic validation (on rank 0), or None."""
        return None

    def train_step(self, step: int) -> dict[str, Tensor]:
        """Step ``step`` (1-based): this process's part of the global batch; returns :data:`STATS` as tensors."""
        raise NotImplementedError

    def update(self, name: str) -> None:
        """Average ``name``'s gradients over the processes, take its optimiser step and clear them."""
        average_gradients(self.modules[name].parameters(), self.world)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def mean_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """The stats of this process's samples averaged over the processes (all hold equal shares)."""
        values = mean_over_world(torch.stack([stats[k].detach().float().to(self.device) for k in self.STATS]),
                                 self.world)
        return dict(zip(self.STATS, values.tolist()))

    # checkpoints -------------------------------------------------------------------------------------------

    def state_groups(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, list[dict]]]:
        """The tensors to checkpoint (every trained network's weights and optimiser state) and the optimisers'
        parameter groups."""
        groups, params = {}, {}
        for name, module in self.modules.items():
            groups[name] = module.state_dict()
            names = [n for n, _ in module.named_parameters()]
            groups[f"optimizer_{name}"], params[name] = optimizer_tensors(self.optimizers[name], names)
        return groups, params

    def load(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state()
        for name, module in self.modules.items():
            module.load_state_dict(checkpoint.tensors(name), strict=True)
            names = [n for n, _ in module.named_parameters()]
            load_optimizer(self.optimizers[name], checkpoint.tensors(f"optimizer_{name}"),
                           state["optimizers"][name], names)


@dataclass
class Session:
    """What a stage is built from: its settings, run folder, process group, device and the checkpoint it
    resumes from (None for a new run)."""

    config: TrainingConfig
    run_dir: Path
    world: World
    device: torch.device
    checkpoint: Checkpoint | None


@dataclass
class Outcome:
    run_dir: Path
    step: int  # the step the run reached (its last checkpoint)
    resumed_from: int  # 0 for a new run


def run_training(
    config: TrainingConfig,
    run_dir: Path,
    *,
    stage: int,
    fingerprint: str,
    build: Callable[[Session], Trainer],
    record: Callable[[Trainer], dict[str, Any]] = lambda trainer: {},
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
) -> Outcome:
    """Train (or continue) a run of ``stage`` in ``run_dir``: ``build`` makes the :class:`Trainer` (loading
    its models), ``record`` adds to ``config.json``; ``fingerprint`` identifies the data the run trains on.
    Settings, the data and anything else that can be checked cheaply must be checked before this is called.
    ``on_event`` receives, on rank 0, every record written to the log, and ``loaded`` and ``finished``."""
    check_output_dir(run_dir)
    world = join_world(resolve_device(config.device).type)
    try:
        return _run(config, run_dir, stage, fingerprint, build, record, world, resume,
                    on_event or (lambda event: None))
    finally:
        leave_world(world)


def _run(
    config: TrainingConfig, run_dir: Path, stage: int, fingerprint: str, build: Callable[[Session], Trainer],
    record: Callable[[Trainer], dict[str, Any]], world: World, resume: bool, emit: Callable[[Event], None],
) -> Outcome:
    device = resolve_run_device(config.device, world)
    resolve_precision(config.precision, device)
    global_batch = config.batch_size * world.size
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = checkpoint.state()
        if state["global_batch"] != global_batch:
            raise UserError(f"--resume: the run used a global batch of {state['global_batch']}, now it would be "
                            f"{global_batch} ({config.batch_size} × {world.size} processes); use the same")
        if state["data_fingerprint"] != fingerprint:
            raise UserError(f"--resume: the condition images in {config.data} are not those the run was trained on")
    trainer = build(Session(config, run_dir, world, device, checkpoint))
    start = 0
    if checkpoint is not None:
        trainer.load(checkpoint)
        start = checkpoint.step
    log = run_dir / LOG

    def write(event: Event) -> None:
        with log.open("a") as handle:
            handle.write(json.dumps(event) + "\n")
        emit(event)

    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(run_dir)
        write_json(run_dir / RUN_CONFIG, {"stage": stage, "config": config.to_dict(), "global_batch": global_batch,
                                          "processes": world.size, "data_fingerprint": fingerprint,
                                          **record(trainer), "versions": versions(device)})
        with atomic_path(run_dir / NOTICE) as tmp:
            tmp.write_text(LICENCE_NOTICES[stage])
        trim_log(log, start if checkpoint is not None else -1)  # from scratch: an earlier log is replaced
        emit({"event": "loaded", "step": start, "steps": trainer.steps, "processes": world.size})
    prepared = trainer.prepare(run_dir, emit)
    if world.main and prepared is not None:
        write({**prepared, "step": start})
    validator = trainer.validator() if world.main and config.validate_every and config.validation_images else None
    if validator is not None and start == 0:
        write(validator.run(0, run_dir))
    state = {"global_batch": global_batch, "data_fingerprint": fingerprint, "config": config.to_dict()}
    reached = start
    for step in range(start + 1, trainer.steps + 1):
        began = time.perf_counter()
        stats = trainer.mean_stats(trainer.train_step(step))
        if world.main:
            write({"event": "step", "step": step, **stats, "seconds": time.perf_counter() - began})
        if step % config.checkpoint_every == 0 or step == trainer.steps:
            ok, error = True, None
            if world.main:
                groups, params = trainer.state_groups()
                try:
                    saved = save_checkpoint(run_dir, step, groups, {**state, "optimizers": params},
                                            config.keep_checkpoints)
                    write({"event": "checkpoint", "step": step, "path": saved.path.relative_to(run_dir).as_posix()})
                except UserError as exc:
                    ok, error = False, exc
            if not all_agree(ok, world, device):
                raise error or UserError(f"rank 0 could not write the checkpoint of step {step}; see its message")
            reached = step
        if validator is not None and step % config.validate_every == 0:
            write(validator.run(step, run_dir))
    if world.main:
        emit({"event": "finished", "step": reached})
    return Outcome(run_dir, reached, start)
