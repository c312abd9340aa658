"""The run folder of a distillation stage, and reading a finished run back.

Every run folder holds ``config.json`` (the settings under ``config``, the stage, the global batch, the data's
fingerprint, versions; Stage II adds the ``generator`` it fine-tunes and the ``reconstructor``),
``NOTICE.txt`` (the licence the weights inherit), ``log.jsonl`` (one JSON record per step, checkpoint and
validation), ``checkpoints/step-XXXXXXXX/`` (:mod:`.checkpoints`) and ``validation/``.

:func:`open_run` reads a run for inference or for the next stage: the one-step generator's settings
(:class:`GeneratorSpec`), the fine-tuned LGM's (:class:`ReconstructorSpec`, Stage II only) and the newest
complete checkpoint, whose ``generator.safetensors`` holds G's UNet weights (diffusers names) and, for
Stage II, ``reconstructor.safetensors`` LGM's weights (the published names).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io.atomic import atomic_path
from ..reconstructors.lgm_unet import LGMConfig
from .checkpoints import Checkpoint, latest_checkpoint
from .config import TrainingConfig

RUN_CONFIG = "config.json"
LOG = "log.jsonl"
NOTICE = "NOTICE.txt"
_ZERO123PLUS_LICENCE = (
    "The generator and student weights in this folder were distilled from Zero123++ v1.1 "
    "(sudo-ai/zero123plus-v1.1) and inherit its weights' licence, CC-BY-NC 4.0: non-commercial use only, "
    "with attribution. See https://creativecommons.org/licenses/by-nc/4.0/ and the Zero123++ README.\n"
)
#: what a run folder says about its weights (Zero123++ v1.1's weights are CC-BY-NC 4.0), per stage
LICENCE_NOTICES = {
    1: _ZERO123PLUS_LICENCE,
    2: _ZERO123PLUS_LICENCE
    + "The reconstructor weights were fine-tuned from LGM (ashawkey/LGM) and keep the licence of those weights: "
    "see the model card at https://huggingface.co/ashawkey/LGM (the LGM code is MIT).\n",
}
#: what commands that train or run distilled weights say about them, in one line
LICENCE_LINE = "the weights are for non-commercial use only (CC-BY-NC 4.0, from Zero123++)"


def run_settings(cls: type[TrainingConfig], run_dir: str | Path, settings: dict[str, Any], resume: bool,
                 stage: int) -> TrainingConfig:
    """The settings of a run: ``settings`` over the defaults of ``cls`` for a new run; with ``resume`` the
    run's own settings, of which ``settings`` may change only those that do not alter its numbers."""
    run_dir = Path(run_dir).expanduser()
    stored = run_dir / RUN_CONFIG
    if not resume:
        if stored.exists():
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        if settings.get("data") is None:
            raise UserError("give the condition images with --data DIR (made by `microdreamer distill prepare`)")
        return cls(**settings).validate()
    if not stored.is_file():
        raise UserError(f"--resume: {run_dir} holds no run ({RUN_CONFIG} is missing); start one without --resume")
    record = read_record(run_dir, "--resume")
    if record.get("stage", 1) != stage:
        raise UserError(f"--resume: {run_dir} holds a Stage {record.get('stage', 1)} run, not Stage {stage}")
    try:
        config = cls.from_dict(record["config"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"--resume: {stored} cannot be read ({exc}); start a new run in another --out") from None
    return config.resumed_with({k: v for k, v in settings.items() if v is not None}).validate()


def read_record(run_dir: Path, what: str) -> dict[str, Any]:
    """A run's ``config.json`` (``what`` names the option that pointed at it, for the message)."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: {path} cannot be read ({exc}); is it a run of `microdreamer distill`?") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise UserError(f"{what}: {path} is not the settings of a distillation run")
    return record


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def trim_log(path: Path, step: int) -> None:
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


# reading a finished run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorSpec:
    """How to rebuild the one-step generator of a run: on the Zero123++ ``model`` (None: the catalog's), at
    timestep ``timestep`` with guidance ``guidance``, making views of ``view_size`` pixels."""

    model: str | None
    timestep: int
    guidance: float
    view_size: int

    @classmethod
    def of_stage1(cls, config: dict[str, Any]) -> "GeneratorSpec":
        return cls(config["model"], int(config["generator_timestep"]), float(config["guidance_generator"]),
                   int(config["view_size"]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReconstructorSpec:
    """How the fine-tuned LGM of a Stage II run is built and fed: its network shape, which of the generator's
    six views it sees (``views``), on which background, with which field of view for their Plücker rays."""

    network: LGMConfig
    views: tuple[int, ...]
    background: str
    fovy: float

    def to_dict(self) -> dict[str, Any]:
        return {"network": asdict(self.network), "views": list(self.views), "background": self.background,
                "fovy": self.fovy}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReconstructorSpec":
        network = LGMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["network"].items()})
        return cls(network, tuple(data["views"]), str(data["background"]), float(data["fovy"]))


@dataclass(frozen=True)
class DistilledRun:
    """A run read back: its stage, settings record, generator, reconstructor (Stage II) and newest checkpoint."""

    path: Path
    stage: int
    record: dict[str, Any]
    generator: GeneratorSpec
    reconstructor: ReconstructorSpec | None
    checkpoint: Checkpoint


def open_run(run_dir: str | Path, what: str = "--model") -> DistilledRun:
    """Read a Stage I or II run folder and find its newest complete checkpoint; everything wrong is one line."""
    path = Path(run_dir).expanduser()
    if not (path / RUN_CONFIG).is_file():
        raise UserError(f"{what} {path} is not a run folder of `microdreamer distill` ({RUN_CONFIG} is missing)")
    record = read_record(path, what)
    stage = int(record.get("stage", 1))
    try:
        generator = GeneratorSpec.of_stage1(record["config"]) if stage == 1 else GeneratorSpec(**record["generator"])
        reconstructor = ReconstructorSpec.from_dict(record["reconstructor"]) if stage == 2 else None
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{what}: {path / RUN_CONFIG} lacks the generator's settings ({exc})") from None
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise UserError(f"{what} {path} has no complete checkpoint yet; train it further (--resume)")
    return DistilledRun(path, stage, record, generator, reconstructor, checkpoint)
