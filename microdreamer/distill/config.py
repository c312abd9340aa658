"""Settings of a Stage I distillation run (GECO §4.1 where the paper gives them; our choices elsewhere, marked)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .onestep import DEFAULT_TIMESTEP
from .vsd import WEIGHTINGS

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: settings a resumed run may change; the others fix the run's numbers
ADJUSTABLE: tuple[str, ...] = (
    "data", "steps", "device", "checkpoint_every", "keep_checkpoints", "validate_every", "validation_images",
    "validation_steps", "allow_download",
)


@dataclass
class DistillConfig:
    data: str  # a folder written by `microdreamer distill prepare`
    model: str | None = None  # Zero123++ v1.1 folder or Hugging Face id; None: the catalog's
    steps: int = 5000  # GECO: 5,000 steps
    batch_size: int = 1  # per process; the global batch is this × the number of processes (ours)
    seed: int = 0
    lr_generator: float = 1e-6  # GECO: Adam, lr 1e-6, betas (0.9, 0.999), for both
    lr_student: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    t_min: float = 0.02  # GECO: t ~ U[0.02, 0.98]
    t_max: float = 0.98
    generator_timestep: int = DEFAULT_TIMESTEP  # ours: t* of the one-step generator
    guidance_teacher: float = 4.0  # GECO: 4 for the teacher and the generator, 1 for the student
    guidance_generator: float = 4.0
    guidance_student: float = 1.0
    weighting: str = "dmd"  # ours: w(t), see distill/vsd.py
    view_size: int = 320  # pixels per view of the 3 × 2 grid (Zero123++: 320)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    device: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 1  # complete checkpoints kept (the newest ones)
    validate_every: int = 500  # 0: never
    validation_images: int = 4  # the first items of the data set
    validation_steps: int = 75  # the teacher's sampling steps for the validation reference
    allow_download: bool = True

    def validate(self) -> "DistillConfig":
        """Refuse impossible settings in one line (before anything is loaded)."""
        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--checkpoint-every": self.checkpoint_every,
                    "--keep-checkpoints": self.keep_checkpoints, "--view-size": self.view_size,
                    "--validation-steps": self.validation_steps}
        for option, value in positive.items():
            if value < 1:
                raise UserError(f"{option} must be at least 1, got {value}")
        for option, value in {"--validate-every": self.validate_every, "--validation-images": self.validation_images,
                              "--lr-generator": self.lr_generator, "--lr-student": self.lr_student}.items():
            if value < 0:
                raise UserError(f"{option} must not be negative, got {value}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise UserError(f"the timestep range must satisfy 0 <= t-min < t-max <= 1, got {self.t_min}..{self.t_max}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"Adam's betas must lie in [0, 1), got {tuple(self.betas)}")
        guidance = {"--guidance-teacher": self.guidance_teacher, "--guidance-generator": self.guidance_generator,
                    "--guidance-student": self.guidance_student}
        for option, value in guidance.items():
            if value < 1.0:
                raise UserError(f"{option} must be at least 1 (1: no guidance), got {value}")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"unknown --weighting {self.weighting!r} (use {', '.join(WEIGHTINGS)})")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision {self.precision!r} (use {', '.join(PRECISIONS)})")
        if not 0 <= self.generator_timestep <= 999:
            raise UserError(f"--generator-timestep must lie in 0..999, got {self.generator_timestep}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistillConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown distillation settings {', '.join(unknown)}; is this a run of another version?")
        values = dict(data)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def resumed_with(self, changes: dict[str, Any]) -> "DistillConfig":
        """This run's settings with ``changes`` (settings given again on resuming); a change to a setting
        that fixes the run's numbers is refused in one line."""
        fixed = {k: v for k, v in changes.items() if k not in ADJUSTABLE and v != getattr(self, k)}
        if fixed:
            listed = ", ".join(f"{k} {getattr(self, k)!r} → {v!r}" for k, v in sorted(fixed.items()))
            raise UserError(f"--resume continues the run with its own settings; these differ: {listed} "
                            "(start a new run in another --out to change them)")
        return dataclasses.replace(self, **changes)
