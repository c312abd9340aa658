"""The SIR loop (paper Algorithm 1): render → refine with the teacher → reconstruct, K times.

One *iteration* draws B cameras, renders them, asks the refiner for target images once (hybrid forward
to t2, DDIM sampling back to 0) and then takes I optimisation steps of the pixel-space L1 loss
towards those fixed targets, plus the reference-view terms when an input image exists. The very first
("init") iteration samples its targets from pure noise. The loop knows nothing about which teacher
or which 3D representation it drives.

Renders may grow over the run (``cameras.resolutions`` switching at ``cameras.milestones``): the teacher
resizes them to its own size and the targets and the reference view come back area-averaged. A
representation with a pixel budget renders a random subset of pixels per step (the targets are fixed
images, so the scaled subset loss estimates the whole one); the teacher still refines whole renders.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import RunConfig
from ..io.images import area_resize_tensor
from ..representations.base import Representation
from ..teachers.base import Teacher
from .cameras import Cameras, camera_sampler
from .refiner import init_sample, refine
from .schedule import SIRSchedule


@dataclass
class Reference:
    """The reference view: the input image (composited on the background), its mask and camera."""

    rgb: Tensor  # [1,3,H,W]
    mask: Tensor  # [1,1,H,W]
    camera: Cameras  # one camera


@dataclass
class StageTimer:
    """Wall time per stage, summed over the run (CUDA work is synchronised at stage boundaries)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str, device: torch.device) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class IterationLog:
    iteration: int  # 0 is the init iteration
    t1: int | None
    t2: int | None
    loss: float | None  # None: the iteration took no steps (an init iteration with init_steps 0)
    primitives: int
    seconds: float  # wall time of the iteration: rendering, teacher refinement and fitting


@dataclass
class EngineResult:
    iterations: list[IterationLog]
    timings: dict[str, float]
    optimisation_steps: int


ProgressCallback = Callable[[IterationLog, int], None]  # (log, total iterations including init)


