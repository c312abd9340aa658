"""The Python API: what the ``microdreamer`` command is built on, for notebooks, add-ons and render farms.

    from microdreamer import Pipeline

    pipe = Pipeline.from_preset(teacher="reference", model="spot.obj", iters=4)   # nothing loaded yet
    result = pipe.image_to_3d("cow.png")          # the teacher loads on first use, once
    result.save("out")                            # out/cow.ply, cow_views.png, cow_rgba.png, cow.json
    mesh = pipe.to_mesh(result)                   # textured mesh, texture refined by the same teacher
    mesh.save("out")                              # out/cow.glb, cow_mesh.json
    manifest = pipe.run_batch(["photos/"], "out") # many inputs, one manifest

A NeRF instead of Gaussians: ``Pipeline.from_preset(teacher=..., representation="nerf")`` (the teacher's
``-nerf`` preset, the paper's Table I NeRF column) or a ``-nerf`` preset by name; the result then saves
``<stem>.safetensors`` and meshes the same way.

Settings are the command line's option names (``seed``, ``iters``, ``steps``, ``views``, ``res``,
``elevation``, ``backend``, ``nerf_backend`` (the NeRF commands' ``--backend``), ``device``, ``model``,
``negative_prompt``, ``representation``, ``mesh_format``, ``faces``, ``texture_size``, ``grid``,
``threshold``, ``mesh_method``, ``refine_steps``, ``up``, ``scale``, ``method``, ``init``, ``reconstructor``, ``init_model``), applied over a
preset and an optional saved config exactly as the CLI applies its flags. Everything the CLI would report in
one line is raised as :class:`~microdreamer.errors.UserError`; nothing here prints or exits. Progress
reaches an optional callback.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batch import (
    BatchObserver, BatchRunner, Executor, Job, Manifest, batch_manifest_path, expand_inputs, ignored_files,
    is_single_input,
)
from .config import RunConfig, deep_merge, load_preset, read_config_file, resolve
from .errors import UserError
from .executors import Shard, make_executor
from .io.atomic import check_output_dir, check_output_file
from .evaluate import HELD_OUT_VIEWS, EvalReport, MeshEvalReport, evaluate_mesh, evaluate_model, held_out_scores
from .evaluate_clip import CLIP_RESOLUTION, ClipEvalReport, ClipTarget, clip_cameras, clip_scores, score_result
from .evaluate_geco import GECOEvalReport
from .export import STAGES, MeshExportReport, TexturedMesh
from .io.mesh import load_mesh
from .metrics_clip import load_clip
from .pipeline import (
    ImagePreparer,
    ImageTask,
    ImageTo3D,
    MeshTask,
    PreparedInput,
    PreprocessOptions,
    PreprocessTask,
    PromptMeshTask,
    PromptTask,
    Reconstruction,
    RunReport,
    SavedRun,
    describe_iteration,
    export_saved_run,
    front_view_stem,
    load_runner,
    prompt_jobs,
    prompt_stem,
    resolve_device,
)
from .preprocess import is_preprocessed_output
from .representations.base import Representation
from .representations.registry import representation_entry, representation_for_file, saved_representation
from .sir.cameras import Cameras
from .teachers.registry import check_teacher_config, default_preset, teacher_entry
from .video import VideoOptions, render_frames, result_renderer, turntable_cameras, write_video

#: setting name (as on the command line) → where it lives in :class:`~microdreamer.config.RunConfig`
SETTINGS: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher", "name"),
    "model": ("teacher", "model"),
    "shading": ("teacher", "shading"),
    "imperfection": ("teacher", "imperfection"),
    "iters": ("schedule", "iterations"),
    "steps": ("schedule", "steps"),
    "views": ("cameras", "views"),
    "res": ("cameras", "resolution"),
    "elevation": ("cameras", "elevation"),
    "backend": ("gaussians", "backend"),
    "nerf_backend": ("nerf", "backend"),
    "negative_prompt": ("guidance", "negative_prompt"),
    "representation": ("representation",),
    "mesh_format": ("mesh", "format"),
    "faces": ("mesh", "faces"),
    "texture_size": ("mesh", "texture"),
    "grid": ("mesh", "resolution"),
    "threshold": ("mesh", "threshold"),
    "mesh_method": ("mesh", "method"),
    "refine_steps": ("mesh", "refine_steps"),
    "up": ("mesh", "up"),
    "scale": ("mesh", "scale"),
    "seed": ("seed",),
    "device": ("device",),
    "method": ("method",),
    "init": ("init",),
    "reconstructor": ("lgm", "reconstructor"),
    "init_model": ("lgm", "init_model"),
}


def settings_to_config(**settings: Any) -> dict[str, Any]:
    """Settings (:data:`SETTINGS` names; None = not given) → nested config overrides."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if name not in SETTINGS:
            raise UserError(f"unknown setting '{name}' (known: {', '.join(SETTINGS)})")
        if value is None:
            continue
        *parents, leaf = SETTINGS[name]
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def resolve_config(
    teacher: str | None = None,
    preset: str | None = None,
    config: str | Path | None = None,
    *,
    needs_teacher: bool = True,
    overrides: dict[str, Any] | None = None,
    **settings: Any,
) -> RunConfig:
    """Preset < ``config`` (a TOML file or an earlier run's JSON report) < ``overrides`` (nested config
    keys, e.g. ``{"mesh": {"bake_resolution": 256}}``) < ``settings``.

    The preset is ``preset``, else the one a saved config names (when ``teacher`` does not change the
    teacher, nor the ``representation`` setting the representation), else the teacher's own for the
    representation (the setting's, else the saved config's, else Gaussians: ``stable-zero123`` or
    ``stable-zero123-nerf``; for Gaussians its ``-lgm`` or ``-lgm-init`` variant with ``method``/``init``
    lgm, and its ``-lgm-init`` with ``init`` geco). Without ``needs_teacher`` a model file named by a run report is not looked for (a mesh export
    without refinement needs none).
    """
    config = None if config is None else Path(config)
    saved = read_config_file(config) if config is not None else {}
    saved_teacher = saved.get("teacher", {}).get("name") if isinstance(saved.get("teacher"), dict) else None
    method, init = settings.get("method") or saved.get("method"), settings.get("init") or saved.get("init")
    name = teacher or saved_teacher or ("imagedream" if method == "lgm" else "stable-zero123")
    same_teacher = teacher is None or teacher == saved_teacher
    chosen = preset or (saved.get("preset") if same_teacher and isinstance(saved.get("preset"), str) else None)
    wanted = settings.get("representation") or saved.get("representation")
    if isinstance(wanted, str):
        representation_entry(wanted)  # one line for an unknown name
    if chosen is None or (preset is None and isinstance(wanted, str) and _representation_of(chosen) != wanted):
        representation = wanted if isinstance(wanted, str) else "gaussians"
        chosen = (default_preset(name, method, init) if representation == "gaussians"
                  else teacher_entry(name).preset_for(representation))
    flags = settings_to_config(teacher=teacher, **settings)
    return resolve(chosen, config, deep_merge(overrides or {}, flags), needs_teacher=needs_teacher)


