"""Settings of the distillation runs (GECO §4.1 where the paper gives them; our choices elsewhere, marked).

:class:`TrainingConfig` holds what every run has (data, steps, batch, seed, checkpoints, validation, device);
:class:`Stage1Config` and :class:`Stage2Config` add each stage's own settings. A resumed run keeps its
settings; only those in ``ADJUSTABLE`` (which do not change its numbers) may be given again with other values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import UserError
from .onestep import DEFAULT_TIMESTEP
from .vsd import WEIGHTINGS

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: settings of every run that a resumed run may change
_ADJUSTABLE: tuple[str, ...] = (
    "data", "steps", "device", "checkpoint_every", "keep_checkpoints", "validate_every", "validation_images",
    "allow_download",
)


@dataclass
class TrainingConfig:
    """What every distillation run has. Subclasses add their settings (all with defaults)."""

    data: str  # a folder written by `microdreamer distill prepare`
    steps: int = 5000  # GECO Stage I: 5,000 steps
    batch_size: int = 1  # per process; the global batch is this × the number of processes (ours)
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.999)  # GECO: Adam betas (0.9, 0.999)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    device: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 1  # complete checkpoints kept (the newest ones)
    validate_every: int = 500  # 0: never
    validation_images: int = 4  # the first items of the data set
    allow_download: bool = True

    #: settings a resumed run may change; the others fix the run's numbers
    ADJUSTABLE: ClassVar[tuple[str, ...]] = _ADJUSTABLE

    def validate(self) -> "TrainingConfig":
        """Refuse impossible settings in one line (before anything is loaded)."""
        at_least_one = {"--steps": self.steps, "--batch-size": self.batch_size,
                        "--checkpoint-every": self.checkpoint_every, "--keep-checkpoints": self.keep_checkpoints,
                        **self._at_least_one()}
        for option, value in at_least_one.items():
            if value < 1:
                raise UserError(f"{option} must be at least 1, got {value}")
        not_negative = {"--validate-every": self.validate_every, "--validation-images": self.validation_images,
                        **self._not_negative()}
        for option, value in not_negative.items():
            if value < 0:
                raise UserError(f"{option} must not be negative, got {value}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"Adam's betas must lie in [0, 1), got {tuple(self.betas)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision {self.precision!r} (use {', '.join(PRECISIONS)})")
        return self

    def _at_least_one(self) -> dict[str, float]:
        return {}

    def _not_negative(self) -> dict[str, float]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown distillation settings {', '.join(unknown)}; is this a run of another version?")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    def resumed_with(self, changes: dict[str, Any]) -> "TrainingConfig":
        """This run's settings with ``changes`` (settings given again on resuming); a change to a setting
        that fixes the run's numbers is refused in one line."""
        fixed = {k: v for k, v in changes.items() if k not in self.ADJUSTABLE and v != getattr(self, k)}
        if fixed:
            listed = ", ".join(f"{k} {getattr(self, k)!r} → {v!r}" for k, v in sorted(fixed.items()))
            raise UserError(f"--resume continues the run with its own settings; these differ: {listed} "
                            "(start a new run in another --out to change them)")
        return dataclasses.replace(self, **changes)


def _check_guidance(guidance: dict[str, float]) -> None:
    for option, value in guidance.items():
        if value < 1.0:
            raise UserError(f"{option} must be at least 1 (1: no guidance), got {value}")


@dataclass
class Stage1Config(TrainingConfig):
    """Stage I: VSD of Zero123++ v1.1 into a one-step generator."""

    model: str | None = None  # Zero123++ v1.1 folder or Hugging Face id; None: the catalog's
    lr_generator: float = 1e-6  # GECO: Adam, lr 1e-6 for both
    lr_student: float = 1e-6
    t_min: float = 0.02  # GECO: t ~ U[0.02, 0.98]
    t_max: float = 0.98
    generator_timestep: int = DEFAULT_TIMESTEP  # ours: t* of the one-step generator
    guidance_teacher: float = 4.0  # GECO: 4 for the teacher and the generator, 1 for the student
    guidance_generator: float = 4.0
    guidance_student: float = 1.0
    weighting: str = "dmd"  # ours: w(t), see distill/vsd.py
    view_size: int = 320  # pixels per view of the 3 × 2 grid (Zero123++: 320)
    validation_steps: int = 75  # the teacher's sampling steps for the validation reference

    ADJUSTABLE: ClassVar[tuple[str, ...]] = (*_ADJUSTABLE, "validation_steps")

    def _at_least_one(self) -> dict[str, float]:
        return {"--view-size": self.view_size, "--validation-steps": self.validation_steps}

    def _not_negative(self) -> dict[str, float]:
        return {"--lr-generator": self.lr_generator, "--lr-student": self.lr_student}

    def validate(self) -> "Stage1Config":
        super().validate()
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise UserError(f"the timestep range must satisfy 0 <= t-min < t-max <= 1, got {self.t_min}..{self.t_max}")
        _check_guidance({"--guidance-teacher": self.guidance_teacher, "--guidance-generator": self.guidance_generator,
                         "--guidance-student": self.guidance_student})
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"unknown --weighting {self.weighting!r} (use {', '.join(WEIGHTINGS)})")
        if not 0 <= self.generator_timestep <= 999:
            raise UserError(f"--generator-timestep must lie in 0..999, got {self.generator_timestep}")
        return self


