"""The feed-forward path: four views of the object → LGM → 3D Gaussians in one network pass.

``method = "lgm"`` (``--method lgm``) makes these Gaussians the run's result, in seconds on a GPU;
``init = "lgm"`` (``--init lgm``, presets ``*-lgm-init``) starts SIR from them instead of a random blob;
``init = "geco"`` (``--init geco --init-model RUN_DIR``) from those of a GECO run (``method = "geco"``'s).
The four views come from the run's teacher (:data:`~microdreamer.teachers.registry.VIEW_SOURCES`):

- ``imagedream`` (image, optional prompt) and ``mvdream`` (prompt): sampled from noise as LGM's
  ``infer.py`` / ``app.py`` do (teachers spec §5, geco spec §2.7): DDIM with eta 0 over ``lgm.steps``
  (30) steps, guidance ``lgm.guidance`` (presets: 5 for ImageDream, 7.5 for MVDream), at MVDream's own
  four cameras (azimuths 0/90/180/270 of its convention, elevation ``cameras.elevation``), then reordered
  [1, 2, 3, 0] so that the front view comes first. LGM's demo also removes the backgrounds of MVDream's
  views and recentres each; here they go to LGM as generated.
- ``reference``: the mesh's renders at LGM's own cameras (radius 1.5, azimuths 0/90/180/270 from the
  front), so the path runs offline.
- ``zero123plus`` (EXPERIMENTAL): Zero123++ v1.1's six views of the input on gray; four of them
  (:data:`ZERO123PLUS_VIEWS`) are re-matted to white and given the Plücker rays of their true cameras
  (30° above or 20° below, field of view 30°), poses LGM was not trained on: expect rougher results
  than with ImageDream's views.

The Gaussians land in our world where the views' cameras put them
(:func:`~microdreamer.reconstructors.lgm.lgm_frame`), with the front view at the teacher's reference
azimuth, as its SIR runs have it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import RunConfig
from .errors import UserError
from .io.images import to_reference
from .io.ply import GaussianPLY
from .pipeline import ImageTo3D, PreparedInput, PreprocessOptions, Reconstruction, reset_peak_memory
from .reconstructors.lgm import LGMReconstructor
from .reconstructors.lgm_unet import NUM_VIEWS, LGMConfig
from .representations.gaussians import Gaussians
from .sir.cameras import Cameras
from .sir.refiner import init_sample
from .teachers.base import Condition, EvaluationCounter, Teacher
from .teachers.loading import resolve_model_dir
from .video import VideoOptions

if TYPE_CHECKING:
    from .distill.inference import GECOLGM, GECOViews
    from .generators.zero123plus import Zero123PlusGenerator
    from .sir.engine import ProgressCallback
    from .teachers.reference import ReferenceTeacher

#: MVDream's views 0..3 (azimuths 0/90/180/270 of its convention) in LGM's order: its front (view 1) first
MVDREAM_TO_LGM = (1, 2, 3, 0)
#: the Zero123++ views LGM gets: azimuths 30, 90, 210, 270 from the input; 30° above, 20° below, 20° below, 30° above
ZERO123PLUS_VIEWS = (0, 1, 3, 4)


@dataclass
class Views:
    """LGM's input: four views of one object and the cameras that saw them (``method = "geco"``: the generator's
    six views on gray, at Zero123++'s cameras)."""

    images: Tensor  # [4,3,H,W] in [0,1] over white, the front view first
    cameras: Cameras  # in our world
    evaluations: dict[str, int]  # the network evaluations that made them


