"""One run from an input to files on disk: preprocess → teacher → representation → SIR → export → report.

``ImageTo3D`` loads the teacher once and can then run many inputs; ``ImageTask`` plugs it into the batch
runner (:mod:`microdreamer.batch`): inputs are loaded and preprocessed before the teacher is loaded, so a
bad image fails without waiting for a model. The feed-forward path (``method = "lgm"``, and SIR's
``init = "lgm"`` start) lives in :mod:`microdreamer.feedforward`; :func:`load_runner` picks the runner.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import platform
import time
import unicodedata
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .batch import Job, JobResult, StepCallback
from .config import FEEDFORWARD_METHODS, RECORDED_PATHS, RunConfig, read_config_file
from .errors import UserError, about_input
from .export import STAGES, MeshExportReport, StageCallback, TexturedMesh, export_mesh, make_mesh, mesh_output_paths
from .io.atomic import atomic_path
from .io.images import image_grid, load_image, save_image, to_reference
from .io.provenance import FileRef, record_path
from .preprocess import MODES, has_alpha, load_input, new_rembg_session, preprocess, preprocessed_path
from .representations.base import Representation
from .representations.registry import representation_entry, representation_for_file
from .sir.cameras import Cameras, camera_sampler, turntable
from .sir.engine import IterationLog, ProgressCallback, Reference, SIREngine
from .teachers.base import Condition, Teacher
from .teachers.registry import fetch_weights, run_entry, teacher_entry
from .video import VideoOptions, encode_video, render_frames, turntable_cameras
from .wording import plural


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


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory` (CUDA only: the process's resident peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: on CUDA what torch allocated and reserved on the GPU since the last
    :func:`reset_peak_memory`; on every device the process's peak resident set since it started."""
    peak: dict[str, float] = {}
    if device.type == "cuda":
        peak["gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        peak["gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    try:
        import resource
    except ImportError:  # Windows
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak["process_rss_gib"] = round(rss / (2**30 if platform.system() == "Darwin" else 2**20), 3)
    return peak


@dataclass(frozen=True)
class PreprocessOptions:
    """How an input image becomes the reference view (see :func:`microdreamer.preprocess.preprocess`)."""

    border_ratio: float = 0.2
    remove_background: str = "auto"  # auto | rembg | uniform (--no-rembg) | none
    size: int = 256

    def __post_init__(self) -> None:
        if self.remove_background not in MODES:
            raise UserError(f"unknown background removal '{self.remove_background}' (use {', '.join(MODES)})")
        if not 0.0 <= self.border_ratio < 1.0:
            raise UserError(f"--border-ratio must lie in [0, 1), got {self.border_ratio:g}")
        if not 16 <= self.size <= 4096:
            raise UserError(f"--size (the preprocessed image's side) must lie in 16..4096, got {self.size}")

    @classmethod
    def resolve(cls, config_file: Path | None = None, **flags: Any) -> "PreprocessOptions":
        """Defaults < the ``preprocess`` entry of a run's JSON report given as ``--config`` < flags (None = unset)."""
        values: dict[str, Any] = {}
        run = SavedRun.read(config_file)
        if run is not None:
            saved = run.data.get("preprocess") or {}
            names = {f.name for f in dataclasses.fields(cls)}
            values.update({k: v for k, v in saved.items() if k in names})
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)