#: how the generator's views reach LGM (Stage II): kept on Zero123++'s gray, or moved onto LGM's white
BACKGROUNDS: tuple[str, ...] = ("white", "gray")
#: Zero123++ v1.1 paints six views
GENERATOR_VIEWS = 6


@dataclass
class Stage2Config(TrainingConfig):
    """Stage II: joint fine-tuning of the one-step generator and LGM on pseudo ground truth (GECO §3.2)."""

    steps: int = 0  # 0: ``epochs`` passes over the pseudo-ground-truth samples (GECO: 10 epochs)
    epochs: int = 10
    model: str | None = None  # the Stage I run folder (its newest checkpoint's generator)
    teacher: str | None = None  # Zero123++ v1.1 of the pseudo ground truth; None: the Stage I run's model
    reconstructor: str | None = None  # LGM weights (Hugging Face id, folder or file); None: ashawkey/LGM
    pseudo_gt: str | None = None  # the pseudo-ground-truth cache; None: RUN_DIR/pseudo_gt
    lr_generator: float = 1e-6  # GECO: lr 1e-6
    lr_reconstructor: float = 1e-6
    lambda_lpips: float = 1.0  # ours: λ of Eq. 3 (LGM's own λ_lpips); 0: MSE alone, no LPIPS weights needed
    lpips_vgg: str | None = None  # torchvision's vgg16-397923af.pth
    lpips_heads: str | None = None  # lpips' v0.1 vgg.pth
    teacher_steps: int = 75  # GECO: deterministic 75-step sampling
    teacher_guidance: float = 4.0  # ours: Zero123++'s default guidance
    samples_per_image: int = 1  # noise draws z per condition image (each its own pseudo ground truth)
    poses: int = 50  # GECO: 50 random viewpoints per sample
    pose_elevations: tuple[float, float] = (-30.0, 20.0)  # ours: the span of Zero123++'s views (negative = above)
    fovy: float = 30.0  # ours: Zero123++ v1.1's field of view (not published; v1.2's), of inputs and renders
    lgm_views: tuple[int, ...] = (0, 1, 3, 4)  # ours: the Zero123++ views LGM sees (all six: 0,1,2,3,4,5)
    background: str = "white"  # ours: the views moved onto LGM's white (and renders on white), or gray
    render_views: int = 8  # ours: of a sample's poses, rendered per step (LGM trains on 8 views)
    render_size: int = 256  # ours: render side in pixels (LGM's LPIPS runs at 256²)
    renderer: str = "auto"  # the Gaussian rasterizer backend
    validation_views: int = 4  # poses rendered per validation sample (its first ones)

    ADJUSTABLE: ClassVar[tuple[str, ...]] = (
        *_ADJUSTABLE, "epochs", "model", "teacher", "reconstructor", "pseudo_gt", "lpips_vgg", "lpips_heads",
        "renderer", "validation_views",
    )

    def _at_least_one(self) -> dict[str, float]:
        return {"--epochs": self.epochs, "--teacher-steps": self.teacher_steps,
                "--samples-per-image": self.samples_per_image, "--poses": self.poses,
                "--render-views": self.render_views, "--render-size": self.render_size,
                "--validation-views": self.validation_views,
                "--steps": self.steps or 1}  # 0 is allowed: --epochs passes

    def _not_negative(self) -> dict[str, float]:
        return {"--lr-generator": self.lr_generator, "--lr-reconstructor": self.lr_reconstructor,
                "--lambda-lpips": self.lambda_lpips}

    def validate(self) -> "Stage2Config":
        super().validate()
        if self.model is None:
            raise UserError("give the Stage I run to fine-tune with --model RUN_DIR (the --out of `distill stage1`)")
        _check_guidance({"--teacher-guidance": self.teacher_guidance})
        if self.render_views > self.poses:
            raise UserError(f"--render-views {self.render_views} exceeds the {self.poses} poses of each sample")
        views = list(self.lgm_views)
        if not views or len(set(views)) != len(views) or not all(0 <= v < GENERATOR_VIEWS for v in views):
            raise UserError(f"--lgm-views must name distinct views among 0..{GENERATOR_VIEWS - 1}, got {views}")
        low, high = self.pose_elevations
        if not -90.0 < low <= high < 90.0:
            raise UserError(f"--pose-elevations must satisfy -90 < low <= high < 90, got {low}..{high}")
        if not 0.0 < self.fovy < 180.0:
            raise UserError(f"--fovy must lie between 0 and 180 degrees, got {self.fovy}")
        if self.background not in BACKGROUNDS:
            raise UserError(f"unknown --background {self.background!r} (use {', '.join(BACKGROUNDS)})")
        if self.render_size < 16 and self.lambda_lpips > 0:
            raise UserError(f"LPIPS needs renders of at least 16² pixels, got --render-size {self.render_size}")
        return self
