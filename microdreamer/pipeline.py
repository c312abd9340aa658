"""One run from an input to files on disk: preprocess → teacher → representation → SIR → export → report.

``ImageTo3D`` loads the teacher once and can then run many inputs (batch mode keeps the models loaded).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import RunConfig
from .errors import UserError
from .io.atomic import atomic_path
from .io.images import image_grid, load_image, save_image, to_reference
from .preprocess import preprocess
from .representations.gaussians import Gaussians
from .sir.cameras import CameraSampler, turntable
from .sir.engine import ProgressCallback, Reference, SIREngine
from .teachers.base import Condition, Teacher
from .teachers.registry import teacher_entry


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but this torch build sees no CUDA GPU: use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' asked for, but it is not available here: use --device cpu")
    return device


def versions(device: torch.device) -> dict[str, str]:
    info = {
        "microdreamer": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@dataclass
class RunOutputs:
    ply: Path
    views: Path
    report: Path

    @classmethod
    def for_stem(cls, out_dir: Path, stem: str) -> "RunOutputs":
        return cls(out_dir / f"{stem}.ply", out_dir / f"{stem}_views.png", out_dir / f"{stem}.json")

    def all(self) -> list[Path]:
        return [self.ply, self.views, self.report]


@dataclass
class RunReport:
    stem: str
    seed: int
    config: dict[str, Any]
    timings: dict[str, float]
    evaluations: dict[str, int]
    primitives: int
    optimisation_steps: int
    iterations: list[dict[str, Any]]
    versions: dict[str, str]
    outputs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def check_outputs_free(outputs: RunOutputs, overwrite: bool) -> None:
    taken = [p for p in outputs.all() if p.exists()]
    if taken and not overwrite:
        raise UserError(f"{taken[0]} already exists: pass --overwrite to replace it, or choose another --out")


class ImageTo3D:
    """Image (or a reference mesh's front view) → 3D Gaussians, with the teacher loaded once."""

    def __init__(self, cfg: RunConfig, device: torch.device, allow_download: bool = True) -> None:
        self.cfg = cfg
        self.device = device
        start = time.perf_counter()
        self.teacher: Teacher = teacher_entry(cfg.teacher.name).build(cfg, device, allow_download)
        self.load_seconds = time.perf_counter() - start

    def reference_view(self, image: Path | None) -> tuple[Reference, str]:
        """The input image and its camera; without an image, the reference teacher's front render."""
        c = self.cfg.cameras
        camera = CameraSampler(
            c.views, c.elevation, c.min_ver, c.max_ver, c.radius, c.resolution, c.fovy
        ).reference(self.teacher.reference_azimuth).to(self.device)
        if image is not None:
            rgba = preprocess(load_image(image))
            rgb, mask = to_reference(rgba, c.resolution, self.cfg.background)
            stem = image.stem
        else:
            front = getattr(self.teacher, "front_image", None)
            if front is None:
                raise UserError(f"teacher '{self.cfg.teacher.name}' needs an input image")
            rgb, mask = front(camera)
            stem = Path(self.cfg.teacher.model or "reference").stem
        return Reference(rgb.to(self.device), mask.to(self.device), camera), stem

    def run(
        self,
        image: Path | None,
        out_dir: Path,
        overwrite: bool = False,
        on_iteration: ProgressCallback | None = None,
    ) -> RunReport:
        timings: dict[str, float] = {"load_teacher": self.load_seconds}
        start = time.perf_counter()
        reference, stem = self.reference_view(image)
        outputs = RunOutputs.for_stem(out_dir, stem)
        check_outputs_free(outputs, overwrite)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        condition = Condition(image=reference.rgb, mask=reference.mask, elevation=self.cfg.cameras.elevation)
        self.teacher.prepare(condition, generator)
        timings["preprocess"] = time.perf_counter() - start

        before = self.teacher.evaluations.as_dict()
        start = time.perf_counter()
        gaussians = Gaussians(self.cfg.gaussians, self.device, generator)
        engine = SIREngine(
            self.teacher, gaussians, self.cfg, generator, self.device, reference=reference, on_iteration=on_iteration
        )
        result = engine.run()
        timings["sir"] = time.perf_counter() - start
        timings.update({f"sir.{k}": v for k, v in result.timings.items()})

        start = time.perf_counter()
        c = self.cfg.cameras
        sheet_cams = turntable(8, 0.0, c.radius, c.resolution, c.fovy, offset=-180.0).to(self.device)
        background = torch.tensor(self.cfg.background, device=self.device)
        with torch.no_grad():
            views = gaussians.render(sheet_cams, background).rgb
        # All three files appear together, only once all of them are complete.
        with atomic_path(outputs.ply) as ply, atomic_path(outputs.views) as sheet, atomic_path(outputs.report) as rep:
            gaussians.save(ply)
            save_image(sheet, image_grid(views.cpu(), cols=4))
            timings["export"] = time.perf_counter() - start
            after = self.teacher.evaluations.as_dict()
            report = RunReport(
                stem=stem,
                seed=self.cfg.seed,
                config=self.cfg.to_dict(),
                timings={k: round(v, 4) for k, v in timings.items()},
                evaluations={k: after[k] - before[k] for k in after},
                primitives=gaussians.num_primitives,
                optimisation_steps=result.optimisation_steps,
                iterations=[log.__dict__ for log in result.iterations],
                versions=versions(self.device),
                outputs={"ply": str(outputs.ply), "views": str(outputs.views), "report": str(outputs.report)},
            )
            rep.write_text(report.to_json())
        return report