class ImagePreparer:
    """Loads and preprocesses input images; one rembg session serves a whole batch."""

    def __init__(self, options: PreprocessOptions) -> None:
        self.options = options
        self._session: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (sent to a remote worker) without the rembg session, which the worker opens anew."""
        return {**self.__dict__, "_session": None}

    def __call__(self, path: Path) -> np.ndarray:
        rgba = load_input(path, self.options.size)
        with about_input(path):
            return self.prepare(rgba)

    def prepare(self, rgba: np.ndarray) -> np.ndarray:
        """A decoded ``[H,W,4]`` uint8 image → the preprocessed reference view."""
        o = self.options
        wants_rembg = o.remove_background == "rembg" or (
            o.remove_background == "auto" and not has_alpha(rgba) and importlib.util.find_spec("rembg") is not None
        )
        if wants_rembg and self._session is None:
            self._session = new_rembg_session()
        return preprocess(
            rgba, border_ratio=o.border_ratio, size=o.size, remove_background=o.remove_background,
            rembg_session=self._session,
        )


@dataclass
class PreparedInput:
    """An input ready to run: its preprocessed RGBA image (None for a text run or the teacher's own front
    view) and its prompt (text and image+text teachers)."""

    stem: str
    source: Path | None = None
    rgba: np.ndarray | None = None
    prompt: str | None = None


@dataclass
class RunOutputs:
    model: Path  # the representation's file: <stem>.ply (Gaussians) or <stem>.safetensors (NeRF)
    views: Path
    report: Path
    rgba: Path | None = None  # the preprocessed input image, when there is one
    video: Path | None = None
    model_key: str = "ply"  # the model file's name in reports (the representation's ``output``)

    @classmethod
    def for_stem(
        cls, out_dir: Path, stem: str, *, rgba: bool = False, video_format: str | None = None,
        representation: str = "gaussians",
    ) -> "RunOutputs":
        entry = representation_entry(representation)
        return cls(
            out_dir / f"{stem}{entry.suffix}", out_dir / f"{stem}_views.png", out_dir / f"{stem}.json",
            out_dir / f"{stem}_rgba.png" if rgba else None,
            out_dir / f"{stem}_turntable.{video_format}" if video_format else None,
            entry.output,
        )

    def named(self) -> dict[str, Path]:
        files = {k: v for k, v in self.__dict__.items() if isinstance(v, Path)}
        return {self.model_key if k == "model" else k: v for k, v in files.items()}

    def all(self) -> list[Path]:
        return list(self.named().values())


@dataclass
class RunReport:
    """``<stem>.json``: what a run did. The input image, and the model when it is a file or folder, are
    :class:`~microdreamer.io.provenance.FileRef` records, so the report still finds them after the run
    folder has moved (:class:`SavedRun`)."""

    stem: str
    input: dict[str, str | None] | None  # a FileRef
    seed: int
    config: dict[str, Any]
    preprocess: dict[str, Any] | None
    timings: dict[str, float]
    evaluations: dict[str, int]
    primitives: int
    optimisation_steps: int
    iterations: list[dict[str, Any]]
    versions: dict[str, str]
    outputs: dict[str, str] = field(default_factory=dict)
    prompt: str | None = None
    peak_memory: dict[str, float] = field(default_factory=dict)  # see peak_memory()
    cleanup: dict[str, int] = field(default_factory=dict)  # Gaussians removed after training, by step
    teacher_mode: str | None = None  # the reference teacher's shading and imperfection level

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def report_config(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """``cfg`` as a report in ``run_dir`` stores it: each :data:`~microdreamer.config.RECORDED_PATHS` file or
    folder (a model, LGM weights, a GECO run) as a FileRef."""
    config = cfg.to_dict()
    for table, key, _, _ in RECORDED_PATHS:
        config[table][key] = record_path(config[table][key], run_dir)
    return config


@dataclass(frozen=True)
class SavedRun:
    """A run's JSON report read back (``--config RUN.json``, ``export RUN.ply``/``RUN.safetensors``). The
    files it names are looked for relative to its folder first, then where they were, and checked against
    their hashes."""

    path: Path
    data: dict[str, Any]

    @classmethod
    def read(cls, path: Path | None) -> "SavedRun | None":
        """The JSON file at ``path``; None without a path or for a TOML config."""
        if path is None or path.suffix != ".json":
            return None
        read_config_file(path)  # one-line errors for a missing or unparsable file
        data = json.loads(path.read_text())
        return cls(path, data if isinstance(data, dict) else {})

    @classmethod
    def beside(cls, result: Path) -> "SavedRun | None":
        """The report of the run that wrote ``result``, or whose export wrote it: ``<stem>.json`` beside it
        (for an exported ``<stem>_mesh.ply`` too), holding a ``config``."""
        result = Path(result)
        names = (result.with_suffix(".json"), result.with_name(f"{result.stem.removesuffix('_mesh')}.json"))
        for path in dict.fromkeys(names):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and isinstance(data.get("config"), dict):
                return cls(path, data)
        return None

    @property
    def prompt(self) -> str | None:
        prompt = self.data.get("prompt")
        return prompt if isinstance(prompt, str) else None

    def input_image(self, fix: str) -> Path | None:
        """The run's input image; None for a run without one (a prompt, a front view). ``fix`` says what to do
        when it is gone or changed."""
        value = self.data.get("input")
        if value is None:
            return None
        return FileRef.from_json(value).resolve(self.path.parent, "the run's input image", fix)


def check_outputs_free(outputs: list[Path], overwrite: bool) -> None:
    """Refuse to replace outputs without ``overwrite``; ``--skip-existing`` is offered only where it would
    keep them all (a job is skipped when every output exists)."""
    taken = [p for p in outputs if p.exists()]
    if taken and not overwrite:
        keep = "--skip-existing to keep it, " if len(taken) == len(outputs) else ""
        raise UserError(f"{taken[0]} already exists: pass --overwrite to replace it, {keep}or choose another --out")


@dataclass
class Reconstruction:
    """One finished SIR run in memory (:meth:`ImageTo3D.reconstruct`); :meth:`save` writes its files."""

    cfg: RunConfig
    device: torch.device
    input: PreparedInput
    preprocess: PreprocessOptions
    model: Representation  # what SIR optimised (cfg.representation)
    views: torch.Tensor  # [8,3,H,W] the contact sheet: 8 views around the object at elevation 0
    frames: np.ndarray | None  # turntable frames, with ``video``
    video: VideoOptions | None
    timings: dict[str, float]
    evaluations: dict[str, int]
    optimisation_steps: int
    iterations: list[dict[str, Any]]
    teacher_mode: str | None = None  # what the teacher's targets were (the reference teacher: lit/albedo, imperfection)

    def outputs(self, out_dir: Path) -> RunOutputs:
        return RunOutputs.for_stem(
            Path(out_dir), self.input.stem, rgba=self.input.rgba is not None,
            video_format=self.video.format if self.video else None, representation=self.cfg.representation,
        )

    def save(self, out_dir: Path, overwrite: bool = False) -> RunReport:
        """Write ``<stem>.ply`` (a NeRF: ``.safetensors``), ``<stem>_views.png``, ``<stem>.json`` (and ``<stem>_rgba.png``,
        ``<stem>_turntable.*``) into ``out_dir``: all appear together, once all of them are complete."""
        out_dir = Path(out_dir)
        outputs = self.outputs(out_dir)
        check_outputs_free(outputs.all(), overwrite)
        start = time.perf_counter()
        timings = dict(self.timings)
        prepared = self.input
        with ExitStack() as stack:
            tmp = {name: stack.enter_context(atomic_path(path)) for name, path in outputs.named().items()}
            self.model.save(tmp[outputs.model_key])
            save_image(tmp["views"], image_grid(self.views, cols=4))
            if outputs.rgba is not None:
                save_image(tmp["rgba"], prepared.rgba)
            if self.frames is not None:
                assert self.video is not None
                encode_video(tmp["video"], self.frames, self.video.fps, self.video.format)
            timings["export"] = timings.get("export", 0.0) + time.perf_counter() - start
            report = RunReport(
                stem=prepared.stem,
                input=None if prepared.source is None else FileRef.record(prepared.source, out_dir).to_dict(),
                seed=self.cfg.seed,
                config=report_config(self.cfg, out_dir),
                preprocess=dataclasses.asdict(self.preprocess) if prepared.rgba is not None else None,
                timings={k: round(v, 4) for k, v in timings.items()},
                evaluations=dict(self.evaluations),
                primitives=self.model.num_primitives,
                optimisation_steps=self.optimisation_steps,
                iterations=self.iterations,
                versions=versions(self.device),
                outputs={name: str(path) for name, path in outputs.named().items()},
                prompt=prepared.prompt,
                peak_memory=peak_memory(self.device),
                cleanup=getattr(self.model, "cleanup", {}),
                teacher_mode=self.teacher_mode,
            )
            tmp["report"].write_text(report.to_json())
        return report


def load_runner(cfg: RunConfig, device: torch.device, allow_download: bool = True) -> "ImageTo3D":
    """The loaded models of a run: SIR's (:class:`ImageTo3D`), or for ``method = "lgm"`` or ``"geco"`` the
    feed-forward path's (:class:`~microdreamer.feedforward.LGMTo3D`)."""
    if cfg.method in FEEDFORWARD_METHODS:
        from .feedforward import LGMTo3D

        return LGMTo3D(cfg, device, allow_download)
    return ImageTo3D(cfg, device, allow_download)