def _representation_of(preset: str) -> str:
    return load_preset(preset).get("representation", "gaussians")


def check_run_outputs(out: Path | None, manifest: Path | None, inputs: Sequence[Path] = ()) -> None:
    """Before any input is read: the output folder can be written (without ``out``, the folder of each of
    ``inputs``, where their outputs go), and so can the manifest's folder."""
    if out is not None:
        check_output_dir(out)
    for folder in dict.fromkeys(p.parent for p in inputs) if out is None else []:
        check_output_dir(folder, "--out (default: beside each input)")
    if manifest is not None:
        check_output_file(manifest, "--manifest")


@dataclass(frozen=True)
class Progress:
    """One progress event: ``stage`` is ``load`` (the teacher, ``done`` 0 then 1), ``sir`` (an iteration
    finished: ``done`` of ``total`` including the init iteration), ``mesh`` (a mesh stage started) or
    ``score`` (:func:`selftest`'s evaluation started)."""

    stage: str
    done: int
    total: int
    info: str = ""


ProgressCallback = Callable[[Progress], None]


class ReconstructionResult:
    """What :meth:`Pipeline.image_to_3d` / :meth:`Pipeline.text_to_3d` made: the representation SIR optimised
    (3D Gaussians or a NeRF, as the configuration says), in memory until saved."""

    def __init__(self, reconstruction: Reconstruction) -> None:
        self.reconstruction = reconstruction
        self.report: RunReport | None = None  # set by save()

    @property
    def stem(self) -> str:
        """What the output files are named after (the image's stem, or the prompt's words)."""
        return self.reconstruction.input.stem

    @property
    def model(self) -> Representation:
        """The trained representation (a :class:`~microdreamer.representations.gaussians.Gaussians` or a
        :class:`~microdreamer.representations.nerf.NerfField`)."""
        return self.reconstruction.model

    @property
    def representation(self) -> str:
        """``gaussians`` or ``nerf``."""
        return self.reconstruction.cfg.representation

    @property
    def views(self) -> np.ndarray:
        """The contact sheet's 8 views around the object, ``[8,H,W,3]`` uint8."""
        return _to_uint8(self.reconstruction.views)

    def save(self, out_dir: str | Path, overwrite: bool = False) -> RunReport:
        """Write ``<stem>.ply`` (a NeRF: ``<stem>.safetensors``), ``<stem>_views.png``, ``<stem>.json`` (+
        ``_rgba.png``, ``_turntable.*``)."""
        self.report = self.reconstruction.save(Path(out_dir), overwrite)
        return self.report

    def render(self, cameras: Cameras) -> np.ndarray:
        """Renders ``[B,H,W,3]`` uint8 over the run's background (see :class:`~microdreamer.sir.cameras.Cameras`)."""
        r = self.reconstruction
        background = torch.tensor(r.cfg.background, dtype=torch.float32, device=r.device)
        with torch.no_grad():
            return _to_uint8(self.model.render(cameras.to(r.device), background).rgb)

    def turntable(self, frames: int = 90, elevation: float = 0.0, resolution: int = 256) -> np.ndarray:
        """``frames`` views over 360° from the input view's side, ``[F,H,W,3]`` uint8."""
        c = self.reconstruction.cfg.cameras
        cams = turntable_cameras(frames, elevation, c.radius, resolution, c.fovy)
        r = self.reconstruction
        background = torch.tensor(r.cfg.background, dtype=torch.float32, device=r.device)
        return render_frames(lambda cam: self.model.render(cam.to(r.device), background).rgb, cams)

    def evaluate(self, reference: str | Path, resolution: int = 256, radius: float = 2.0) -> EvalReport:
        """PSNR/SSIM on the 16 held-out views (at ``radius``, whatever cameras the run trained with) against a
        reference mesh (as ``microdreamer eval``), rendered with the run's teacher shading; albedo PSNR apart."""
        r = self.reconstruction
        shading = r.cfg.teacher.shading  # scored as its teacher saw it (lit or albedo)
        truth = load_mesh(Path(reference))
        views = held_out_scores(self.model.render, truth, r.device, radius, resolution, tuple(r.cfg.background),
                                shading)
        return EvalReport(self.stem, str(reference), views, shading)

    def evaluate_clip(self, clip_model: str | Path, *, image: str | Path | np.ndarray | None = None,
                      prompt: str | None = None, resolution: int = CLIP_RESOLUTION,
                      allow_download: bool = True) -> ClipEvalReport:
        """MicroDreamer's CLIP similarity (as ``microdreamer eval --protocol clip``) of 8 views at elevation 0,
        from the run's reference distance, to ``image`` or ``prompt``, by default to the run's preprocessed input
        or its prompt; ``clip_model`` a transformers CLIP folder or Hugging Face id."""
        if image is not None and prompt is not None:
            raise UserError("compare with an image or a prompt, not both")
        r = self.reconstruction
        if image is not None:
            target = ClipTarget.from_image(image)
        elif prompt is None and r.input.rgba is not None:
            target = ClipTarget.from_image(r.input.rgba, f"{self.stem}_rgba.png")
        elif (prompt or r.input.prompt) is not None:
            target = ClipTarget.from_prompt(prompt or r.input.prompt)
        else:
            raise UserError("this run had no input image and no prompt: pass image= or prompt=")
        clip = load_clip(clip_model, r.device, text=target.text, allow_download=allow_download)
        c, white = r.cfg.cameras, torch.ones(3, device=r.device)
        views = clip_scores(lambda cams: r.model.render(cams.to(r.device), white).rgb, clip, target,
                            clip_cameras(c.radius, c.fovy, resolution))
        return ClipEvalReport(self.stem, str(clip_model), target, c.radius, c.fovy, resolution, views)


