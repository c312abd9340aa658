"""Periodic validation of both stages: a sheet of images per validation and PSNR against a reference.

- Stage I (:class:`Validator`): the one-step generator's grids against the teacher's own multi-step samples
  (75 Euler-ancestral steps by default) of the same condition images. Each validation image has fixed random
  numbers (keyed by the run's seed and its index), so successive sheets show the same noise evolving; the
  teacher's grids are made once per process. A row per image: the condition, the one-step 3 × 2 grid, the
  teacher's grid.
- Stage II (:class:`RenderValidator`): renders of the generator + reconstructor's Gaussians against those of
  the pseudo ground truth, for the first samples at their first poses. A row per sample: the renders, then
  the pseudo ground truth's.

The PSNR of a row is over all its images together; the record holds the mean and each row's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..generators.zero123plus import COLS, GRAY, ROWS, Zero123PlusGenerator
from ..io.images import save_image
from ..metrics import psnr
from .data import ConditionSet
from .denoiser import condition_batch
from .onestep import OneStepGenerator
from .randomness import keyed_generator

VALIDATION = "validation"


class Validator:
    def __init__(
        self,
        model: Zero123PlusGenerator,
        generator: OneStepGenerator,
        data: ConditionSet,
        *,
        images: int,
        teacher_steps: int,
        guidance: float,
        view_size: int,
        seed: int,
        precision: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.model, self.generator, self.data = model, generator, data
        self.indices = list(range(min(images, len(data))))
        self.teacher_steps, self.guidance, self.view_size, self.seed = teacher_steps, guidance, view_size, seed
        self.precision = precision
        self._teacher: list[Tensor] | None = None

    def teacher_grids(self) -> list[Tensor]:
        """The teacher's ``[1,3,3S,2S]`` grid of each validation image (made on first use)."""
        if self._teacher is None:
            with torch.no_grad(), self.precision():
                self._teacher = [
                    self.model.generate(self.data.image(i), keyed_generator(self.seed, "validation-teacher", i),
                                        steps=self.teacher_steps, guidance_scale=self.guidance,
                                        view_size=self.view_size).grid.float().cpu()
                    for i in self.indices
                ]
        return self._teacher

    @torch.no_grad()
    def onestep_grids(self) -> list[Tensor]:
        """The one-step generator's ``[1,3,3S,2S]`` grid of each validation image."""
        size = self.view_size // self.model.vae_factor
        grids = []
        for i in self.indices:
            g = keyed_generator(self.seed, "validation", i)
            conditioning = condition_batch(self.model, [self.data.image(i)], [g])
            noise = torch.randn((1, 4, ROWS * size, COLS * size), generator=g).to(self.model.device)
            with self.precision():
                latents = self.generator(noise, conditioning)
            grids.append(self.model.decode(latents).float().cpu())
        return grids

    def run(self, step: int, run_dir: Path) -> dict[str, Any]:
        """Validate at ``step``: write ``validation/step-XXXXXXXX.png`` and return the log record."""
        teacher, onestep = self.teacher_grids(), self.onestep_grids()
        scores = [float(psnr(a, b)[0]) for a, b in zip(onestep, teacher)]
        rows = []
        for i, a, b in zip(self.indices, onestep, teacher):
            height = a.shape[-2]
            condition = F.interpolate(self.data.image(i), size=(self.view_size, self.view_size), mode="area")
            column = torch.full((1, 3, height, self.view_size), GRAY)
            column[:, :, : self.view_size] = condition
            rows.append(torch.cat([column, a, b], dim=-1))
        return validation_record(run_dir, step, rows, scores)


def validation_record(run_dir: Path, step: int, rows: list[Tensor], scores: list[float]) -> dict[str, Any]:
    """Write the sheet of ``rows`` (``[1,3,h,w]`` each, stacked) as ``validation/step-XXXXXXXX.png`` and return
    the log record of the validation at ``step`` with its PSNR ``scores``, one per row."""
    name = Path(VALIDATION) / f"step-{step:08d}.png"
    save_image(run_dir / name, torch.cat(rows, dim=-2))
    return {"event": "validation", "step": step, "psnr": sum(scores) / len(scores), "psnr_per_image": scores,
            "sheet": name.as_posix()}


class RenderValidator:
    """Stage II: ``renders(sample)`` gives a sample's renders and the pseudo ground truth's ``[V,3,H,W]``."""

    def __init__(self, renders: Callable[[int], tuple[Tensor, Tensor]], samples: int) -> None:
        self.renders, self.samples = renders, samples

    @torch.no_grad()
    def run(self, step: int, run_dir: Path) -> dict[str, Any]:
        rows, scores = [], []
        for sample in range(self.samples):
            made, target = (torch.cat(list(x.float().cpu()), dim=-1)[None] for x in self.renders(sample))
            scores.append(float(psnr(made, target)[0]))
            rows.append(torch.cat([made, target], dim=-1))
        return validation_record(run_dir, step, rows, scores)