class ImageTo3D:
    """Image (or a reference mesh's front view), or a prompt → the configured representation (3D Gaussians,
    a NeRF), with the teacher loaded once (and, for ``init = "lgm"``, LGM with it)."""

    def __init__(self, cfg: RunConfig, device: torch.device, allow_download: bool = True) -> None:
        self.cfg = cfg
        self.device = device
        start = time.perf_counter()
        entry = run_entry(cfg)
        self.text_only = entry.inputs == "text"  # no reference image, no reference view
        # None: a multi-view generator that is no teacher (it only makes LGM's views)
        self.teacher: Teacher | None = entry.build(cfg, device, allow_download) if entry.sir else None
        self.feedforward = None
        if cfg.feedforward:
            from .feedforward import FeedForward

            self.feedforward = FeedForward(cfg, device, allow_download, self.teacher)
        self.load_seconds = time.perf_counter() - start
        self._load_reported = False

    def load_timing(self) -> dict[str, float]:
        """``{"load_teacher": seconds}`` the first time it is asked for after loading, then nothing."""
        timing = {} if self._load_reported else {"load_teacher": self.load_seconds}
        self._load_reported = True
        return timing

    def reference_view(self, prepared: PreparedInput) -> Reference:
        """The input image and its camera; without an image, the reference teacher's front render."""
        c = self.cfg.cameras
        camera = camera_sampler(c).reference(self.teacher.reference_azimuth).to(self.device)
        if prepared.rgba is not None:
            rgb, mask = to_reference(prepared.rgba, c.resolution, self.cfg.background)
        else:
            front = getattr(self.teacher, "front_image", None)
            if front is None:
                raise UserError(f"teacher '{self.cfg.teacher.name}' needs an input image")
            rgb, mask = front(camera)
        return Reference(rgb.to(self.device), mask.to(self.device), camera)

    def run(
        self,
        image: PreparedInput | Path | None,
        out_dir: Path,
        overwrite: bool = False,
        on_iteration: ProgressCallback | None = None,
        *,
        preprocess: PreprocessOptions | None = None,
        video: VideoOptions | None = None,
    ) -> RunReport:
        """Reconstruct one input and write ``<stem>.ply`` (a NeRF: ``.safetensors``), ``<stem>_views.png``, ``<stem>.json`` (plus
        ``<stem>_rgba.png`` for an image input and ``<stem>_turntable.*`` with ``video``), all at once."""
        preprocess = preprocess or PreprocessOptions()
        prepared = image if isinstance(image, PreparedInput) else prepare_input(image, self.cfg, preprocess)
        check_outputs_free(RunOutputs.for_stem(
            out_dir, prepared.stem, rgba=prepared.rgba is not None, video_format=video.format if video else None,
            representation=self.cfg.representation,
        ).all(), overwrite)
        result = self.reconstruct(prepared, on_iteration, preprocess=preprocess, video=video)
        return result.save(out_dir, overwrite)

    def reconstruct(
        self,
        prepared: PreparedInput,
        on_iteration: ProgressCallback | None = None,
        *,
        preprocess: PreprocessOptions | None = None,
        video: VideoOptions | None = None,
    ) -> "Reconstruction":
        """Run SIR on one prepared input; nothing is written (see :meth:`Reconstruction.save`)."""
        timings = self.load_timing()  # reported once, by the first run after loading
        reset_peak_memory(self.device)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        start_state = None  # init = "lgm" / "geco": LGM's Gaussians, made before the teacher is prepared for SIR
        made: dict[str, int] = {}  # ... and the evaluations that made their views (the teacher's or a generator's)
        if self.feedforward is not None:
            start_state, made = self.feedforward(prepared, generator, timings)
        before = self.teacher.evaluations.as_dict()
        start = time.perf_counter()
        reference = None if self.text_only else self.reference_view(prepared)
        condition = Condition(
            image=None if reference is None else reference.rgb,
            mask=None if reference is None else reference.mask,
            prompt=prepared.prompt,
            negative_prompt=self.cfg.guidance.negative_prompt,
            elevation=self.cfg.cameras.elevation,
        )
        self.teacher.prepare(condition, generator)
        w = self.cfg.loss
        if not (w.reference_rgb or w.reference_mask):  # no reference-view terms: the view is not rendered
            reference = None
        timings["preprocess"] = time.perf_counter() - start

        start = time.perf_counter()
        model = representation_entry(self.cfg.representation).build(self.cfg, self.device, generator, start_state)
        engine = SIREngine(
            self.teacher, model, self.cfg, generator, self.device, reference=reference, on_iteration=on_iteration
        )
        result = engine.run()
        timings["sir"] = time.perf_counter() - start
        timings.update({f"sir.{k}": v for k, v in result.timings.items()})
        after = self.teacher.evaluations.as_dict()
        evaluations = {k: after[k] - before[k] for k in after}
        if start_state is not None:
            from .feedforward import with_lgm

            evaluations = with_lgm({k: evaluations[k] + made.get(k, 0) for k in evaluations})
        views, frames = self.renders(model, video, self.teacher.reference_azimuth, timings)
        return Reconstruction(
            self.cfg, self.device, prepared, preprocess or PreprocessOptions(), model, views, frames, video,
            timings, evaluations, result.optimisation_steps,
            [log.__dict__ for log in result.iterations], getattr(self.teacher, "mode", None),
        )

    def renders(self, model: Representation, video: VideoOptions | None, front: float,
                timings: dict[str, float]) -> tuple[torch.Tensor, np.ndarray | None]:
        """The contact sheet ``[8,3,H,W]`` (8 views around the object at elevation 0, on the CPU) and, with
        ``video``, the turntable frames from azimuth ``front``; their time goes to ``timings["export"]``."""
        start = time.perf_counter()
        c = self.cfg.cameras
        background = torch.tensor(self.cfg.background, device=self.device)
        sheet_cams = sheet_cameras(self.cfg).to(self.device)
        with torch.no_grad():
            views = model.render(sheet_cams, background).rgb
        frames = None
        if video is not None:
            video_cams = turntable_cameras(
                video.frames, c.elevation, c.radius, video.resolution or c.resolution, c.fovy, start_azimuth=front,
            ).to(self.device)
            frames = render_frames(lambda cams: model.render(cams, background).rgb, video_cams)
        timings["export"] = time.perf_counter() - start
        return views.cpu(), frames

    def export_mesh(
        self,
        prepared: PreparedInput,
        model: Representation,
        out_dir: Path,
        overwrite: bool = False,
        on_stage: StageCallback | None = None,
    ) -> MeshExportReport:
        """:meth:`make_mesh`, written to ``out_dir`` (outputs checked before any work)."""
        check_outputs_free(mesh_output_paths(Path(out_dir), prepared.stem, self.cfg.mesh.format), overwrite)
        return self.make_mesh(prepared, model, on_stage).save(out_dir, overwrite)

    def make_mesh(
        self, prepared: PreparedInput, model: Representation, on_stage: StageCallback | None = None
    ) -> TexturedMesh:
        """The textured mesh of ``model`` (a run on ``prepared``), its texture refined with this teacher
        conditioned as in the run (and on the reference view when the run's loss used it); baked only
        without refinement steps or a teacher."""
        if self.teacher is None or not self.cfg.mesh.refine_steps:
            return make_mesh(model, prepared.stem, self.cfg, None, None, self.device, on_stage=on_stage)
        reference = None if self.text_only else self.reference_view(prepared)
        self.teacher.prepare(
            Condition(
                image=None if reference is None else reference.rgb,
                mask=None if reference is None else reference.mask,
                prompt=prepared.prompt,
                negative_prompt=self.cfg.guidance.negative_prompt,
                elevation=self.cfg.cameras.elevation,
            ),
            torch.Generator().manual_seed(self.cfg.seed),
        )
        if not self.cfg.loss.reference_rgb:
            reference = None
        return make_mesh(model, prepared.stem, self.cfg, self.teacher, reference, self.device, on_stage=on_stage)