class MeshResult:
    """A textured mesh made by :meth:`Pipeline.to_mesh`, in memory until saved."""

    def __init__(self, mesh: TexturedMesh, device: torch.device) -> None:
        self.mesh = mesh
        self.device = device
        self.report: MeshExportReport | None = None  # set by save()

    @property
    def faces(self) -> int:
        return self.mesh.report.faces

    def save(self, out_dir: str | Path, overwrite: bool = False) -> MeshExportReport:
        """Write the mesh file(s) in the configured format and ``<stem>_mesh.json``."""
        self.report = self.mesh.save(Path(out_dir), overwrite)
        return self.report

    def evaluate(self, reference: str | Path, resolution: int = 256) -> MeshEvalReport:
        """Held-out PSNR/SSIM and surface scores against a reference mesh, in the run's frame (as
        ``microdreamer eval`` scores a saved mesh; an unsaved one is written to a temporary folder first)."""
        if self.report is not None:
            return evaluate_mesh(Path(self.report.outputs[0]), Path(reference), self.device, resolution=resolution)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(self.mesh.save(Path(tmp)).outputs[0])
            return evaluate_mesh(path, Path(reference), self.device, resolution=resolution)


class _Observer(BatchObserver):
    """Batch progress → :class:`Progress` events."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback

    def loading(self, active: bool) -> None:
        if self.callback is not None:
            self.callback(Progress("load", 0 if active else 1, 1))

    def step(self, done: int, total: int, info: str) -> None:
        if self.callback is not None:
            self.callback(Progress("mesh" if info.startswith("mesh: ") else "sir", done, total, info))


class Pipeline:
    """One configured run, its teacher loaded once (on first use) and kept for every input after."""

    def __init__(self, config: RunConfig, *, allow_download: bool = True) -> None:
        config.validate()
        self.entry = check_teacher_config(config)  # what the teacher needs, checked before it loads
        self.config = config
        self.device = resolve_device(config.device)
        representation_entry(config.representation).check(config, self.device)  # e.g. --backend gsplat on a CPU
        self.allow_download = allow_download
        self._runner: ImageTo3D | None = None

    @classmethod
    def from_preset(cls, preset: str | None = None, *, teacher: str | None = None,
                    overrides: dict[str, Any] | None = None, allow_download: bool = True, **settings: Any) -> "Pipeline":
        """``preset`` (default: the teacher's own), then ``overrides`` (nested config keys, as in a TOML
        config), then ``settings`` (the command line's option names)."""
        return cls(resolve_config(teacher, preset, None, overrides=overrides, **settings), allow_download=allow_download)

    @classmethod
    def from_config(cls, path: str | Path, *, teacher: str | None = None, preset: str | None = None,
                    overrides: dict[str, Any] | None = None, allow_download: bool = True, **settings: Any) -> "Pipeline":
        """A TOML config or an earlier run's ``<stem>.json`` (which reproduces that run), then ``overrides``
        and ``settings`` as in :meth:`from_preset`."""
        return cls(resolve_config(teacher, preset, path, overrides=overrides, **settings), allow_download=allow_download)

    @property
    def inputs(self) -> str:
        """What the teacher reads: ``image``, ``image+text`` or ``text``."""
        return self.entry.inputs

    def load(self, on_progress: ProgressCallback | None = None) -> ImageTo3D:
        """The loaded teacher (loads it the first time)."""
        if self._runner is None:
            if on_progress is not None:
                on_progress(Progress("load", 0, 1))
            self._runner = load_runner(self.config, self.device, self.allow_download)
            if on_progress is not None:
                on_progress(Progress("load", 1, 1))
        return self._runner

    def check_prompt(self, prompt: str | None) -> None:
        """An image teacher takes no prompt; an image+text teacher an optional one, not blank."""
        if self.inputs == "text":
            raise UserError(f"teacher '{self.config.teacher.name}' generates from text alone: use "
                            f"{_command(True, False, self.config.representation)} PROMPT")
        if prompt is not None and self.inputs != "image+text":
            raise UserError(f"--prompt needs an image+text teacher (imagedream); '{self.config.teacher.name}' "
                            "reads only the image")
        if prompt is not None and not prompt.strip():
            raise UserError("empty prompt: leave --prompt out, or describe the object")

    def prepare(self, image: str | Path | np.ndarray | None = None, *, prompt: str | None = None,
                preprocess: PreprocessOptions | None = None, stem: str | None = None) -> PreparedInput:
        """An input ready to run: an image file or an ``[H,W,4]``/``[H,W,3]`` uint8 array, masked, recentred and
        rescaled; None for the reference teacher's own front view or a text run."""
        options = preprocess or PreprocessOptions()
        if self.inputs == "text":
            if image is not None:
                raise UserError(f"teacher '{self.config.teacher.name}' generates from text alone: use text_to_3d")
            if prompt is None:
                raise UserError("a text run needs a prompt")
            return PreparedInput(stem or prompt_stem(prompt), prompt=prompt)
        self.check_prompt(prompt)
        if image is None:
            if self.config.teacher.name != "reference":
                raise UserError(f"teacher '{self.config.teacher.name}' needs an input image")
            return PreparedInput(stem or front_view_stem(self.config), prompt=prompt)
        if isinstance(image, np.ndarray):
            return PreparedInput(stem or "image", None, ImagePreparer(options).prepare(_as_rgba(image)), prompt)
        path = Path(image)
        if not path.is_file():
            raise UserError(f"input image not found: {path}")
        return PreparedInput(stem or path.stem, path, ImagePreparer(options)(path), prompt)

    def image_to_3d(
        self,
        image: str | Path | np.ndarray | None = None,
        *,
        prompt: str | None = None,
        preprocess: PreprocessOptions | None = None,
        video: VideoOptions | None = None,
        stem: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ReconstructionResult:
        """Image (file or array; None: the reference teacher's front view) → 3D Gaussians or a NeRF, in memory.
        The input is checked and preprocessed before the teacher loads."""
        prepared = self.prepare(image, prompt=prompt, preprocess=preprocess, stem=stem)
        return self._reconstruct(prepared, preprocess, video, on_progress)

    def text_to_3d(
        self,
        prompt: str,
        *,
        video: VideoOptions | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ReconstructionResult:
        """Prompt → 3D Gaussians or a NeRF with a text teacher (mvdream), in memory."""
        if self.inputs != "text":
            raise UserError(f"text_to_3d needs a text-to-3D teacher (mvdream), not '{self.config.teacher.name}'")
        return self._reconstruct(self.prepare(prompt=prompt), None, video, on_progress)

    def _reconstruct(self, prepared: PreparedInput, preprocess: PreprocessOptions | None,
                     video: VideoOptions | None, on_progress: ProgressCallback | None) -> ReconstructionResult:
        runner = self.load(on_progress)
        iteration = None if on_progress is None else (
            lambda log, total: on_progress(Progress("sir", log.iteration + 1, total, describe_iteration(log))))
        return ReconstructionResult(runner.reconstruct(prepared, iteration, preprocess=preprocess, video=video))

    def to_mesh(self, result: ReconstructionResult, *, on_progress: ProgressCallback | None = None) -> MeshResult:
        """The textured mesh of ``result`` (settings in ``config.mesh``), its texture refined by this
        pipeline's teacher conditioned as in the run."""
        runner = self.load(on_progress)
        on_stage = None if on_progress is None else (
            lambda stage: on_progress(Progress("mesh", STAGES.index(stage), len(STAGES), stage)))
        r = result.reconstruction
        return MeshResult(runner.make_mesh(r.input, r.model, on_stage), self.device)

    def run_batch(
        self,
        inputs: Sequence[str | Path],
        out_dir: str | Path,
        *,
        mesh: bool = False,
        prompt: str | None = None,
        config_file: str | Path | None = None,
        preprocess: PreprocessOptions | None = None,
        video: VideoOptions | None = None,
        overwrite: bool = False,
        skip_existing: bool = False,
        manifest: str | Path | None = None,
        stop_on_error: bool | None = None,
        observer: BatchObserver | None = None,
        on_progress: ProgressCallback | None = None,
        command: str | None = None,
        executor: Executor | str | None = None,
        shard: Shard | str | None = None,
    ) -> Manifest:
        """Many inputs with the teacher loaded once (per worker); returns the manifest (also written to
        ``manifest``, default ``OUT/manifest.json`` for a batch).

        ``inputs`` are images, folders and globs (a text teacher: prompts); none means the input image of
        the run ``config_file`` reports, else the reference teacher's front view. ``mesh`` adds the textured
        mesh of each. A bad input fails its entry and the batch goes on, unless ``stop_on_error`` (default:
        a single plain input), where its error is raised. ``skip_existing`` skips finished inputs and
        resumes an image's mesh stage. ``command`` names the batch in the manifest and messages (default:
        the command line's name for it). ``executor`` runs the jobs (``"local"``, the default, ``"ray"``, or
        an executor such as :class:`~microdreamer.executors.ray.RayExecutor`); ``shard`` (``"I/N"``) runs
        only that shard of the inputs, recorded in ``manifest.shard-I-of-N.json``
        (:mod:`microdreamer.executors.shard`).
        """
        out = Path(out_dir)
        manifest = None if manifest is None else Path(manifest)
        check_run_outputs(out, manifest)
        runs_on = make_executor(executor)
        shard = _as_shard(shard)
        text = self.inputs == "text"
        command = command or _command(text, mesh, self.config.representation)
        # the tasks get no device: each resolves the config's where it runs (a Ray worker's own GPU)
        if text:
            if prompt is not None:
                raise UserError("a text teacher takes its prompts as the inputs")
            jobs = prompt_jobs([str(p) for p in inputs])
            single = _single(len(jobs) == 1, stop_on_error, shard)
            if single and jobs[0].problem is not None:
                raise UserError(jobs[0].problem)
            task_class = PromptMeshTask if mesh else PromptTask
            task = task_class(self.config, None, out, video=video, overwrite=overwrite,
                              skip_existing=skip_existing, allow_download=self.allow_download)
            ignored: list[Path] = []
        else:
            self.check_prompt(prompt)
            specs = [Path(p) for p in inputs]
            jobs = self._image_jobs(command, specs, config_file)
            single = _single(is_single_input(specs), stop_on_error, shard)
            task_class = MeshTask if mesh else ImageTask
            task = task_class(self.config, None, out, preprocess=preprocess, video=None if mesh else video,
                              overwrite=overwrite, skip_existing=skip_existing, prompt=prompt,
                              allow_download=self.allow_download)
            ignored = ignored_files(specs)
        runner = BatchRunner(
            command, out, manifest=batch_manifest_path(manifest, out, single, shard), skip_existing=skip_existing,
            single=single, observer=observer or _Observer(on_progress), ignored=ignored, executor=runs_on, shard=shard,
        )
        return runner.run(jobs, task)

    def _image_jobs(self, command: str, specs: list[Path], config_file: str | Path | None) -> list[Job]:
        """The inputs of an image batch; none means the input image of the run whose report is
        ``config_file``, else the reference teacher's own front view."""
        if specs:
            return expand_inputs(specs)
        config = None if config_file is None else Path(config_file)
        run = SavedRun.read(config)
        image = None if run is None else run.input_image(f"pass the image: microdreamer {command} IMAGE --config {config}")
        if image is not None:
            return expand_inputs([image])
        if self.config.teacher.name == "reference":
            return [Job(front_view_stem(self.config), f"front view of {self.config.teacher.model}")]
        raise UserError(f"{command} needs an input image (or --teacher reference --model MESH to use its front view)")


def _as_shard(shard: Shard | str | None) -> Shard | None:
    return Shard.parse(shard) if isinstance(shard, str) else shard


def _single(plain: bool, stop_on_error: bool | None, shard: Shard | None) -> bool:
    """Whether errors end the run: ``stop_on_error``, by default for one plain input; never for a shard (a
    part of a batch, which keeps a manifest)."""
    return shard is None and (plain if stop_on_error is None else stop_on_error)


def _command(text: bool, mesh: bool, representation: str) -> str:
    """The command line's name for a run: text2gs, image2nerf, text2mesh, …"""
    made = "mesh" if mesh else {"gaussians": "gs"}.get(representation, representation)
    return ("text2" if text else "image2") + made


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B,3,H,W]`` floats in [0,1] → ``[B,H,W,3]`` uint8."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _as_rgba(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise UserError(f"an image array must be [H,W,3] or [H,W,4] uint8, got {list(image.shape)} {image.dtype}")
    if image.shape[2] == 4:
        return image
    return np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)


# the other commands' work, for callers without a shell ----------------------------------------------


def preprocess_images(
    inputs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    options: PreprocessOptions | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    manifest: str | Path | None = None,
    stop_on_error: bool | None = None,
    observer: BatchObserver | None = None,
    executor: Executor | str | None = None,
    shard: Shard | str | None = None,
) -> Manifest:
    """Mask, recentre and rescale images → ``<stem>_rgba.png`` in ``out_dir`` (None: beside each input).
    Earlier outputs (``*_rgba.png``) in input folders are left out; the manifest defaults to
    ``OUT/manifest.json`` for a batch with ``out_dir``. ``executor`` and ``shard`` as for
    :meth:`Pipeline.run_batch`."""
    specs = [Path(p) for p in inputs]
    out = None if out_dir is None else Path(out_dir)
    jobs = expand_inputs(specs, exclude=is_preprocessed_output, unique_stems=out is not None)
    check_run_outputs(out, None if manifest is None else Path(manifest), [j.source for j in jobs if j.source is not None])
    runs_on, shard = make_executor(executor), _as_shard(shard)
    single = _single(is_single_input(specs), stop_on_error, shard)
    manifest_path = batch_manifest_path(None if manifest is None else Path(manifest), out, single, shard)
    runner = BatchRunner("preprocess", out or Path("."), manifest=manifest_path, skip_existing=skip_existing,
                         single=single, observer=observer, ignored=ignored_files(specs, exclude=is_preprocessed_output),
                         executor=runs_on, shard=shard)
    return runner.run(jobs, PreprocessTask(options or PreprocessOptions(), out, overwrite))


@dataclass
class ExportOutcome:
    report: MeshExportReport
    refined: bool  # False when nothing said which teacher the run used (no report beside it, no teacher)


def export_run(
    result: str | Path,
    out_dir: str | Path | None = None,
    *,
    config: str | Path | None = None,
    teacher: str | None = None,
    image: str | Path | None = None,
    prompt: str | None = None,
    refine: bool = True,
    overwrite: bool = False,
    on_stage: Callable[[str], None] | None = None,
    **settings: Any,
) -> ExportOutcome:
    """A saved run (a 3DGS ``.ply`` or a NeRF ``.safetensors``) → textured mesh beside it (or in ``out_dir``).
    The run's report (``config``, else the ``<stem>.json`` beside ``result``) supplies the teacher, input
    image, prompt and settings; ``settings`` (:data:`SETTINGS` names) go over it. Without a report or a
    ``teacher`` the texture is baked, not refined, with the mesh settings of the teacher's preset for the
    file's representation."""
    result = Path(result)
    if not result.is_file():
        raise UserError(f"result not found: {result}")
    config_path = None if config is None else Path(config)
    run = SavedRun.read(config_path) if config_path is not None else SavedRun.beside(result)
    config_path = config_path if run is None else run.path
    refined = refine and not (config_path is None and teacher is None)
    kind = representation_for_file(result)  # the file's, whatever a report or a setting says
    settings["representation"] = None if kind is None else kind.name
    cfg = resolve_config(teacher, None, config_path, needs_teacher=refined, **settings)
    target = Path(out_dir) if out_dir is not None else result.parent
    report = export_saved_run(
        result, cfg, resolve_device(cfg.device), target, run=run, refine=refined,
        image=None if image is None else Path(image), prompt=prompt, overwrite=overwrite, on_stage=on_stage,
    )
    return ExportOutcome(report, refined or not refine)


def evaluate(
    result: str | Path,
    reference: str | Path,
    *,
    device: str = "auto",
    radius: float = 2.0,
    resolution: int = 256,
    shading: str | None = None,
) -> EvalReport:
    """``microdreamer eval``: a 3DGS ``.ply`` or a NeRF ``.safetensors`` is scored on the 16 held-out views;
    a mesh also by its surface
    (a :class:`~microdreamer.evaluate.MeshEvalReport`). The reference is rendered ``shading`` (lit or
    albedo; default: the mode the run's report names, else lit), albedo PSNR reported apart."""
    result, reference = Path(result), Path(reference)
    if not result.is_file():
        raise UserError(f"result not found: {result}")
    score = evaluate_model if saved_representation(result) is not None else evaluate_mesh
    return score(result, reference, resolve_device(device), radius=radius, resolution=resolution, shading=shading)


def evaluate_clip(
    result: str | Path,
    clip_model: str | Path,
    *,
    image: str | Path | None = None,
    prompt: str | None = None,
    device: str = "auto",
    radius: float | None = None,
    resolution: int = CLIP_RESOLUTION,
    allow_download: bool = True,
) -> ClipEvalReport:
    """``microdreamer eval --protocol clip``: MicroDreamer's CLIP similarity of a saved result (Gaussians, mesh)
    to ``image`` or ``prompt``, by default to what its run report names (:mod:`microdreamer.evaluate_clip`);
    ``clip_model`` a transformers CLIP folder or Hugging Face id, ``radius`` replaces the run's distance."""
    result = Path(result)
    if not result.is_file():
        raise UserError(f"result not found: {result}")
    return score_result(result, clip_model, resolve_device(device), image=image, prompt=prompt, radius=radius,
                        resolution=resolution, allow_download=allow_download)


def evaluate_geco(
    result: str | Path,
    reference: str | Path,
    *,
    lpips_vgg: str | Path | None = None,
    lpips_heads: str | Path | None = None,
    device: str = "auto",
    radius: float = 2.0,
    resolution: int = 256,
    shading: str | None = None,
) -> GECOEvalReport:
    """``microdreamer eval --protocol geco``: GECO's PSNR, SSIM and (given both LPIPS files) LPIPS of a saved
    result against its reference mesh on the six Zero123++ views and 15 azimuths at elevation 0
    (:mod:`microdreamer.evaluate_geco`). Files are checked and the LPIPS weights read before anything renders."""
    from .evaluate_geco import evaluate_geco as score
    from .metrics_lpips import LPIPS, WEIGHTS_HELP

    result, reference = Path(result), Path(reference)
    if not result.is_file():
        raise UserError(f"result not found: {result}")
    if not reference.is_file():
        raise UserError(f"reference mesh not found: {reference}")
    if (lpips_vgg is None) != (lpips_heads is None):
        raise UserError(f"LPIPS needs both --lpips-vgg and --lpips-heads ({WEIGHTS_HELP}); give both, or neither "
                        "for PSNR and SSIM alone")
    lpips = None if lpips_vgg is None else LPIPS.from_files(lpips_vgg, lpips_heads)
    return score(result, reference, resolve_device(device), lpips=lpips, radius=radius, resolution=resolution,
                 shading=shading)


def render_video(
    result: str | Path,
    target: str | Path,
    *,
    options: VideoOptions,
    elevation: float = 0.0,
    radius: float = 2.0,
    fovy: float = 49.1,
    azimuth: float = 0.0,
    normalize: bool = True,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """A turntable video (mp4 or gif, by ``target``'s suffix) of a saved 3DGS ``.ply``, NeRF or mesh."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists: pass --overwrite to replace it, or choose another --video")
    draw = result_renderer(Path(result), resolve_device(device), normalize=normalize)
    cameras = turntable_cameras(options.frames, elevation, radius, options.resolution or 512, fovy,
                                start_azimuth=azimuth)
    return write_video(target, render_frames(draw, cameras), options.fps)


#: the bundled CC0 mesh :func:`selftest` reconstructs
SELFTEST_MESH = Path(__file__).resolve().parent / "assets" / "spot" / "spot.obj"


@dataclass
class SelftestOutcome:
    report: RunReport
    scores: EvalReport
    device: torch.device


def selftest(
    out_dir: str | Path | None = None,
    *,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> SelftestOutcome:
    """Reconstruct the bundled Spot cow from its front view with the reference teacher (default preset) and
    score it on the 16 held-out views; the outputs go to ``out_dir`` (default: a temporary folder)."""
    pipe = Pipeline.from_preset(teacher="reference", model=str(SELFTEST_MESH), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        result = pipe.image_to_3d(on_progress=on_progress)
        report = result.save(Path(out_dir) if out_dir is not None else Path(tmp), overwrite=True)
        if on_progress is not None:
            on_progress(Progress("score", 0, 1, f"scoring {HELD_OUT_VIEWS} held-out views"))
        scores = evaluate_model(Path(report.outputs["ply"]), SELFTEST_MESH, pipe.device,
                                    shading=pipe.config.teacher.shading)
    return SelftestOutcome(report, scores, pipe.device)
