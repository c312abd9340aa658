"""A distilled GECO run as the feed-forward path's view source and reconstructor (``--method geco``, and
SIR's start with ``--init geco``).

One generator pass and one LGM pass (GECO §3): the input on Zero123++'s gray at the run's view size is the
condition y, the run's one-step generator G (:mod:`.onestep`, the newest checkpoint's weights) turns noise z
into the 3 × 2 grid of six views, and LGM turns the views it takes into Gaussians as the run's
:class:`~.reconstruction.GECOReconstructor` feeds it. A Stage II run brings its fine-tuned LGM and the way it
feeds it (views, background, field of view); a Stage I run has none, so the published LGM
(``--reconstructor``) is fed as Stage II starts from it (:class:`~.config.Stage2Config`'s defaults).

The conditioning's VAE draws and then z come from the run's generator (as :func:`.pseudo_gt.sample_inputs`
draws them from a sample's). The Gaussians land in our world with the condition view's camera at azimuth 0,
elevation 0 and the distance of SIR's reference camera, ``cameras.radius``
(:meth:`~.reconstruction.GECOReconstructor.to_world`), so that the contact sheet and turntable frame them as
any run's.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import RunConfig
from ..errors import UserError
from ..feedforward import Views
from ..generators.zero123plus import GRAY, Zero123PlusGenerator, split_grid, zero123plus_cameras
from ..io.images import to_reference
from ..io.ply import GaussianPLY
from ..reconstructors.lgm import LGMReconstructor, check_weights_source, splatter_to_gaussians
from ..reconstructors.lgm_unet import LGMConfig, LGMNetwork
from ..sir.cameras import Cameras
from ..teachers.base import EvaluationCounter
from ..teachers.catalog import find_entry
from ..teachers.loading import load_module, local_model_dir, resolve_dtype, resolve_model_dir
from .config import Stage2Config
from .denoiser import Denoiser, condition_batch
from .onestep import OneStepGenerator
from .reconstruction import GECOReconstructor
from .runs import DistilledRun, GeneratorSpec, ReconstructorSpec, open_run
from .stage1 import latent_shape

if TYPE_CHECKING:
    from ..pipeline import PreparedInput


def check_run(cfg: RunConfig) -> DistilledRun:
    """``cfg``'s GECO run (``--model`` for ``method = "geco"``, ``--init-model`` for ``init = "geco"``) read
    and checked before anything loads: a run folder with a complete checkpoint, its Zero123++ model where it
    names a folder, and for a Stage I run the published LGM's weights source (``--reconstructor``)."""
    folder, flag, use = ((cfg.teacher.model, "--model", "--method geco runs a distilled run")
                         if cfg.method == "geco" else
                         (cfg.lgm.init_model, "--init-model", "--init geco starts SIR from a distilled run"))
    if not folder:
        raise UserError(f"{use}: pass {flag} RUN_DIR (the --out of `distill stage1` or `distill stage2`)")
    run = open_run(folder, flag)
    if run.generator.model:
        local_model_dir(run.generator.model)
    if run.reconstructor is None:
        check_weights_source(cfg.lgm.reconstructor, cfg.lgm.weights)
    return run


def fetch_generator(cfg: RunConfig, allow_download: bool = True) -> Path:
    """The Zero123++ model a GECO run's generator builds on, on this machine (downloaded first when missing
    and ``allow_download``)."""
    model = check_run(cfg).generator.model or find_entry("zero123plus").repo_id
    return resolve_model_dir(model, allow_download=allow_download)


def stage1_reconstructor(network: LGMConfig) -> ReconstructorSpec:
    """How a Stage I run feeds the published LGM: as Stage II starts (its default views, background, fovy)."""
    defaults = {f.name: f.default for f in fields(Stage2Config)}
    return ReconstructorSpec(network, tuple(defaults["lgm_views"]), defaults["background"], defaults["fovy"])


class GECOViews:
    """The one-step generator of a run: an input image → six views in one (guided) network pass."""

    front_azimuth = 0.0  # the input view's, as for the single-view teachers

    def __init__(self, model: Zero123PlusGenerator, generator: OneStepGenerator, spec: GeneratorSpec) -> None:
        self.model, self.generator, self.spec = model, generator, spec

    @torch.no_grad()
    def __call__(self, prepared: PreparedInput, generator: torch.Generator) -> Views:
        if prepared.rgba is None:
            raise UserError("--method geco makes its views from an input image: pass one")
        size = self.spec.view_size
        condition = to_reference(prepared.rgba, size, (GRAY,) * 3)[0]
        conditioning = condition_batch(self.model, [condition], [generator])
        noise = torch.randn(latent_shape(self.model, size), generator=generator)[None].to(self.model.device)
        views = split_grid(self.model.decode(self.generator(noise, conditioning)).float())
        counter = EvaluationCounter()  # one pass over the grid of six views, both halves at once when guided
        counter.add("guided" if self.generator.guidance != 1.0 else "cond", len(views))
        return Views(views, zero123plus_cameras(resolution=size), counter.as_dict())


class GECOLGM:
    """The run's reconstructor: six views → raw Gaussians in our world, the input camera at ``radius``."""

    def __init__(self, reconstructor: GECOReconstructor, radius: float) -> None:
        self.reconstructor, self.radius = reconstructor, radius
        self.config = reconstructor.spec.network

    @property
    def device(self) -> torch.device:
        return self.reconstructor.device

    @torch.no_grad()
    def reconstruct(self, images: Tensor, cameras: Cameras, min_opacity: float) -> list[GaussianPLY]:
        """The Gaussians of the six views ``images`` (``cameras`` unused: the run's reconstructor knows them)."""
        splats, _ = self.reconstructor.splats(images[None])
        to_world = self.reconstructor.to_world(self.radius)
        return [to_world.apply(splatter_to_gaussians(s, min_opacity)) for s in splats]


def load_run(cfg: RunConfig, device: torch.device, allow_download: bool = True) -> tuple[GECOViews, GECOLGM]:
    """A run's generator (float32, as it was trained) and reconstructor (in ``cfg.teacher.dtype``) on ``device``."""
    run = check_run(cfg)
    spec = run.generator
    model = Zero123PlusGenerator.from_pretrained(spec.model, device=device, dtype="fp32",
                                                 allow_download=allow_download)
    if spec.view_size % model.vae_factor:
        raise UserError(f"the run's views of {spec.view_size} pixels do not fit this model's VAE "
                        f"(a multiple of {model.vae_factor})")
    model.unet.load_state_dict(run.checkpoint.tensors("generator"), strict=True)
    generator = OneStepGenerator(Denoiser(model.unet, model.alphas_cumprod, model.prediction), spec.timestep,
                                 spec.guidance)
    if run.reconstructor is None:
        f = cfg.lgm
        network = LGMReconstructor.from_pretrained(f.reconstructor, f.weights, device=device, dtype=cfg.teacher.dtype,
                                                   allow_download=allow_download).network
        rspec = stage1_reconstructor(network.config)
    else:
        rspec = run.reconstructor
        network = load_module(lambda: LGMNetwork(rspec.network), run.checkpoint.path / "reconstructor.safetensors",
                              device=device, dtype=resolve_dtype(cfg.teacher.dtype, device))
    network.eval().requires_grad_(False)
    return GECOViews(model, generator, spec), GECOLGM(GECOReconstructor(network, rspec), cfg.cameras.radius)