def sheet_cameras(cfg: RunConfig) -> Cameras:
    """The 8 views of ``<stem>_views.png``: around the object at elevation 0 from azimuth −180°, as the run's
    reference camera (distance, fov, resolution)."""
    c = cfg.cameras
    return turntable(8, 0.0, c.radius, c.resolution, c.fovy, offset=-180.0)


def front_view_stem(cfg: RunConfig) -> str:
    """Outputs of a run on the reference teacher's own front view are named after its mesh."""
    return Path(cfg.teacher.model or "reference").stem


def prompt_stem(prompt: str, limit: int = 60) -> str:
    """Output stem of a prompt: its words (letters, digits and marks of any script, lower-cased) joined by
    ``_``, at most ``limit`` characters; quotes, slashes, dots and other punctuation are dropped."""
    text = unicodedata.normalize("NFC", prompt)
    if not text.strip():
        raise UserError("empty prompt: give a text prompt describing the object")
    kept = "".join(c if unicodedata.category(c)[0] in "LNM" else " " for c in text)
    return "_".join(kept.lower().split())[:limit].strip("_") or "prompt"


def prompt_jobs(prompts: list[str]) -> list[Job]:
    """One job per prompt, named by :func:`prompt_stem`; an empty prompt or a repeated stem fails its job."""
    jobs, owners = [], {}
    for prompt in prompts:
        try:
            stem = prompt_stem(prompt)
        except UserError as error:
            jobs.append(Job("prompt", prompt, None, str(error)))
            continue
        problem = None
        if stem in owners:
            problem = f"prompt {prompt!r} would write the same outputs as {owners[stem]!r} ('{stem}'); reword one"
        else:
            owners[stem] = prompt
        jobs.append(Job(stem, prompt, None, problem))
    return jobs