class SIREngine:
    def __init__(
        self,
        teacher: Teacher,
        representation: Representation,
        cfg: RunConfig,
        generator: torch.Generator,
        device: torch.device,
        reference: Reference | None = None,
        on_iteration: ProgressCallback | None = None,
    ) -> None:
        self.teacher = teacher
        self.representation = representation
        self.cfg = cfg
        self.generator = generator
        self.device = device
        self.reference = reference
        self.on_iteration = on_iteration
        self.sampler = camera_sampler(cfg.cameras)
        self.schedule = SIRSchedule.from_config(cfg.schedule, generator=generator)
        self.background = torch.tensor(cfg.background, dtype=torch.float32, device=device)
        self.timer = StageTimer()
        self._references: dict[int, tuple[Tensor, Tensor]] = {}  # the reference view per render size

    def run(self) -> EngineResult:
        logs: list[IterationLog] = []
        step = 0
        optimisation_steps = 0
        total = self.schedule.iterations + 1
        for iteration in range(total):
            # The reference's step counter advances once per iteration and once per optimisation step
            # (spec §6.2); densification and the learning-rate decay read it, so we keep its values.
            step += 1
            start = time.perf_counter()
            resolution = self.cfg.cameras.render_resolution(iteration)
            cameras = self.sampler.sample(self.generator).with_resolution(resolution).to(self.device)
            self.teacher.set_backdrop(self.representation.new_iteration(cameras, self.background))
            plan = None if iteration == 0 else self.schedule.iteration(iteration - 1)
            steps = self.cfg.schedule.init_steps if iteration == 0 else self.cfg.schedule.steps
            target: Tensor | None = None
            loss: Tensor | None = None
            for _ in range(steps):
                step += 1
                pixels = self._pixels(len(cameras) + (self.reference is not None), resolution)
                if target is None and pixels is not None:  # the teacher refines whole renders
                    target = self._target(self._whole_renders(cameras) if plan else None, cameras, plan)
                output, novel = self._render(cameras, pixels)
                if target is None:
                    target = self._target(novel.detach(), cameras, plan)
                loss = self._loss(output, novel, target, pixels)
                with self.timer("backward", self.device):
                    loss.backward()
                with self.timer("update", self.device):
                    self.representation.step(step, output)
                optimisation_steps += 1
            log = IterationLog(
                iteration,
                None if plan is None else plan.t1,
                None if plan is None else plan.t2,
                None if loss is None else float(loss.detach()),  # the one device sync per iteration
                self.representation.num_primitives,
                time.perf_counter() - start,
            )
            logs.append(log)
            if self.on_iteration is not None:
                self.on_iteration(log, total)
        self.teacher.set_backdrop(None)  # later users of the teacher (texture refinement) render over the colour
        with self.timer("update", self.device):
            self.representation.finalize()
        return EngineResult(logs, dict(self.timer.seconds), optimisation_steps)

    def _pixels(self, views: int, resolution: int) -> Tensor | None:
        """Random pixel subsets ``[views, P]`` when the representation has a pixel budget below the whole
        batch (P = budget // views per view, drawn without repetition), else None."""
        budget = self.representation.pixel_budget
        per_view = budget // views
        if not budget or per_view >= resolution * resolution:
            return None
        if per_view < 1:
            raise ValueError(f"a pixel budget of {budget} cannot cover {views} views")
        g = self.generator
        order = torch.rand(views, resolution * resolution, generator=g, device=g.device).argsort(dim=1)
        return order[:, :per_view].to(self.device)

    def _whole_renders(self, cameras: Cameras) -> Tensor:
        with self.timer("render", self.device), torch.no_grad():
            return self.representation.render(cameras, self.background).rgb

    def _render(self, cameras: Cameras, pixels: Tensor | None = None):
        """Render the novel views, with the reference view appended when there is one (one batch); only
        ``pixels`` when given."""
        if self.reference is not None:
            cameras = Cameras.cat([cameras, self.reference.camera.with_resolution(cameras.width)])
        with self.timer("render", self.device):
            if pixels is None:
                output = self.representation.render(cameras, self.background)
            else:
                output = self.representation.render_pixels(cameras, self.background, pixels)
        novel = output.rgb[: len(cameras) - (self.reference is not None)]
        return output, novel

    def _target(self, renders: Tensor | None, cameras: Cameras, plan) -> Tensor:
        """The refined images x̂ the next I steps fit (computed once per iteration, no gradient)."""
        s, g = self.cfg.schedule, self.cfg.guidance
        with self.timer("teacher", self.device), torch.no_grad():
            if plan is None:
                return init_sample(
                    self.teacher, cameras, s.denoise_steps, g.eta, g.scale, self.generator,
                    out_size=(cameras.height, cameras.width),
                )
            return refine(
                self.teacher, renders, cameras, plan.t1, plan.t2, s.denoise_steps, g.eta, g.scale, self.generator
            )

    def _reference_at(self, resolution: int) -> tuple[Tensor, Tensor]:
        """The reference image and mask at the render size (area-averaged when smaller)."""
        ref = self.reference
        if ref.rgb.shape[-1] == resolution:
            return ref.rgb, ref.mask
        if resolution not in self._references:
            self._references[resolution] = (area_resize_tensor(ref.rgb, resolution, resolution),
                                            area_resize_tensor(ref.mask, resolution, resolution))
        return self._references[resolution]

    def _loss(self, output, novel: Tensor, target: Tensor, pixels: Tensor | None = None) -> Tensor:
        """Spec §6.4: L1 summed over pixels and averaged over views, plus the reference-view terms. On a
        pixel subset the sums are scaled to whole images (H·W / P), so the loss estimates the full one."""
        w = self.cfg.loss
        ref_rgb, ref_mask = (None, None) if self.reference is None else self._reference_at(target.shape[-1])
        if pixels is not None:
            scale = target.shape[-2] * target.shape[-1] / pixels.shape[1]
            target = _gather(target, pixels[: novel.shape[0]])
            if self.reference is not None:
                ref_rgb, ref_mask = _gather(ref_rgb, pixels[-1:]), _gather(ref_mask, pixels[-1:])
        loss = w.novel * (novel - target).abs().sum() / novel.shape[0]
        if self.reference is not None:
            ref_out_rgb = output.rgb[-1:]
            ref_alpha = output.alpha[-1:]
            if w.reference_rgb:
                loss = loss + w.reference_rgb * (ref_out_rgb - ref_rgb).abs().sum()
            if w.reference_mask:
                loss = loss + w.reference_mask * (ref_alpha - ref_mask).square().sum()
        return loss if pixels is None else loss * scale


def _gather(images: Tensor, pixels: Tensor) -> Tensor:
    """The pixels ``[B,P]`` (row-major flat indices) of ``images [B,C,H,W]`` as ``[B,C,1,P]``."""
    flat = images.flatten(2)
    return flat.gather(2, pixels[:, None, :].expand(-1, flat.shape[1], -1)).unsqueeze(2)
