"""Stage II of GECO: 3D-consistent distillation, fine-tuning generator and reconstructor together (GECO §3.2).

The one-step generator G of a Stage I run and the LGM reconstructor R (published weights) are trained end
to end on pseudo ground truth (:mod:`.pseudo_gt`): for each sample (condition image y, noise z), the
Gaussians LGM makes from Zero123++'s deterministic 75-step views of (y, z), seen from 50 random poses. One
training step, for a global batch of samples:

1. x0 = G(z; y) with the noise rebuilt from the sample's stored seed (so G sees the noise its target was made
   from), decoded by the frozen VAE into the 3 × 2 grid and split into six views;
2. R's Gaussians from those views (:class:`~microdreamer.distill.reconstruction.GECOReconstructor`);
3. ``render_views`` of the sample's poses, drawn afresh each step, rendered from R's Gaussians and from the
   pseudo ground truth's; L_3D = MSE + λ·LPIPS of the two (Eq. 3), averaged over the views and the batch;
4. one Adam step each for G and R (GECO: lr 1e-6, batch 8, 10 epochs).

The run folder, resume, checkpoints (G's UNet and R's network with their Adam states), validation,
processes and precision are the shared loop's (:mod:`.trainer`). Validation renders the first samples at
their first poses against the pseudo ground truth (PSNR).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..generators.zero123plus import Conditioning, Zero123PlusGenerator, split_grid
from ..metrics_lpips import LPIPS, WEIGHTS_HELP
from ..reconstructors.lgm import MIN_OPACITY, LGMReconstructor, splatter_activations
from ..reconstructors.lgm_unet import LGMNetwork
from ..sir.cameras import RangeCameraSampler
from .config import GENERATOR_VIEWS, Stage2Config
from .data import ConditionSet, load_conditions
from .distributed import World
from .pseudo_gt import Entry, PseudoGroundTruth, sample_inputs
from .randomness import batch_items, keyed_generator, keyed_seed, sample_generator
from .reconstruction import GECOReconstructor, render
from .runs import DistilledRun, GeneratorSpec, ReconstructorSpec, open_run, run_settings
from .stage1 import latent_shape, onestep_generator
from .trainer import Event, Outcome, Session, Trainer, run_training
from .validation import RenderValidator

#: the cache folder inside the run folder unless --pseudo-gt names another
PSEUDO_GT = "pseudo_gt"


class Stage2(Trainer):
    """The networks and optimisers of Stage II, its pseudo ground truth, and one training step."""

    STATS = ("loss", "mse", "lpips", "unmatted_views")
    config: Stage2Config

    def __init__(
        self,
        model: Zero123PlusGenerator,
        generator: GeneratorSpec,
        generator_weights: dict[str, Tensor],
        lgm: LGMNetwork,
        config: Stage2Config,
        data: ConditionSet,
        lpips: LPIPS | None,
        cache: str | Path,
        world: World = World(),
    ) -> None:
        super().__init__(config, world, model.device)
        self.model, self.data, self.generator_spec = model, data, generator
        model.unet.float().eval().requires_grad_(False)
        model.vae.requires_grad_(False)
        self.lpips = lpips.to(self.device) if lpips is not None else None
        self.spec = ReconstructorSpec(lgm.config, tuple(config.lgm_views), config.background, config.fovy)
        self.generator = onestep_generator(model, generator.timestep, generator.guidance)
        self.generator.unet.load_state_dict(generator_weights, strict=True)
        lgm = lgm.to(self.device).float().eval().requires_grad_(False)
        self.published = GECOReconstructor(lgm, self.spec)  # makes the pseudo ground truth
        self.reconstructor = GECOReconstructor(copy.deepcopy(lgm), self.spec)
        self.train("generator", self.generator.unet, config.lr_generator)
        self.train("reconstructor", self.reconstructor.network, config.lr_reconstructor)
        self.latent_shape = latent_shape(model, generator.view_size)
        self.samples = len(data) * config.samples_per_image
        self.cache = PseudoGroundTruth(cache, self.cache_settings())

    def cache_settings(self) -> dict[str, Any]:
        """Everything the pseudo ground truth depends on."""
        c = self.config
        return {"teacher": self.generator_spec.model, "teacher_steps": c.teacher_steps,
                "teacher_guidance": c.teacher_guidance, "view_size": self.generator_spec.view_size,
                "reconstructor": c.reconstructor, "reconstructor_spec": self.spec.to_dict(), "poses": c.poses,
                "pose_elevations": list(c.pose_elevations), "seed": c.seed, "samples_per_image": c.samples_per_image,
                "samples": self.samples, "data_fingerprint": self.data.fingerprint}

    @property
    def steps(self) -> int:
        """``--steps``, or ``epochs`` passes over the samples."""
        global_batch = self.config.batch_size * self.world.size
        return self.config.steps or math.ceil(self.config.epochs * self.samples / global_batch)

    # pseudo ground truth ---------------------------------------------------------------------------------

    def noise_seed(self, sample: int) -> int:
        return keyed_seed(self.config.seed, "stage2-noise", sample)

    @torch.no_grad()
    def pseudo_ground_truth(self, sample: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The stored tensors and metadata of ``sample`` (:mod:`.pseudo_gt`)."""
        c = self.config
        image, seed = sample // c.samples_per_image, self.noise_seed(sample)
        conditioning, noise, (g,) = sample_inputs(self.model, [self.data.image(image)], [seed], self.latent_shape)
        with self.precision():
            latents = self.model.sample(conditioning, noise, g, steps=c.teacher_steps,
                                        guidance_scale=c.teacher_guidance, deterministic=True)
            views = split_grid(self.model.decode(latents)).float()
            splats, _ = self.published.splats(views[None])
        gaussians = splatter_activations(splats[0])
        keep = gaussians["opacities"] >= MIN_OPACITY
        tensors = {k: v[keep].half().cpu() for k, v in gaussians.items()}
        sampler = RangeCameraSampler(views=c.poses, elevation_range=tuple(c.pose_elevations), resolution=1,
                                     distance_range=(1.0, 1.0), fovy_range=(c.fovy, c.fovy))
        poses = sampler.sample(keyed_generator(c.seed, "stage2-poses", sample))
        tensors.update(elevation=poses.elevation.float(), azimuth=poses.azimuth.float())
        return tensors, {"image": image, "condition": self.data.files[image], "noise_seed": seed}

    def prepare(self, run_dir: Path, emit: Callable[[Event], None]) -> Event:
        """Make the pseudo ground truth the cache lacks."""
        began = time.perf_counter()
        made = self.cache.build(self.samples, self.pseudo_ground_truth, self.world, self.device,
                                lambda done, total: emit({"event": "pseudo_gt_progress", "done": done, "total": total}))
        return {"event": "pseudo_gt", "samples": self.samples, "made": made, "folder": str(self.cache.folder),
                "seconds": time.perf_counter() - began}

    # one step --------------------------------------------------------------------------------------------

    def views(self, conditioning: Conditioning, noise: Tensor) -> Tensor:
        """The generator's six views ``[B, 6, 3, S, S]`` in [0, 1] (differentiable)."""
        with self.precision():
            grid = self.model.decode(self.generator(noise, conditioning))
        return split_grid(grid.float()).unflatten(0, (noise.shape[0], GENERATOR_VIEWS))

    def renders(self, entries: list[Entry], poses: list[Tensor]) -> tuple[Tensor, Tensor, int]:
        """Renders ``[ΣK, 3, H, W]`` of the generator + reconstructor's Gaussians of ``entries`` at their
        ``poses`` (indices), the pseudo ground truth's at the same cameras, and the views left on gray."""
        conditioning, noise, _ = sample_inputs(self.model, [self.data.image(e.image) for e in entries],
                                               [e.noise_seed for e in entries], self.latent_shape)
        views = self.views(conditioning, noise)
        with self.precision():
            splats, unmatted = self.reconstructor.splats(views)
        made, target = [], []
        background, size, backend = self.reconstructor.background, self.config.render_size, self.config.renderer
        for entry, pick, splat in zip(entries, poses, splats):
            cameras = self.reconstructor.cameras(entry.elevation[pick], entry.azimuth[pick], size)
            made.append(render(splatter_activations(splat), cameras, background, backend))
            with torch.no_grad():
                target.append(render(entry.gaussians, cameras, background, backend))
        return torch.cat(made), torch.cat(target), unmatted

    def train_step(self, step: int) -> dict[str, Tensor]:
        c = self.config
        b = c.batch_size
        items = batch_items(c.seed, step, b * self.world.size, self.samples)
        positions = range(self.world.rank * b, (self.world.rank + 1) * b)
        entries = [self.cache.entry(items[p], self.device) for p in positions]
        poses = [torch.randperm(c.poses, generator=sample_generator(c.seed, step, p))[: c.render_views]
                 for p in positions]
        made, target, unmatted = self.renders(entries, poses)
        mse = (made - target).square().mean()
        lpips = self.lpips(made, target).mean() if self.lpips is not None and c.lambda_lpips > 0 else mse.new_zeros(())
        loss = mse + c.lambda_lpips * lpips
        loss.backward()
        self.update("generator")
        self.update("reconstructor")
        return {"loss": loss, "mse": mse, "lpips": lpips, "unmatted_views": torch.tensor(float(unmatted))}

    def validator(self) -> RenderValidator:
        views = min(self.config.validation_views, self.config.poses)

        def renders(sample: int) -> tuple[Tensor, Tensor]:
            made, target, _ = self.renders([self.cache.entry(sample, self.device)], [torch.arange(views)])
            return made, target

        return RenderValidator(renders, min(self.config.validation_images, self.samples))