class TeacherViews:
    """ImageDream / MVDream sampling LGM's views with LGM's settings."""

    def __init__(self, teacher: Teacher, cfg: RunConfig, fovy: float) -> None:
        self.teacher, self.cfg, self.fovy = teacher, cfg, fovy
        self.front_azimuth = teacher.reference_azimuth

    def __call__(self, prepared: PreparedInput, generator: torch.Generator) -> Views:
        t, c, f = self.teacher, self.cfg.cameras, self.cfg.lgm
        image = None if prepared.rgba is None else to_reference(prepared.rgba, t.resolution, self.cfg.background)[0]
        before = t.evaluations.as_dict()
        t.prepare(Condition(image=image, prompt=prepared.prompt, negative_prompt=f.negative_prompt,
                            elevation=c.elevation), generator)
        # MVDream's views 0..3, 90° apart, its front (view 1) at the teacher's reference azimuth
        azimuths = [self.front_azimuth + 90.0 * (i - MVDREAM_TO_LGM[0]) for i in range(NUM_VIEWS)]
        cameras = Cameras.orbit([c.elevation] * NUM_VIEWS, azimuths, c.radius, t.resolution, self.fovy)
        images = init_sample(t, cameras.to(t.device), f.steps, 0.0, f.guidance, generator)
        after = t.evaluations.as_dict()
        order = list(MVDREAM_TO_LGM)
        return Views(images[order], cameras[order], {k: after[k] - before[k] for k in after})


class MeshViews:
    """The reference teacher's mesh rendered at LGM's own cameras."""

    def __init__(self, teacher: ReferenceTeacher, cfg: RunConfig, network: LGMConfig) -> None:
        self.teacher, self.cfg, self.network = teacher, cfg, network
        self.front_azimuth = teacher.reference_azimuth

    def __call__(self, prepared: PreparedInput, generator: torch.Generator) -> Views:
        azimuths = [self.front_azimuth + 90.0 * i for i in range(NUM_VIEWS)]
        cameras = Cameras.orbit([self.cfg.cameras.elevation] * NUM_VIEWS, azimuths, self.network.cam_radius,
                                self.teacher.resolution, self.network.fovy)
        return Views(self.teacher.render(cameras).rgb, cameras, EvaluationCounter().as_dict())


class Zero123PlusViews:
    """EXPERIMENTAL: four of Zero123++ v1.1's six views, re-matted from gray to white, at their true cameras."""

    front_azimuth = 0.0  # the input view's, as for the single-view teachers

    def __init__(self, model: Zero123PlusGenerator, cfg: RunConfig, view_size: int | None = None) -> None:
        from .generators.zero123plus import VIEW_SIZE

        self.model, self.cfg, self.view_size = model, cfg, view_size or VIEW_SIZE

    def __call__(self, prepared: PreparedInput, generator: torch.Generator) -> Views:
        from .generators.zero123plus import GRAY, rematte_on_white

        if prepared.rgba is None:
            raise UserError("zero123plus makes its views from an input image: pass one")
        f = self.cfg.lgm
        condition = to_reference(prepared.rgba, self.view_size, (GRAY,) * 3)[0]
        out = self.model.generate(condition, generator, steps=f.steps, guidance_scale=f.guidance,
                                  view_size=self.view_size)
        counter = EvaluationCounter()  # one (guided) pass of the grid of six views per step
        for _ in range(f.steps):
            counter.add("guided" if f.guidance > 1.0 else "cond", len(out.views))
        picked = list(ZERO123PLUS_VIEWS)
        return Views(rematte_on_white(out.views[picked]), out.cameras[picked], counter.as_dict())


ViewSource = TeacherViews | MeshViews | Zero123PlusViews