def prepare_input(image: Path | None, cfg: RunConfig, options: PreprocessOptions) -> PreparedInput:
    """One input without a batch: load and preprocess ``image``, or stand for the teacher's front view."""
    if image is None:
        return PreparedInput(front_view_stem(cfg))
    return PreparedInput(image.stem, image, ImagePreparer(options)(image))


def describe_iteration(log: IterationLog) -> str:
    """One short line for progress: what the SIR iteration refined from, its loss and its wall time."""
    if log.loss is None:  # init_steps 0: the run starts from given Gaussians (init = "lgm")
        return f"SIR init skipped (no init steps), {log.seconds:.1f} s"
    where = "init (from noise)" if log.t2 is None else f"t2={log.t2} t1={log.t1}"
    return f"SIR {where} loss={log.loss:.0f}, {log.seconds:.1f} s"


class ImageTask:
    """The batch task of the image commands (:class:`microdreamer.batch.BatchTask`) for ``ImageTo3D``.

    A job without a source runs on the reference teacher's own front view (kept out of preprocessing).
    With ``skip_existing`` what earlier runs finished is kept: the batch runner skips finished jobs, and
    :class:`MeshTask` resumes a job at its mesh stage.
    """

    def __init__(
        self,
        cfg: RunConfig,
        device: torch.device | None,
        out_dir: Path,
        *,
        preprocess: PreprocessOptions | None = None,
        video: VideoOptions | None = None,
        overwrite: bool = False,
        skip_existing: bool = False,
        allow_download: bool = True,
        prompt: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.prompt = prompt  # for image+text teachers, the same for every image
        self._device = device  # None: cfg.device, resolved on the machine the task runs on
        self.out_dir = Path(out_dir)
        self.preprocess = preprocess or PreprocessOptions()
        self.video = video
        self.overwrite = overwrite
        self.skip_existing = skip_existing
        self.allow_download = allow_download
        self.preparer = ImagePreparer(self.preprocess)

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else resolve_device(self.cfg.device)

    @property
    def device_name(self) -> str:
        return self.cfg.device if self._device is None else str(self._device)

    def _outputs(self, job: Job) -> RunOutputs:
        return RunOutputs.for_stem(
            self.out_dir, job.stem, rgba=job.source is not None,
            video_format=self.video.format if self.video else None, representation=self.cfg.representation,
        )

    def outputs(self, job: Job) -> list[Path]:
        return self._outputs(job).all()

    def prepare(self, job: Job) -> PreparedInput:
        check_outputs_free(self._outputs(job).all(), self.overwrite)
        return self._input(job)

    def _input(self, job: Job, rgba: np.ndarray | None = None) -> PreparedInput:
        """The job's input, its image preprocessed (or ``rgba``: what a run on it saved as ``<stem>_rgba.png``)."""
        if job.source is None:
            return PreparedInput(job.stem, prompt=self.prompt)
        return PreparedInput(job.stem, job.source, self.preparer(job.source) if rgba is None else rgba, self.prompt)

    def fetch(self) -> None:
        fetch_weights(self.cfg, self.allow_download)
        if self.cfg.feedforward:
            from .feedforward import fetch_reconstructor

            fetch_reconstructor(self.cfg, self.allow_download)

    def load(self) -> ImageTo3D:
        return load_runner(self.cfg, self.device, self.allow_download)

    def run(self, pipeline: ImageTo3D, job: Job, prepared: PreparedInput, progress: StepCallback) -> JobResult:
        report = pipeline.run(
            prepared, self.out_dir, self.overwrite,
            on_iteration=lambda log, total: progress(log.iteration + 1, total, describe_iteration(log)),
            preprocess=self.preprocess, video=self.video,
        )
        return JobResult(
            outputs=report.outputs, seed=report.seed, config=report.config, timings=report.timings,
            evaluations=report.evaluations, peak_memory=report.peak_memory,
            note=f"{plural(report.primitives, representation_entry(self.cfg.representation).primitive)}, "
                 f"{_stage_seconds(report.timings)}, "
                 f"{plural(report.evaluations['total'], 'network evaluation')}" + _gpu_note(report.peak_memory),
        )


def _stage_seconds(timings: dict[str, float]) -> str:
    """``1.2 s views + LGM, 30.5 s SIR``: the stages a run had."""
    stages = (("lgm", "views + LGM"), ("sir", "SIR"))
    return ", ".join(f"{timings[key]:.1f} s {name}" for key, name in stages if key in timings)


def _gpu_note(peak: dict[str, float]) -> str:
    return f", peak GPU memory {peak['gpu_allocated_gib']:.1f} GiB" if "gpu_allocated_gib" in peak else ""


class PromptTask(ImageTask):
    """The batch task of the text commands: each job's input is a prompt (jobs from :func:`prompt_jobs`)."""

    def _input(self, job: Job, rgba: np.ndarray | None = None) -> PreparedInput:
        return PreparedInput(job.stem, prompt=job.input)


@dataclass
class MeshInput:
    """A :class:`MeshTask` job ready to run; a job resumed at the mesh stage also holds the representation
    an earlier run saved and what that run reported."""

    input: PreparedInput
    model: Representation | None = None
    earlier: JobResult | None = None


class MeshTask(ImageTask):
    """The batch task of ``image2mesh``: :class:`ImageTask`, then the textured mesh of the trained
    representation with the same loaded teacher (``<stem>.glb`` or the ``mesh.format`` files, ``<stem>_mesh.json``).

    With ``skip_existing``, a job whose run outputs exist without its mesh (an earlier run stopped in the
    mesh stage) makes the mesh alone, from the saved PLY or NeRF, with the teacher conditioned as in that run (on
    its saved ``<stem>_rgba.png`` and prompt): the same mesh an uninterrupted run makes. That run's settings
    must be this one's, apart from the mesh export's.
    """

    def _mesh_outputs(self, job: Job) -> list[Path]:
        return mesh_output_paths(self.out_dir, job.stem, self.cfg.mesh.format)

    def outputs(self, job: Job) -> list[Path]:
        return super().outputs(job) + self._mesh_outputs(job)

    def prepare(self, job: Job) -> MeshInput:
        first, mesh = self._outputs(job).all(), self._mesh_outputs(job)  # the SIR run's stage, the mesh's
        if not self.overwrite and all(p.exists() for p in first) and not any(p.exists() for p in mesh):
            if not self.skip_existing:
                raise UserError(
                    f"{first[0]} exists without its mesh (an earlier run stopped before the mesh stage): pass "
                    "--skip-existing to make the mesh from it, --overwrite to redo the run, or choose another --out"
                )
            return self._resumed(job)
        check_outputs_free(first + mesh, self.overwrite)
        return MeshInput(self._input(job))

    def _resumed(self, job: Job) -> MeshInput:
        outputs = self._outputs(job)
        run = SavedRun.read(outputs.report)
        assert run is not None  # a .json file
        config = report_config(self.cfg, self.out_dir)
        redo = "--overwrite to redo the run, or choose another --out"
        difference = _first_difference(_run_settings(run.data.get("config")), _run_settings(config))
        if difference is not None:
            raise UserError(f"{outputs.report} holds a run with other settings ({difference}): give its settings "
                            f"(--config {outputs.report}) to make its mesh, {redo}")
        prepared = self._input(job, None if outputs.rgba is None else load_image(outputs.rgba))
        if run.prompt != prepared.prompt:
            raise UserError(f"{outputs.report} holds a run on another prompt ({run.prompt!r}, here "
                            f"{prepared.prompt!r}): give its prompt to make its mesh, {redo}")
        model = self._load(outputs.model)
        data = run.data
        earlier = JobResult(
            outputs={name: str(path) for name, path in outputs.named().items()}, seed=data.get("seed"),
            config=config, timings=dict(data.get("timings") or {}), evaluations=dict(data.get("evaluations") or {}),
            note=f"mesh stage only ({outputs.model.name} from the earlier run)",
        )
        return MeshInput(prepared, model, earlier)

    def _load(self, path: Path) -> Representation:
        return representation_entry(self.cfg.representation).load(path, self.cfg, self.device)

    def run(self, pipeline: ImageTo3D, job: Job, prepared: MeshInput, progress: StepCallback) -> JobResult:
        if prepared.earlier is None:
            result = super().run(pipeline, job, prepared.input, progress)
            model = self._load(Path(result.outputs[representation_entry(self.cfg.representation).output]))
        else:
            result, model = prepared.earlier, prepared.model
            reset_peak_memory(self.device)
            result.timings.update({f"mesh.{k}": round(v, 4) for k, v in pipeline.load_timing().items()})
        mesh = pipeline.export_mesh(
            prepared.input, model, self.out_dir, self.overwrite,
            on_stage=lambda stage: progress(STAGES.index(stage), len(STAGES), f"mesh: {stage}"),
        )
        result.outputs.update({"mesh": mesh.outputs[0], "mesh_report": mesh.outputs[-1]})
        result.timings.update({f"mesh.{k}": v for k, v in mesh.timings.items()})
        result.peak_memory = peak_memory(self.device)  # the SIR run (if any) and the mesh export together
        result.note += f"; mesh {plural(mesh.faces, 'face')} in {sum(mesh.timings.values()):.1f} s" + _gpu_note(result.peak_memory)
        return result


def _run_settings(config: Any) -> dict[str, Any]:
    """What made a run's representation: its report's config without the mesh export and the device, a model file
    or folder by its hash."""
    settings = {k: v for k, v in json.loads(json.dumps(config or {})).items() if k not in ("mesh", "device")}
    teacher = settings.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("model"), dict):
        teacher["model"] = f"sha256 {teacher['model'].get('sha256')}"
    return settings