def stage2_config(run_dir: str | Path, settings: dict[str, Any], resume: bool) -> Stage2Config:
    """The settings of a Stage II run (see :func:`~microdreamer.distill.runs.run_settings`)."""
    return run_settings(Stage2Config, run_dir, settings, resume, stage=2)  # type: ignore[return-value]


def load_lpips(config: Stage2Config) -> LPIPS | None:
    """The LPIPS of Eq. 3, or None with ``--lambda-lpips 0``; without its weights, one line."""
    if config.lambda_lpips == 0:
        return None
    if config.lpips_vgg is None or config.lpips_heads is None:
        raise UserError(f"Stage II's loss MSE + λ·LPIPS needs LPIPS weights: {WEIGHTS_HELP}; give them with "
                        "--lpips-vgg FILE --lpips-heads FILE, or train on MSE alone with --lambda-lpips 0")
    return LPIPS.from_files(config.lpips_vgg, config.lpips_heads)


def stage1_run(config: Stage2Config) -> DistilledRun:
    run = open_run(config.model, "--model")
    if run.stage != 1:
        raise UserError(f"--model {run.path} is a Stage {run.stage} run; Stage II fine-tunes a Stage I run")
    return run


def run_stage2(
    config: Stage2Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
) -> Outcome:
    """Train (or continue) a Stage II run in ``run_dir``. Bad settings, a bad data folder, a missing Stage I
    run and missing LPIPS weights are refused before any model is loaded."""
    config.validate()
    run_dir = Path(run_dir).expanduser()
    data = load_conditions(config.data)
    stage1 = stage1_run(config)
    lpips = load_lpips(config)
    spec = stage1.generator
    generator = GeneratorSpec(config.teacher or spec.model, spec.timestep, spec.guidance, spec.view_size)

    def build(session: Session) -> Stage2:
        lgm = LGMReconstructor.from_pretrained(config.reconstructor, device=session.device, dtype="fp32",
                                               allow_download=config.allow_download).network
        model = Zero123PlusGenerator.from_pretrained(generator.model, device=session.device, dtype="fp32",
                                                     allow_download=config.allow_download)
        if generator.view_size % model.vae_factor:
            raise UserError(f"the Stage I run's views of {generator.view_size} pixels do not fit this model's VAE "
                            f"(a multiple of {model.vae_factor})")
        return Stage2(model, generator, stage1.checkpoint.tensors("generator"), lgm, config, data, lpips,
                      config.pseudo_gt or run_dir / PSEUDO_GT, session.world)

    def record(trainer: Trainer) -> dict[str, Any]:
        assert isinstance(trainer, Stage2)
        return {"generator": generator.to_dict(), "reconstructor": trainer.spec.to_dict(),
                "stage1": {"run": str(stage1.path), "step": stage1.checkpoint.step},
                "samples": trainer.samples, "pseudo_gt": str(trainer.cache.folder)}

    return run_training(config, run_dir, stage=2, fingerprint=data.fingerprint, build=build, record=record,
                        resume=resume, on_event=on_event)