class FeedForward:
    """LGM and the source of its four views, loaded once: a prepared input → raw Gaussians in our world. For
    ``method`` or ``init = "geco"`` a distilled run's generator (six views in one pass) and reconstructor
    (:mod:`microdreamer.distill.inference`)."""

    def __init__(self, cfg: RunConfig, device: torch.device, allow_download: bool = True,
                 teacher: Teacher | None = None) -> None:
        f = cfg.lgm
        self.cfg = cfg
        self.lgm: LGMReconstructor | GECOLGM
        self.views: ViewSource | GECOViews
        if "geco" in (cfg.method, cfg.init):
            from .distill.inference import load_run

            self.views, self.lgm = load_run(cfg, device, allow_download)
            return
        self.lgm = LGMReconstructor.from_pretrained(f.reconstructor, f.weights, device=device,
                                                    dtype=cfg.teacher.dtype, allow_download=allow_download)
        self.views = view_source(cfg, device, allow_download, teacher, self.lgm.config)

    def __call__(self, prepared: PreparedInput, generator: torch.Generator,
                 timings: dict[str, float]) -> tuple[GaussianPLY, dict[str, int]]:
        """LGM's Gaussians of ``prepared`` (raw 3DGS parameters, on LGM's device) and the network evaluations
        that made its views; ``lgm.views``, ``lgm.reconstruct`` and their sum ``lgm`` go to ``timings``."""
        start = time.perf_counter()
        views = self.views(prepared, generator)
        middle = time.perf_counter()
        gaussians = self.lgm.reconstruct(views.images, views.cameras, self.cfg.lgm.min_opacity)[0]
        if self.lgm.device.type == "cuda":
            torch.cuda.synchronize(self.lgm.device)
        end = time.perf_counter()
        timings.update({"lgm.views": middle - start, "lgm.reconstruct": end - middle, "lgm": end - start})
        return gaussians, views.evaluations


def view_source(cfg: RunConfig, device: torch.device, allow_download: bool, teacher: Teacher | None,
                network: LGMConfig) -> ViewSource:
    """What makes LGM's views for ``cfg``'s teacher (loaded already, unless it is no SIR teacher)."""
    name = cfg.teacher.name
    if name == "zero123plus":
        from .generators.zero123plus import Zero123PlusGenerator

        model = Zero123PlusGenerator.from_pretrained(cfg.teacher.model, device=device, dtype=cfg.teacher.dtype,
                                                     allow_download=allow_download)
        return Zero123PlusViews(model, cfg)
    assert teacher is not None  # the registry's view sources are SIR teachers apart from zero123plus
    if name == "reference":
        return MeshViews(teacher, cfg, network)
    return TeacherViews(teacher, cfg, network.fovy)


def with_lgm(evaluations: dict[str, int]) -> dict[str, int]:
    """A run's network evaluations with LGM's one pass added (``lgm``, and in ``total``)."""
    return evaluations | {"total": evaluations["total"] + 1, "lgm": 1}


def fetch_reconstructor(cfg: RunConfig, allow_download: bool = True) -> None:
    """LGM's weights on this machine (downloaded into the cache first when missing and ``allow_download``);
    nothing for a Stage II GECO run, which brings its own (for ``init = "geco"``: with the run's Zero123++)."""
    if "geco" in (cfg.method, cfg.init):
        from .distill.inference import check_run, fetch_generator

        if cfg.init == "geco":  # --method geco's generator is fetched as its teacher's weights
            fetch_generator(cfg, allow_download)
        if check_run(cfg).reconstructor is not None:
            return
    source = cfg.lgm.reconstructor
    if not Path(source).expanduser().is_file():
        resolve_model_dir(source, allow_download=allow_download, files=(cfg.lgm.weights,))


class LGMTo3D(ImageTo3D):
    """``method = "lgm"``: the teacher's four views → LGM → the run's Gaussians, without SIR (``"geco"``: a
    GECO run's views and reconstructor). Saved, rendered, exported and reported as every run is (no SIR
    iterations; ``lgm`` timings)."""

    def reconstruct(
        self,
        prepared: PreparedInput,
        on_iteration: ProgressCallback | None = None,
        *,
        preprocess: PreprocessOptions | None = None,
        video: VideoOptions | None = None,
    ) -> Reconstruction:
        assert self.feedforward is not None
        timings = self.load_timing()
        reset_peak_memory(self.device)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        raw, evaluations = self.feedforward(prepared, generator, timings)
        model = Gaussians(self.cfg.gaussians, self.device, generator, init=raw)
        views, frames = self.renders(model, video, self.feedforward.views.front_azimuth, timings)
        return Reconstruction(
            self.cfg, self.device, prepared, preprocess or PreprocessOptions(), model, views, frames, video, timings,
            with_lgm(evaluations), 0, [], getattr(self.teacher, "mode", None),
        )