def _first_difference(saved: Any, current: Any, key: str = "") -> str | None:
    """``"name: A there, B here"`` for the first setting where two configs differ; None when they agree."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for name in dict.fromkeys([*saved, *current]):
            found = _first_difference(saved.get(name), current.get(name), f"{key}.{name}" if key else name)
            if found is not None:
                return found
        return None
    return None if saved == current else f"{key}: {saved!r} there, {current!r} here"


class PromptMeshTask(MeshTask, PromptTask):
    """The batch task of ``text2mesh``: prompt jobs as :class:`PromptTask`, each followed by the mesh export
    of :class:`MeshTask`."""


def export_saved_run(
    result: Path,
    cfg: RunConfig,
    device: torch.device,
    out_dir: Path,
    *,
    run: SavedRun | None = None,
    refine: bool = True,
    image: Path | None = None,
    prompt: str | None = None,
    overwrite: bool = False,
    on_stage: StageCallback | None = None,
) -> MeshExportReport:
    """``microdreamer export RUN.ply --to mesh``: the textured mesh of a saved run's 3DGS PLY or NeRF
    (``.safetensors``), with the mesh settings of ``cfg``.

    With ``refine``, the run's teacher (from ``cfg``) is loaded and conditioned as in the run: on ``image``,
    else the input image that the run's report ``run`` names (found as :class:`SavedRun` finds it), prepared
    with the report's preprocessing options, and on ``prompt``, else the report's. Without, the texture is
    the bake alone. The file is read, the outputs checked and the image prepared before any model is loaded.
    """
    kind = representation_for_file(result)
    if kind is None:
        raise UserError(f"{result} is not a saved run: export takes the .ply of image2gs/text2gs or the "
                        ".safetensors of image2nerf/text2nerf")
    model = kind.load(result, cfg, device)
    stem = result.stem
    taken = [p for p in mesh_output_paths(out_dir, stem, cfg.mesh.format) if p.exists()]
    if taken and not overwrite:
        raise UserError(f"{taken[0]} already exists: pass --overwrite to replace it, or choose another --out")
    if not refine or cfg.mesh.refine_steps == 0:
        return export_mesh(model, out_dir, stem, cfg, device=device, overwrite=overwrite, on_stage=on_stage)
    entry = teacher_entry(cfg.teacher.name)
    prompt = prompt or (run.prompt if run is not None else None)
    if image is None and run is not None and entry.inputs != "text":
        image = run.input_image("pass --image IMAGE, or --no-refine")
    if entry.inputs != "text" and image is None and cfg.teacher.name != "reference":
        raise UserError(f"refining the texture with '{cfg.teacher.name}' needs the run's input image: pass "
                        "--image IMAGE, or --no-refine")
    if entry.inputs == "text" and not prompt:
        raise UserError(f"refining the texture with '{cfg.teacher.name}' needs the run's prompt: pass --prompt, "
                        "or --no-refine")
    options = PreprocessOptions.resolve(None if run is None else run.path)
    rgba = None if image is None else ImagePreparer(options)(image)
    pipeline = ImageTo3D(dataclasses.replace(cfg, method="sir", init="random"), device)  # the teacher alone
    return pipeline.export_mesh(PreparedInput(stem, image, rgba, prompt), model, out_dir, overwrite, on_stage)


class PreprocessTask:
    """The batch task of ``microdreamer preprocess``: each input → ``<stem>_rgba.png`` in ``out_dir``
    (None: beside the input). The "pipeline" is nothing; the rembg session is loaded on first need."""

    device_name = "cpu"

    def __init__(self, options: PreprocessOptions, out_dir: Path | None = None, overwrite: bool = False) -> None:
        self.out_dir = out_dir
        self.overwrite = overwrite
        self.preparer = ImagePreparer(options)

    def _output(self, job: Job) -> Path:
        assert job.source is not None
        return preprocessed_path(job.source, self.out_dir or job.source.parent)

    def outputs(self, job: Job) -> list[Path]:
        return [self._output(job)]

    def prepare(self, job: Job) -> np.ndarray:
        out = self._output(job)
        if out.exists() and not self.overwrite:
            raise UserError(f"{out} already exists: pass --overwrite to replace it, or --skip-existing to keep it")
        return self.preparer(job.source)

    def fetch(self) -> None:
        """Nothing to fetch: rembg fetches its own model when a session first opens."""

    def load(self) -> None:
        return None

    def run(self, pipeline: None, job: Job, prepared: np.ndarray, progress: StepCallback) -> JobResult:
        out = save_image(self._output(job), prepared, overwrite=self.overwrite)
        progress(1, 1, "")
        return JobResult(outputs={"rgba": str(out)}, note=f"{prepared.shape[1]}x{prepared.shape[0]} RGBA")
