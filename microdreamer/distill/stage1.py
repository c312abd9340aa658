"""Stage I of GECO: variational score distillation of Zero123++ v1.1 into a one-step generator (GECO §3.1, §4.1).

Three copies of the Zero123++ UNet: the frozen teacher, the one-step generator G
(:class:`~microdreamer.distill.onestep.OneStepGenerator`) and the online student, all initialised from the
published weights; Adam for G and the student. One training step, for a global batch of condition images:

1. generator update: x0 = G(z; y); x_t = √ᾱ_t·sg(x0) + √(1−ᾱ_t)·ε at t ~ U[t_min, t_max] per sample; the teacher
   (guided) and the student (unguided) predict ε at x_t; G descends Eq. 1 (:mod:`.vsd`);
2. student update, on the same (detached) x0 at a fresh t and ε: the denoising loss of Eq. 2.

So the two are updated alternately, each once per step (GECO: "updated alternately"). Both networks see
reference attention as Zero123++ does (the condition latent noised to t), G the clean latent. The run folder,
resume, checkpoints, processes and precision are the shared loop's (:mod:`.trainer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..generators.zero123plus import COLS, ROWS, Conditioning, Zero123PlusGenerator
from .config import Stage1Config
from .data import ConditionSet, load_conditions
from .denoiser import Denoiser, condition_batch
from .diffusion import alphas_at, noised, predicted_x0, timestep_range
from .distributed import World
from .onestep import OneStepGenerator
from .randomness import batch_items, sample_generator
from .runs import run_settings
from .trainer import Event, Outcome, Session, Trainer, run_training
from .validation import Validator
from .vsd import generator_surrogate, student_loss, vsd_direction, vsd_magnitude, vsd_weight


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


def latent_shape(model: Zero123PlusGenerator, view_size: int) -> tuple[int, int, int]:
    """The shape of one sample's model latents: a 3 × 2 grid of views of ``view_size`` pixels."""
    size = view_size // model.vae_factor
    return int(model.unet.config.out_channels), ROWS * size, COLS * size


def onestep_generator(model: Zero123PlusGenerator, timestep: int, guidance: float) -> OneStepGenerator:
    """A trainable one-step generator initialised from ``model``'s UNet."""
    return OneStepGenerator(Denoiser.copy_of(model, trainable=True), timestep, guidance)


class Stage1(Trainer):
    """The networks and optimisers of Stage I, and one training step."""

    STATS = ("generator_loss", "student_loss", "weight", "t_generator", "t_student")
    config: Stage1Config

    def __init__(self, model: Zero123PlusGenerator, config: Stage1Config, data: ConditionSet,
                 world: World = World()) -> None:
        super().__init__(config, world, model.device)
        self.model, self.data = model, data
        model.unet.float().eval().requires_grad_(False)
        self.teacher = Denoiser(model.unet, model.alphas_cumprod, model.prediction)
        self.generator = onestep_generator(model, config.generator_timestep, config.guidance_generator)
        self.student = Denoiser.copy_of(model, trainable=True)
        self.train("generator", self.generator.unet, config.lr_generator)
        self.train("student", self.student.unet, config.lr_student)
        self.t_range = timestep_range(config.t_min, config.t_max, model.alphas_cumprod.shape[0])
        self.latent_shape = latent_shape(model, config.view_size)

    # one step --------------------------------------------------------------------------------------------

    def batch(self, step: int) -> tuple[Conditioning, Draws]:
        """This process's slice of the global batch of ``step``: its conditioning and random numbers."""
        b = self.config.batch_size
        items = batch_items(self.config.seed, step, b * self.world.size, len(self.data))
        positions = range(self.world.rank * b, (self.world.rank + 1) * b)
        generators = [sample_generator(self.config.seed, step, p) for p in positions]
        conditioning = condition_batch(self.model, [self.data.image(items[p]) for p in positions], generators)
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
        config = self.config
        with self.precision():
            x0 = self.generator(draws.noise, conditioning)
        alpha = alphas_at(self.model.alphas_cumprod, draws.t_generator, x0)
        x_t = noised(x0.detach(), draws.eps_generator, alpha)
        t, reference = draws.t_generator, draws.reference_generator
        with torch.no_grad(), self.precision():
            eps_teacher = self.teacher.predicted_noise(x_t, t, conditioning, reference, config.guidance_teacher)
            eps_student = self.student.predicted_noise(x_t, t, conditioning, reference, config.guidance_student)
        x0_teacher = predicted_x0(eps_teacher, x_t, alpha, "epsilon")
        weight = vsd_weight(config.weighting, alpha, x0, x0_teacher)
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

    def train_step(self, step: int) -> dict[str, Tensor]:
        """A generator update, then a student update."""
        conditioning, draws = self.batch(step)
        stats, x0 = self.generator_backward(conditioning, draws)
        self.update("generator")
        stats.update(self.student_backward(conditioning, draws, x0))
        self.update("student")
        return stats

    def validator(self) -> Validator:
        config = self.config
        return Validator(self.model, self.generator, self.data, images=config.validation_images,
                         teacher_steps=config.validation_steps, guidance=config.guidance_teacher,
                         view_size=config.view_size, seed=config.seed, precision=self.precision)


def stage1_config(run_dir: str | Path, settings: dict[str, Any], resume: bool) -> Stage1Config:
    """The settings of a Stage I run (see :func:`~microdreamer.distill.runs.run_settings`)."""
    return run_settings(Stage1Config, run_dir, settings, resume, stage=1)  # type: ignore[return-value]


def run_stage1(
    config: Stage1Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
    model: Zero123PlusGenerator | None = None,
) -> Outcome:
    """Train (or continue) a Stage I run in ``run_dir`` up to ``config.steps``. Bad settings and a bad data
    folder are refused before any model is loaded; ``model`` replaces loading ``config.model``."""
    config.validate()
    data = load_conditions(config.data)

    def build(session: Session) -> Stage1:
        loaded = model or Zero123PlusGenerator.from_pretrained(config.model, device=session.device, dtype="fp32",
                                                              allow_download=config.allow_download)
        if config.view_size % loaded.vae_factor:
            raise UserError(f"--view-size must be a multiple of {loaded.vae_factor}, got {config.view_size}")
        return Stage1(loaded, config, data, session.world)

    return run_training(config, Path(run_dir).expanduser(), stage=1, fingerprint=data.fingerprint, build=build,
                        resume=resume, on_event=on_event)
