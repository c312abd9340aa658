"""Stage I of GECO: variational score distillation of Zero123++ v1.1 into a one-step generator (GECO §3.1, §4.1).

Three copies of the Zero123++ UNet: the frozen teacher, the one-step generator G
(:class:`~microdreamer.distill.onestep.OneStepGenerator`) and the online student, all initialised from the
published weights; Adam for G and the student. One training step, for a global batch of condition images:

1. generator update: x0 = G(z; y); x_t = √ᾱ_t·sg(x0) + √(1−ᾱ_t)·ε at t ~ U[t_min, t_max] per sample; the teacher
   (guided) and the student (unguided) predict ε at x_t; G descends Eq. 1 (:mod:`.vsd`);
2. student update, on the same (detached) x0 at a fresh t and ε: the denoising loss of Eq. 2.

So the two are updated alternately, each once per step (GECO: "updated alternately"). Both networks see
reference attention as Zero123++ does (the condition latent noised to t), G the clean latent.

A run is a folder: ``config.json`` (settings), ``NOTICE.txt`` (the licence the weights inherit),
``log.jsonl`` (one JSON record per step, checkpoint and validation), ``checkpoints/`` (:mod:`.checkpoints`)
and ``validation/`` (:mod:`.validation`). Runs resume exactly: every random number of a step is keyed by
(seed, step, sample) (:mod:`.randomness`) and checkpoints hold all weights and optimiser state, so a run
stopped and resumed ends with the same bytes as one that never stopped. Under ``torchrun`` each process
takes a contiguous slice of the global batch and gradients are averaged (:mod:`.distributed`); on CUDA the
networks run under bf16 autocast with float32 weights and optimiser state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..generators.zero123plus import COLS, ROWS, Conditioning, Zero123PlusGenerator
from ..io.atomic import atomic_path, check_output_dir
from ..pipeline import resolve_device, versions
from .checkpoints import (
    Checkpoint,
    latest_checkpoint,
    load_optimizer,
    optimizer_tensors,
    remove_partial,
    save_checkpoint,
)
from .config import DistillConfig
from .data import ConditionSet, load_conditions
from .denoiser import Denoiser, condition_batch
from .diffusion import alphas_at, noised, predicted_x0, timestep_range
from .distributed import World, all_agree, average_gradients, join_world, leave_world, mean_over_world
from .onestep import OneStepGenerator
from .randomness import batch_items, sample_generator
from .validation import Validator
from .vsd import generator_surrogate, student_loss, vsd_direction, vsd_magnitude, vsd_weight

RUN_CONFIG = "config.json"
LOG = "log.jsonl"
NOTICE = "NOTICE.txt"
#: what a run folder says about its weights (Zero123++ v1.1's weights are CC-BY-NC 4.0)
LICENCE_NOTICE = (
    "The generator and student weights in this folder were distilled from Zero123++ v1.1 "
    "(sudo-ai/zero123plus-v1.1) and inherit its weights' licence, CC-BY-NC 4.0: non-commercial use only, "
    "with attribution. See https://creativecommons.org/licenses/by-nc/4.0/ and the Zero123++ README.\n"
)
#: stats of a step, in the order they are averaged over the processes
STATS = ("generator_loss", "student_loss", "weight", "t_generator", "t_student")

Event = dict[str, Any]


@dataclass
class Draws:
    """The random numbers of one step for B samples (rows of reference noise: [uncond × B ; cond × B])."""

    noise: Tensor  # z of the generator
    t_generator: Tensor  # [B]
    eps_generator: Tensor
    reference_generator: Tensor  # [2B, …] reference noise of the teacher's and student's predictions
    t_student: Tensor
    eps_student: Tensor
    reference_student: Tensor


class Stage1:
    """The networks and optimisers of Stage I, and one training step."""

    def __init__(self, model: Zero123PlusGenerator, config: DistillConfig, world: World = World()) -> None:
        self.model, self.config, self.world = model, config, world
        self.device = model.device
        model.unet.float().eval().requires_grad_(False)
        self.teacher = Denoiser(model.unet, model.alphas_cumprod, model.prediction)
        self.generator = OneStepGenerator(Denoiser.copy_of(model, trainable=True), config.generator_timestep,
                                          config.guidance_generator)
        self.student = Denoiser.copy_of(model, trainable=True)
        self.optimizers = {
            "generator": torch.optim.Adam(self.generator.unet.parameters(), lr=config.lr_generator, betas=config.betas),
            "student": torch.optim.Adam(self.student.unet.parameters(), lr=config.lr_student, betas=config.betas),
        }
        self.t_range = timestep_range(config.t_min, config.t_max, model.alphas_cumprod.shape[0])
        size = config.view_size // model.vae_factor
        self.latent_shape = (int(model.unet.config.out_channels), ROWS * size, COLS * size)
        self.bf16 = resolve_precision(config.precision, self.device) == "bf16"

    def precision(self) -> AbstractContextManager[Any]:
        """bf16 autocast on CUDA when asked for, else nothing."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    @property
    def networks(self) -> dict[str, Denoiser]:
        return {"generator": self.generator, "student": self.student}

    # one step --------------------------------------------------------------------------------------------

    def batch(self, step: int, data: ConditionSet) -> tuple[Conditioning, Draws]:
        """This process's slice of the global batch of ``step``: its conditioning and random numbers."""
        b = self.config.batch_size
        items = batch_items(self.config.seed, step, b * self.world.size, len(data))
        positions = range(self.world.rank * b, (self.world.rank + 1) * b)
        generators = [sample_generator(self.config.seed, step, p) for p in positions]
        conditioning = condition_batch(self.model, [data.image(items[p]) for p in positions], generators)
        return conditioning, self.draws(generators, tuple(conditioning.reference.shape[1:]))

    def draws(self, generators: list[torch.Generator], reference_shape: tuple[int, ...]) -> Draws:
        """Each sample's numbers from its own generator, after its conditioning draws, in a fixed order."""
        lo, hi = self.t_range
        columns: dict[str, list[Tensor]] = {k: [] for k in ("z", "tg", "eg", "rg", "ts", "es", "rs")}
        for g in generators:
            for key in columns:
                if key.startswith("t"):
                    columns[key].append(torch.randint(lo, hi + 1, (1,), generator=g))
                else:
                    shape = (2, *reference_shape) if key.startswith("r") else self.latent_shape
                    columns[key].append(torch.randn(shape, generator=g))
        stack = lambda k: torch.stack(columns[k]).to(self.device)  # noqa: E731
        rows = lambda k: torch.cat([stack(k)[:, 0], stack(k)[:, 1]])  # noqa: E731  [uncond × B ; cond × B]
        return Draws(stack("z"), torch.cat(columns["tg"]), stack("eg"), rows("rg"),
                     torch.cat(columns["ts"]), stack("es"), rows("rs"))

    def generator_backward(self, conditioning: Conditioning, draws: Draws) -> tuple[dict[str, Tensor], Tensor]:
        """Accumulate G's gradient of Eq. 1 for this batch; returns the stats and the (detached) samples x0."""
        with self.precision():
            x0 = self.generator(draws.noise, conditioning)
        alpha = alphas_at(self.model.alphas_cumprod, draws.t_generator, x0)
        x_t = noised(x0.detach(), draws.eps_generator, alpha)
        t, reference = draws.t_generator, draws.reference_generator
        with torch.no_grad(), self.precision():
            eps_teacher = self.teacher.predicted_noise(x_t, t, conditioning, reference, self.config.guidance_teacher)
            eps_student = self.student.predicted_noise(x_t, t, conditioning, reference, self.config.guidance_student)
        x0_teacher = predicted_x0(eps_teacher, x_t, alpha, "epsilon")
        weight = vsd_weight(self.config.weighting, alpha, x0, x0_teacher)
        direction = vsd_direction(weight, eps_teacher, eps_student)
        generator_surrogate(x0, direction).backward()
        stats = {"generator_loss": vsd_magnitude(direction), "weight": weight.mean(), "t_generator": t.float().mean()}
        return stats, x0.detach()

    def student_objective(self, conditioning: Conditioning, draws: Draws, x0: Tensor) -> Tensor:
        """The student's denoising loss (Eq. 2) on the generator's samples ``x0``."""
        alpha = alphas_at(self.model.alphas_cumprod, draws.t_student, x0)
        x_t = noised(x0, draws.eps_student, alpha)
        with self.precision():
            eps = self.student.predicted_noise(x_t, draws.t_student, conditioning, draws.reference_student,
                                               self.config.guidance_student)
        return student_loss(eps, draws.eps_student)

    def student_backward(self, conditioning: Conditioning, draws: Draws, x0: Tensor) -> dict[str, Tensor]:
        """Accumulate the student's gradient of Eq. 2 on the generator's samples ``x0``."""
        loss = self.student_objective(conditioning, draws, x0)
        loss.backward()
        return {"student_loss": loss.detach(), "t_student": draws.t_student.float().mean()}

    def _update(self, name: str) -> None:
        network = self.networks[name]
        average_gradients(network.unet.parameters(), self.world)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def train_step(self, step: int, data: ConditionSet) -> dict[str, float]:
        """Step ``step`` (1-based): a generator update, then a student update; the stats are means over the
        global batch."""
        conditioning, draws = self.batch(step, data)
        stats, x0 = self.generator_backward(conditioning, draws)
        self._update("generator")
        stats.update(self.student_backward(conditioning, draws, x0))
        self._update("student")
        values = mean_over_world(torch.stack([stats[k].float().to(self.device) for k in STATS]), self.world)
        return dict(zip(STATS, values.tolist()))

    # checkpoints -------------------------------------------------------------------------------------------

    def state_groups(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, list[dict]]]:
        """The tensors to checkpoint (weights and optimiser state of G and the student) and the optimisers'
        parameter groups."""
        groups, params = {}, {}
        for name, network in self.networks.items():
            groups[name] = network.unet.state_dict()
            names = [n for n, _ in network.unet.named_parameters()]
            groups[f"optimizer_{name}"], params[name] = optimizer_tensors(self.optimizers[name], names)
        return groups, params

    def load(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state()
        for name, network in self.networks.items():
            network.unet.load_state_dict(checkpoint.tensors(name), strict=True)
            names = [n for n, _ in network.unet.named_parameters()]
            load_optimizer(self.optimizers[name], checkpoint.tensors(f"optimizer_{name}"),
                           state["optimizers"][name], names)


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


# the run folder ------------------------------------------------------------------------------------------


def stage1_config(run_dir: str | Path, settings: dict[str, Any], resume: bool) -> DistillConfig:
    """The settings of a run: ``settings`` over the defaults for a new run; with ``resume`` the run's own
    settings, of which ``settings`` may change only those that do not alter its numbers."""
    run_dir = Path(run_dir).expanduser()
    stored = run_dir / RUN_CONFIG
    if not resume:
        if stored.exists():
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        if settings.get("data") is None:
            raise UserError("give the condition images with --data DIR (made by `microdreamer distill prepare`)")
        return DistillConfig(**settings).validate()
    if not stored.is_file():
        raise UserError(f"--resume: {run_dir} holds no run ({RUN_CONFIG} is missing); start one without --resume")
    try:
        record = json.loads(stored.read_text())
        config = DistillConfig.from_dict(record["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume: {stored} cannot be read ({exc}); start a new run in another --out") from None
    return config.resumed_with({k: v for k, v in settings.items() if v is not None}).validate()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def _trim_log(path: Path, step: int) -> None:
    """Keep the log records up to ``step`` (those after it are made again by the resumed run; −1 keeps none)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut off by a crash
        if record.get("step", 0) <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


@dataclass
class Stage1Outcome:
    run_dir: Path
    step: int  # the step the run reached (its last checkpoint)
    resumed_from: int  # 0 for a new run


def run_stage1(
    config: DistillConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
    model: Zero123PlusGenerator | None = None,
) -> Stage1Outcome:
    """Train (or continue) a Stage I run in ``run_dir`` up to ``config.steps``. Bad settings and a bad data
    folder are refused before any model is loaded. ``on_event`` receives, on rank 0, every record written to
    the log, and ``loaded`` and ``finished`` events; ``model`` replaces loading ``config.model``."""
    config.validate()
    run_dir = Path(run_dir).expanduser()
    check_output_dir(run_dir)
    data = load_conditions(config.data)
    world = join_world(resolve_device(config.device).type)
    try:
        return _run(config, run_dir, data, world, resume, on_event or (lambda event: None), model)
    finally:
        leave_world(world)


def _run(
    config: DistillConfig, run_dir: Path, data: ConditionSet, world: World, resume: bool,
    emit: Callable[[Event], None], model: Zero123PlusGenerator | None,
) -> Stage1Outcome:
    device = resolve_run_device(config.device, world)
    resolve_precision(config.precision, device)
    global_batch = config.batch_size * world.size
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = checkpoint.state()
        if state["global_batch"] != global_batch:
            raise UserError(f"--resume: the run used a global batch of {state['global_batch']}, now it would be "
                            f"{global_batch} ({config.batch_size} × {world.size} processes); use the same")
        if state["data_fingerprint"] != data.fingerprint:
            raise UserError(f"--resume: the condition images in {config.data} are not those the run was trained on")
    if model is None:
        model = Zero123PlusGenerator.from_pretrained(config.model, device=device, dtype="fp32",
                                                     allow_download=config.allow_download)
    if config.view_size % model.vae_factor:
        raise UserError(f"--view-size must be a multiple of {model.vae_factor}, got {config.view_size}")
    stage = Stage1(model, config, world)
    start = 0
    if checkpoint is not None:
        stage.load(checkpoint)
        start = checkpoint.step
    log = run_dir / LOG
    record = {"config": config.to_dict(), "global_batch": global_batch, "processes": world.size,
              "data_fingerprint": data.fingerprint, "versions": versions(device)}
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(run_dir)
        _write_json(run_dir / RUN_CONFIG, record)
        with atomic_path(run_dir / NOTICE) as tmp:
            tmp.write_text(LICENCE_NOTICE)
        _trim_log(log, start if checkpoint is not None else -1)  # from scratch: an earlier log is replaced
        emit({"event": "loaded", "step": start, "steps": config.steps, "processes": world.size})
    validator = None
    if world.main and config.validate_every and config.validation_images:
        validator = Validator(model, stage.generator, data, images=config.validation_images,
                              teacher_steps=config.validation_steps, guidance=config.guidance_teacher,
                              view_size=config.view_size, seed=config.seed, precision=stage.precision)

    def write(event: Event) -> None:
        with log.open("a") as handle:
            handle.write(json.dumps(event) + "\n")
        emit(event)

    if validator is not None and start == 0:
        write(validator.run(0, run_dir))
    state = {"global_batch": global_batch, "data_fingerprint": data.fingerprint, "config": config.to_dict()}
    reached = start
    for step in range(start + 1, config.steps + 1):
        began = time.perf_counter()
        stats = stage.train_step(step, data)
        if world.main:
            write({"event": "step", "step": step, **stats, "seconds": time.perf_counter() - began})
        if step % config.checkpoint_every == 0 or step == config.steps:
            ok, error = True, None
            if world.main:
                groups, params = stage.state_groups()
                try:
                    saved = save_checkpoint(run_dir, step, groups, {**state, "optimizers": params},
                                            config.keep_checkpoints)
                    write({"event": "checkpoint", "step": step, "path": saved.path.relative_to(run_dir).as_posix()})
                except UserError as exc:
                    ok, error = False, exc
            if not all_agree(ok, world, device):
                raise error or UserError(f"rank 0 could not write the checkpoint of step {step}; see its message")
            reached = step
        if validator is not None and config.validate_every and step % config.validate_every == 0:
            write(validator.run(step, run_dir))
    if world.main:
        emit({"event": "finished", "step": reached})
    return Stage1Outcome(run_dir, reached, start)
