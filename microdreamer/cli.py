"""The ``microdreamer`` command: parse, call the pipeline or the batch runner, print. No logic of its own.

Progress and messages go to stderr; stdout carries only results (tables of the listing commands, or the
``--json`` document), so ``--json`` output can be piped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.table import Table

from .batch import (
    IMAGE_SUFFIXES,
    BatchObserver,
    BatchRunner,
    Job,
    Manifest,
    ManifestEntry,
    expand_inputs,
    ignored_files,
    is_single_input,
)
from .errors import UserError

if TYPE_CHECKING:
    from .batch import BatchTask
    from .config import RunConfig
    from .pipeline import PromptTask
    from .video import VideoOptions

app = typer.Typer(
    name="microdreamer",
    help="One image or one prompt to a 3D asset with score-based iterative reconstruction (MicroDreamer).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Teacher weights: which exist, which are cached, fetch one.", no_args_is_help=True)
presets_app = typer.Typer(help="Run presets: list them, show one resolved.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(presets_app, name="presets")

SELFTEST_MIN_PSNR = 24.0
MANIFEST_NAME = "manifest.json"
_STATUS_STYLE = {"done": "green", "skipped": "cyan", "failed": "red", "interrupted": "yellow", "pending": "dim"}
_CHECK_STYLE = {"ok": "green", "missing": "dim", "warn": "yellow", "error": "red"}


def _console(quiet: bool = False) -> Console:
    return Console(stderr=True, quiet=quiet)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# configuration -------------------------------------------------------------------------------------


def _overrides(**flags: Any) -> dict[str, Any]:
    """Command-line flags → nested config overrides (only the flags the user gave)."""
    table = {
        "teacher": ("teacher", "name"),
        "model": ("teacher", "model"),
        "iters": ("schedule", "iterations"),
        "steps": ("schedule", "steps"),
        "views": ("cameras", "views"),
        "res": ("cameras", "resolution"),
        "elevation": ("cameras", "elevation"),
        "backend": ("gaussians", "backend"),
        "negative_prompt": ("guidance", "negative_prompt"),
        "mesh_format": ("mesh", "format"),
        "faces": ("mesh", "faces"),
        "texture_size": ("mesh", "texture"),
        "grid": ("mesh", "resolution"),
        "threshold": ("mesh", "threshold"),
        "refine_steps": ("mesh", "refine_steps"),
        "up": ("mesh", "up"),
        "scale": ("mesh", "scale"),
        "seed": ("seed",),
        "device": ("device",),
    }
    out: dict[str, Any] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        *parents, leaf = table[flag]
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def _resolve_config(
    teacher: str | None, preset: str | None, config: Path | None, *, needs_teacher: bool = True, **flags: Any
) -> "RunConfig":
    """Preset < ``--config`` < flags. The preset is ``--preset``, else the one a saved config names (when
    the teacher is not changed by ``--teacher``), else the teacher's own. Without ``needs_teacher`` a model
    file named by a run report is not looked for."""
    from .config import read_config_file, resolve
    from .teachers.registry import teacher_entry

    saved = read_config_file(config) if config is not None else {}
    saved_teacher = saved.get("teacher", {}).get("name") if isinstance(saved.get("teacher"), dict) else None
    entry = teacher_entry(teacher or saved_teacher or "stable-zero123")
    same_teacher = teacher is None or teacher == saved_teacher
    chosen = preset or (saved.get("preset") if same_teacher and isinstance(saved.get("preset"), str) else None)
    return resolve(chosen or entry.preset, config, _overrides(teacher=teacher, **flags), needs_teacher=needs_teacher)


def _removal(rembg: bool | None) -> str | None:
    return None if rembg is None else ("rembg" if rembg else "uniform")


def _video_options(video: bool, video_format: str | None) -> "VideoOptions | None":
    from .video import VideoOptions, default_format, ffmpeg_exe

    if not video and video_format is None:
        return None
    fmt = video_format or default_format()
    if fmt == "mp4" and ffmpeg_exe() is None:
        raise UserError("--video-format mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg); or use gif")
    return VideoOptions(format=fmt)


# progress and the batch runner ---------------------------------------------------------------------


class _ProgressView(BatchObserver):
    """Rich progress bars on stderr: one for the batch (several inputs), one for the current run."""

    def __init__(self, console: Console, batch: bool) -> None:
        self.console = console
        self.batch = batch
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=True, disable=console.quiet or not console.is_terminal,
        )
        self.batch_task: Any = None
        self.run_task: Any = None

    def __enter__(self) -> "_ProgressView":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def batch_started(self, total: int) -> None:
        if self.batch:
            self.batch_task = self.progress.add_task("batch", total=total, info="")

    def job_started(self, index: int, job: Job) -> None:
        if self.run_task is not None:
            self.progress.remove_task(self.run_task)
        self.run_task = self.progress.add_task(escape(job.stem), total=None, info="")
        if self.batch_task is not None:
            self.progress.update(self.batch_task, info=escape(job.input))

    def loading(self, active: bool) -> None:
        self.progress.update(self.run_task, info="loading the teacher…" if active else "")

    def step(self, done: int, total: int, info: str) -> None:
        self.progress.update(self.run_task, completed=done, total=total, info=escape(info))

    def job_finished(self, index: int, entry: ManifestEntry) -> None:
        if self.batch_task is not None:
            self.progress.advance(self.batch_task)
            style = _STATUS_STYLE[entry.status]
            detail = entry.error if entry.status == "failed" else entry.note
            self.console.print(f"[{style}]{entry.status}[/] {escape(entry.input)}: {escape(detail or '')}")


def run_batch(
    command: str,
    specs: list[Path],
    jobs: list[Job],
    task: "BatchTask",
    out_dir: Path,
    *,
    manifest: Path | None,
    manifest_default: Path | None,
    skip_existing: bool,
    json_out: bool,
    quiet: bool,
    single: bool | None = None,
    ignored: list[Path] | None = None,
) -> Manifest:
    """Run ``task`` over ``jobs`` with progress, a manifest, a summary and the exit code.

    One plain input (:func:`is_single_input`) behaves like a single command: its error ends the command
    (exit 2). Otherwise the batch goes on after failures, writes the manifest (``manifest``, else
    ``manifest_default``) and exits 1 when any input failed. Ctrl-C exits 130 once the manifest is written.
    ``ignored`` files (non-images in input folders) are named in the summary and the manifest. For the image
    commands of other engineers: build jobs with :func:`expand_inputs` and a task like ``ImageTask``.
    """
    single = is_single_input(specs) if single is None else single
    manifest_path = manifest if manifest is not None or single else manifest_default
    console = _console(quiet)
    with _ProgressView(console, batch=not single) as view:
        runner = BatchRunner(
            command, out_dir, manifest=manifest_path, skip_existing=skip_existing, single=single, observer=view,
            ignored=ignored or (),
        )
        try:
            result = runner.run(jobs, task)
        except KeyboardInterrupt:
            where = f"; {manifest_path} records what finished" if manifest_path is not None else ""
            print(f"interrupted: no partial outputs were left behind{where}", file=sys.stderr)
            raise typer.Exit(130) from None
    if single:
        entry = result.entries[0]
        console.print(f"[{_STATUS_STYLE[entry.status]}]{entry.status}[/] {escape(entry.input)}: {escape(entry.note)}")
    elif not quiet:
        _print_summary(console, result, manifest_path)
    else:  # errors are printed even when quiet
        for e in result.entries:
            if e.status == "failed":
                print(f"failed: {e.input}: {e.error}", file=sys.stderr)
    if json_out:
        _print_json(result.to_dict())
    if result.failed:
        raise typer.Exit(1)
    return result


def _print_summary(console: Console, manifest: Manifest, path: Path | None) -> None:
    table = Table("input", "status", "seconds", "result", title=f"{manifest.command}: {len(manifest.entries)} inputs")
    for e in manifest.entries:
        detail = e.error if e.status == "failed" else e.note
        table.add_row(escape(e.input), f"[{_STATUS_STYLE[e.status]}]{e.status}[/]", f"{e.seconds:.1f}",
                      escape(detail or ""))
    console.print(table)
    counts = ", ".join(f"{n} {s}" for s, n in manifest.counts().items() if n)
    console.print(f"{counts}" + (f"; manifest: {escape(str(path))}" if path is not None else ""))
    if manifest.ignored:
        names = ", ".join(Path(p).name for p in manifest.ignored[:5]) + (", …" if len(manifest.ignored) > 5 else "")
        console.print(f"ignored {len(manifest.ignored)} file(s) that are not images ({', '.join(IMAGE_SUFFIXES)}): "
                      f"{escape(names)}")


# options shared by the generation commands --------------------------------------------------------

Prompts = Annotated[list[str], typer.Argument(help="Text prompt(s), each quoted; several make a batch.", show_default=False)]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
TextTeacher = Annotated[Optional[str], typer.Option(help="Teacher: mvdream (default).")]
NegativePrompt = Annotated[Optional[str], typer.Option(help="Negative prompt (default: the preset's).")]
TextModel = Annotated[Optional[str], typer.Option(help="Hugging Face id or local folder.")]
Preset = Annotated[Optional[str], typer.Option(help="Preset name (default: the teacher's).")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="TOML config, or the JSON saved by an earlier run.")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed.")]
Iters = Annotated[Optional[int], typer.Option(help="SIR iterations K (after the init iteration).")]
Steps = Annotated[Optional[int], typer.Option(help="Reconstruction steps I per iteration.")]
TextViews = Annotated[Optional[int], typer.Option(help="Views B per iteration (a multiple of 4).")]
Res = Annotated[Optional[int], typer.Option(help="Render resolution.")]
Backend = Annotated[Optional[str], typer.Option(help="Gaussian rasterizer: auto, cpu, torch, gsplat.")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps.")]
Video = Annotated[bool, typer.Option("--video", help="Also write a 360° turntable <stem>_turntable.mp4 (gif without ffmpeg).")]
VideoFormat = Annotated[Optional[str], typer.Option(help="Turntable format: mp4 or gif (implies --video).")]
Overwrite = Annotated[bool, typer.Option(help="Replace existing outputs.")]
SkipPrompts = Annotated[bool, typer.Option(help="Skip prompts whose outputs all exist (resume a batch).")]
BatchManifest = Annotated[Optional[Path], typer.Option(help="Batch manifest JSON (default OUT/manifest.json for batches).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
ImageTeacher = Annotated[Optional[str], typer.Option("--teacher", help="Teacher: stable-zero123 (default), zero123-xl, imagedream (with --prompt), reference.")]
ImagePrompt = Annotated[Optional[str], typer.Option("--prompt", help="Text prompt for an image+text teacher (imagedream); optional there.")]
Model = Annotated[Optional[str], typer.Option("--model", help="Hugging Face id or local folder; for --teacher reference, a mesh.")]
Views = Annotated[Optional[int], typer.Option(help="Views B per iteration.")]
Elevation = Annotated[Optional[float], typer.Option(help="Input view elevation in degrees (negative = photo from above).")]
BorderRatio = Annotated[Optional[float], typer.Option(help="Empty border around the recentred object (default 0.2).")]
Rembg = Annotated[Optional[bool], typer.Option("--rembg/--no-rembg", help="Background removal for images without alpha: force rembg, or never use it (plain uniform backgrounds). Default: rembg when installed.")]
SkipExisting = Annotated[bool, typer.Option(help="Skip inputs whose outputs all exist (resume a batch).")]


# image commands ------------------------------------------------------------------------------------

Inputs = Annotated[
    Optional[list[Path]],
    typer.Argument(help="Images (PNG/JPG/WebP), folders or globs. None with --config RUN.json: the run's input "
                        "image; else with --teacher reference: its front view.", show_default=False),
]


def _image_jobs(command: str, specs: list[Path], cfg: "RunConfig", config: Path | None) -> list[Job]:
    """The inputs of an image command; none means the input image of the run whose report is ``config``,
    else the reference teacher's own front view."""
    from .pipeline import SavedRun, front_view_stem

    if specs:
        return expand_inputs(specs)
    run = SavedRun.read(config)
    image = None if run is None else run.input_image(f"pass the image: microdreamer {command} IMAGE --config {config}")
    if image is not None:
        return expand_inputs([image])
    if cfg.teacher.name == "reference":
        return [Job(front_view_stem(cfg), f"front view of {cfg.teacher.model}")]
    raise UserError(f"{command} needs an input image (or --teacher reference --model MESH to use its front view)")


@app.command("image2gs")
def image2gs(
    images: Inputs = None,
    out: Out = Path("out"),
    teacher: ImageTeacher = None,
    prompt: ImagePrompt = None,
    model: Model = None,
    preset: Preset = None,
    config: ConfigFile = None,
    seed: Seed = None,
    iters: Iters = None,
    steps: Steps = None,
    views: Views = None,
    res: Res = None,
    elevation: Elevation = None,
    backend: Backend = None,
    device: Device = None,
    border_ratio: BorderRatio = None,
    rembg: Rembg = None,
    video: Video = False,
    video_format: VideoFormat = None,
    overwrite: Overwrite = False,
    skip_existing: SkipExisting = False,
    manifest: BatchManifest = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Image(s) → 3D Gaussians (OUT/<stem>.ply, <stem>_views.png, <stem>_rgba.png, <stem>.json)."""
    from .pipeline import ImageTask, PreprocessOptions, resolve_device

    cfg = _resolve_config(
        teacher, preset, config, model=model, seed=seed, iters=iters, steps=steps, views=views, res=res,
        elevation=elevation, backend=backend, device=device,
    )
    prompt = prompt if prompt is not None else _saved_prompt(config)
    _check_image_teacher(cfg.teacher.name, prompt)
    options = PreprocessOptions.resolve(config, border_ratio=border_ratio, remove_background=_removal(rembg))
    video_options = _video_options(video, video_format)
    specs = images or []
    jobs = _image_jobs("image2gs", specs, cfg, config)
    task = ImageTask(
        cfg, resolve_device(cfg.device), out, preprocess=options, video=video_options, overwrite=overwrite,
        skip_existing=skip_existing, prompt=prompt,
    )
    run_batch("image2gs", specs, jobs, task, out, manifest=manifest, manifest_default=out / MANIFEST_NAME,
              skip_existing=skip_existing, json_out=json_out, quiet=quiet, ignored=ignored_files(specs))


# mesh options, shared by image2mesh, text2mesh and export
MeshFormat = Annotated[Optional[str], typer.Option("--format", help="Mesh file: glb (default; embedded texture), obj (+mtl+png), ply (vertex colours).")]
Faces = Annotated[Optional[int], typer.Option(help="Face budget after decimation (default 50000).")]
TextureSize = Annotated[Optional[int], typer.Option(help="Texture side in texels, a power of two (default 1024).")]
Grid = Annotated[Optional[int], typer.Option(help="Density grid points per axis (default 256).")]
Threshold = Annotated[Optional[float], typer.Option(help="Iso-level of the Gaussians' summed-opacity field (default 0.5).")]
RefineSteps = Annotated[Optional[int], typer.Option(help="Steps of the SIR texture refinement (default: the preset's, 30 for Zero123, 0 for the multi-view teachers; 0 = bake only).")]
Up = Annotated[Optional[str], typer.Option(help="Up axis of the file: y (default; glTF) or z (obj/ply only).")]
Scale = Annotated[Optional[float], typer.Option(help="Longest side of the object's box, centred at the origin (default 1).")]


@app.command("image2mesh")
def image2mesh(
    images: Inputs = None,
    out: Out = Path("out"),
    teacher: ImageTeacher = None,
    prompt: ImagePrompt = None,
    model: Model = None,
    preset: Preset = None,
    config: ConfigFile = None,
    seed: Seed = None,
    iters: Iters = None,
    steps: Steps = None,
    views: Views = None,
    res: Res = None,
    elevation: Elevation = None,
    backend: Backend = None,
    device: Device = None,
    border_ratio: BorderRatio = None,
    rembg: Rembg = None,
    mesh_format: MeshFormat = None,
    faces: Faces = None,
    texture_size: TextureSize = None,
    grid: Grid = None,
    threshold: Threshold = None,
    refine_steps: RefineSteps = None,
    up: Up = None,
    scale: Scale = None,
    overwrite: Overwrite = False,
    skip_existing: SkipExisting = False,
    manifest: BatchManifest = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Image(s) → 3D Gaussians → textured mesh (image2gs outputs plus OUT/<stem>.glb and <stem>_mesh.json).

    The mesh is centred at the origin in a box of side --scale, Y-up with the input view's camera on +z
    (glTF convention). Its texture is baked from the Gaussians and refined with one SIR pass of the teacher.
    """
    from .pipeline import MeshTask, PreprocessOptions, resolve_device

    cfg = _resolve_config(
        teacher, preset, config, model=model, seed=seed, iters=iters, steps=steps, views=views, res=res,
        elevation=elevation, backend=backend, device=device, mesh_format=mesh_format, faces=faces,
        texture_size=texture_size, grid=grid, threshold=threshold, refine_steps=refine_steps, up=up, scale=scale,
    )
    prompt = prompt if prompt is not None else _saved_prompt(config)
    _check_image_teacher(cfg.teacher.name, prompt)
    options = PreprocessOptions.resolve(config, border_ratio=border_ratio, remove_background=_removal(rembg))
    specs = images or []
    jobs = _image_jobs("image2mesh", specs, cfg, config)
    task = MeshTask(cfg, resolve_device(cfg.device), out, preprocess=options, overwrite=overwrite,
                    skip_existing=skip_existing, prompt=prompt)
    run_batch("image2mesh", specs, jobs, task, out, manifest=manifest, manifest_default=out / MANIFEST_NAME,
              skip_existing=skip_existing, json_out=json_out, quiet=quiet, ignored=ignored_files(specs))


@app.command("export")
def export(
    result: Annotated[Path, typer.Argument(help="A 3DGS .ply written by image2gs.")],
    to: Annotated[str, typer.Option("--to", help="What to make of it: mesh.")] = "mesh",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: beside RESULT).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="The run's JSON report or a TOML config (default: RESULT's <stem>.json when present).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher that refines the texture (default: the run's).")] = None,
    model: Model = None,
    image: Annotated[Optional[Path], typer.Option(help="The run's input image (default: the one its report names).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="The run's prompt, for text and image+text teachers (default: the report's).")] = None,
    refine: Annotated[bool, typer.Option("--refine/--no-refine", help="Refine the baked texture with the teacher (one SIR pass).")] = True,
    mesh_format: MeshFormat = None,
    faces: Faces = None,
    texture_size: TextureSize = None,
    grid: Grid = None,
    threshold: Threshold = None,
    refine_steps: RefineSteps = None,
    up: Up = None,
    scale: Scale = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed of the refinement (default: the run's).")] = None,
    device: Device = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """A saved 3DGS run → textured mesh (<stem>.glb, or .obj+.mtl+_albedo.png, or _mesh.ply; <stem>_mesh.json)."""
    from .pipeline import SavedRun, export_saved_run, resolve_device

    if to != "mesh":
        raise UserError(f"--to must be mesh, got '{to}'")
    if not result.is_file():
        raise UserError(f"result not found: {result}")
    run = SavedRun.read(config) if config is not None else SavedRun.beside(result)
    config = config if run is None else run.path
    unrefined = config is None and teacher is None and refine  # nothing says which teacher the run used
    refine = refine and not unrefined
    cfg = _resolve_config(
        teacher, None, config, needs_teacher=refine, model=model, seed=seed, device=device, mesh_format=mesh_format,
        faces=faces, texture_size=texture_size, grid=grid, threshold=threshold, refine_steps=refine_steps, up=up,
        scale=scale,
    )
    console = _console(quiet)
    target = out or result.parent
    with console.status(f"meshing {escape(result.name)}") as status:
        mesh = export_saved_run(
            result, cfg, resolve_device(cfg.device), target, run=run, refine=refine, image=image, prompt=prompt,
            overwrite=overwrite, on_stage=lambda stage: status.update(f"meshing {escape(result.name)}: {stage}"),
        )
    console.print(f"[green]wrote[/] {escape(mesh.outputs[0])} ({mesh.faces} faces, "
                  f"{sum(mesh.timings.values()):.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in mesh.timings.items()) + ")")
    if unrefined:
        console.print(f"no run report beside {escape(str(result))}: the texture is baked, not refined "
                      "(give --config, or --teacher/--model/--image, to refine it)")


def _saved_prompt(config: Path | None) -> str | None:
    """The prompt of the run whose JSON report is given as ``--config`` (image+text runs), if any."""
    from .pipeline import SavedRun

    run = SavedRun.read(config)
    return None if run is None else run.prompt


def _check_image_teacher(name: str, prompt: str | None) -> None:
    """Image commands take image and image+text teachers; ``--prompt`` only the latter, and not blank."""
    from .teachers.registry import teacher_entry

    inputs = teacher_entry(name).inputs
    if inputs == "text":
        raise UserError(f"teacher '{name}' generates from text alone: use text2gs PROMPT")
    if prompt is not None and inputs != "image+text":
        raise UserError(f"--prompt needs an image+text teacher (imagedream); '{name}' reads only the image")
    if prompt is not None and not prompt.strip():
        raise UserError("empty prompt: leave --prompt out, or describe the object")


# text commands -------------------------------------------------------------------------------------



def _run_prompts(
    command: str,
    task_class: type[PromptTask],
    prompts: list[str],
    out: Path,
    *,
    teacher: str | None,
    preset: str | None,
    config: Path | None,
    video: bool,
    video_format: str | None,
    overwrite: bool,
    skip_existing: bool,
    manifest: Path | None,
    json_out: bool,
    quiet: bool,
    **flags: Any,
) -> None:
    """One job per prompt through the batch runner, the text-to-3D teacher loaded once; ``flags`` are
    config overrides (:func:`_overrides`). A lone bad prompt fails before any model is loaded."""
    from .pipeline import prompt_jobs, resolve_device
    from .teachers.registry import teacher_entry

    jobs = prompt_jobs(prompts)
    if len(jobs) == 1 and jobs[0].problem is not None:
        raise UserError(jobs[0].problem)
    cfg = _resolve_config(teacher or "mvdream", preset, config, **flags)
    if teacher_entry(cfg.teacher.name).inputs != "text":
        raise UserError(f"{command} needs a text-to-3D teacher (mvdream), not '{cfg.teacher.name}'")
    task = task_class(cfg, resolve_device(cfg.device), out, video=_video_options(video, video_format), overwrite=overwrite,
                      skip_existing=skip_existing)
    run_batch(command, [], jobs, task, out, manifest=manifest, manifest_default=out / MANIFEST_NAME,
              skip_existing=skip_existing, json_out=json_out, quiet=quiet, single=len(jobs) == 1)


@app.command("text2gs")
def text2gs(
    prompts: Prompts,
    out: Out = Path("out"),
    teacher: TextTeacher = None,
    negative_prompt: NegativePrompt = None,
    model: TextModel = None,
    preset: Preset = None,
    config: ConfigFile = None,
    seed: Seed = None,
    iters: Iters = None,
    steps: Steps = None,
    views: TextViews = None,
    res: Res = None,
    backend: Backend = None,
    device: Device = None,
    video: Video = False,
    video_format: VideoFormat = None,
    overwrite: Overwrite = False,
    skip_existing: SkipPrompts = False,
    manifest: BatchManifest = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Prompt(s) → 3D Gaussians (OUT/<prompt words>.ply, _views.png, .json)."""
    from .pipeline import PromptTask

    _run_prompts(
        "text2gs", PromptTask, prompts, out, teacher=teacher, preset=preset, config=config, video=video,
        video_format=video_format, overwrite=overwrite, skip_existing=skip_existing, manifest=manifest,
        json_out=json_out, quiet=quiet, model=model, seed=seed, iters=iters, steps=steps, views=views, res=res,
        backend=backend, device=device, negative_prompt=negative_prompt,
    )


@app.command("text2mesh")
def text2mesh(
    prompts: Prompts,
    out: Out = Path("out"),
    teacher: TextTeacher = None,
    negative_prompt: NegativePrompt = None,
    model: TextModel = None,
    preset: Preset = None,
    config: ConfigFile = None,
    seed: Seed = None,
    iters: Iters = None,
    steps: Steps = None,
    views: TextViews = None,
    res: Res = None,
    backend: Backend = None,
    device: Device = None,
    mesh_format: MeshFormat = None,
    faces: Faces = None,
    texture_size: TextureSize = None,
    grid: Grid = None,
    threshold: Threshold = None,
    refine_steps: RefineSteps = None,
    up: Up = None,
    scale: Scale = None,
    video: Video = False,
    video_format: VideoFormat = None,
    overwrite: Overwrite = False,
    skip_existing: SkipPrompts = False,
    manifest: BatchManifest = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Prompt(s) → 3D Gaussians → textured mesh (text2gs outputs plus OUT/<prompt words>.glb and _mesh.json).

    The mesh is centred at the origin in a box of side --scale, Y-up (glTF convention). Its texture is
    baked from the Gaussians; the mvdream preset does not refine it (as the reference), --refine-steps N
    refines it with one SIR pass of the teacher.
    """
    from .pipeline import PromptMeshTask

    _run_prompts(
        "text2mesh", PromptMeshTask, prompts, out, teacher=teacher, preset=preset, config=config, video=video,
        video_format=video_format, overwrite=overwrite, skip_existing=skip_existing, manifest=manifest,
        json_out=json_out, quiet=quiet, model=model, seed=seed, iters=iters, steps=steps, views=views, res=res,
        backend=backend, device=device, negative_prompt=negative_prompt, mesh_format=mesh_format, faces=faces,
        texture_size=texture_size, grid=grid, threshold=threshold, refine_steps=refine_steps, up=up, scale=scale,
    )


@app.command("preprocess")
def preprocess_(
    images: Annotated[list[Path], typer.Argument(help="Images (PNG/JPG/WebP), folders or globs.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: beside each input).")] = None,
    size: Annotated[int, typer.Option(help="Output side in pixels.")] = 256,
    border_ratio: Annotated[float, typer.Option(help="Empty border around the recentred object.")] = 0.2,
    rembg: Rembg = None,
    overwrite: Overwrite = False,
    skip_existing: Annotated[bool, typer.Option(help="Skip inputs whose output exists.")] = False,
    manifest: Annotated[Optional[Path], typer.Option(help="Batch manifest JSON (default OUT/manifest.json with --out).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: Quiet = False,
) -> None:
    """Mask, recentre and rescale images → <stem>_rgba.png (what every image command does first)."""
    from .pipeline import PreprocessOptions, PreprocessTask
    from .preprocess import is_preprocessed_output

    options = PreprocessOptions(border_ratio=border_ratio, remove_background=_removal(rembg) or "auto", size=size)
    jobs = expand_inputs(images, exclude=is_preprocessed_output, unique_stems=out is not None)
    task = PreprocessTask(options, out, overwrite)
    run_batch("preprocess", images, jobs, task, out or Path("."), manifest=manifest,
              manifest_default=None if out is None else out / MANIFEST_NAME, skip_existing=skip_existing,
              json_out=json_out, quiet=quiet, ignored=ignored_files(images))


@app.command("render")
def render(
    result: Annotated[Path, typer.Argument(help="A 3DGS .ply written by image2gs, or a mesh (.obj, .glb, .gltf).")],
    video: Annotated[Optional[Path], typer.Option(help="Output .mp4 or .gif (default: RESULT_turntable.mp4).")] = None,
    frames: Annotated[int, typer.Option(help="Frames over 360°.")] = 90,
    fps: Annotated[int, typer.Option(help="Frames per second.")] = 30,
    res: Annotated[int, typer.Option(help="Frame size in pixels.")] = 512,
    elevation: Annotated[float, typer.Option(help="Camera elevation in degrees (negative = from above).")] = 0.0,
    radius: Annotated[float, typer.Option(help="Camera distance.")] = 2.0,
    fovy: Annotated[float, typer.Option(help="Vertical field of view in degrees.")] = 49.1,
    azimuth: Annotated[float, typer.Option(help="Azimuth of the first frame in degrees.")] = 0.0,
    normalize: Annotated[bool, typer.Option(help="Fit a mesh into the unit box first.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing video.")] = False,
    quiet: Quiet = False,
) -> None:
    """A 360° turntable video of a saved result."""
    from .pipeline import resolve_device
    from .video import VideoOptions, default_format, render_frames, result_renderer, turntable_cameras, write_video

    target = video or result.with_name(f"{result.stem}_turntable.{default_format()}")
    options = VideoOptions(format=target.suffix.lower().lstrip(".") or "?", frames=frames, fps=fps, resolution=res)
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists: pass --overwrite to replace it, or choose another --video")
    dev = resolve_device(device)
    draw = result_renderer(result, dev, normalize=normalize)
    cameras = turntable_cameras(options.frames, elevation, radius, res, fovy, start_azimuth=azimuth)
    console = _console(quiet)
    with console.status(f"rendering {frames} frames of {escape(result.name)}"):
        pixels = render_frames(draw, cameras)
        write_video(target, pixels, options.fps)
    console.print(f"[green]wrote[/] {escape(str(target))} ({frames} frames, {res}x{res}, {fps} fps)")


@app.command("eval")
def eval_(
    result: Annotated[Path, typer.Argument(help="A 3DGS .ply written by image2gs, or a mesh written by image2mesh/export (.glb, .obj, _mesh.ply; Y-up).")],
    reference: Annotated[Path, typer.Option(help="Ground-truth mesh (.obj, .glb, .gltf).")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the scores to this JSON file.")] = None,
    radius: Annotated[float, typer.Option(help="Camera distance of the held-out views.")] = 2.0,
    res: Annotated[int, typer.Option(help="Render resolution.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
    shading: Annotated[Optional[str], typer.Option(help="Render the reference lit or albedo (default: as the run's report beside the result says, else lit).")] = None,
) -> None:
    """PSNR and SSIM on 16 held-out views against a reference mesh; for a mesh result also Chamfer
    distance, F-score at 0.01 and 0.05 and normal consistency. The reference is fitted into the unit
    box; a mesh goes back into its run's frame through the <stem>_mesh.json beside it, else it is
    fitted into the unit box too."""
    from .evaluate import MeshEvalReport, evaluate_gaussians, evaluate_mesh, is_gaussian_ply
    from .io.atomic import atomic_path
    from .pipeline import resolve_device
    from .render.mesh import shading_light

    if not result.is_file():
        raise UserError(f"result not found: {result}")
    if json_out is not None and json_out.exists():
        raise UserError(f"{json_out} already exists: remove it or choose another --json path")
    if shading is not None:
        shading_light(shading)  # one line for an unknown mode
    evaluate = evaluate_gaussians if is_gaussian_ply(result) else evaluate_mesh
    report = evaluate(result, reference, resolve_device(device), radius=radius, resolution=res, shading=shading)
    table = Table("view", "elevation", "azimuth", "PSNR (dB)", "SSIM", "albedo PSNR",
                  title=f"{result.name} vs {reference.name} ({report.shading})")
    for v in report.views:
        table.add_row(str(v.view), f"{v.elevation:.1f}", f"{v.azimuth:.2f}", f"{v.psnr:.2f}", f"{v.ssim:.4f}",
                      f"{v.albedo_psnr:.2f}")
    table.add_row("mean", "", "", f"{report.mean_psnr:.2f}", f"{report.mean_ssim:.4f}",
                  f"{report.mean_albedo_psnr:.2f}", style="bold")
    Console().print(table)
    if isinstance(report, MeshEvalReport):
        s = report.surface
        Console().print(
            f"surface ({'run frame' if report.frame == 'run' else 'unit box'}): Chamfer {s.chamfer:.4f}, "
            f"F-score@0.01 {s.fscore[0.01]:.3f}, "
            f"F-score@0.05 {s.fscore[0.05]:.3f}, normal consistency {s.normal_consistency:.3f}"
        )
    if json_out is not None:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2))


@app.command("selftest")
def selftest(
    out: Annotated[Optional[Path], typer.Option(help="Keep the outputs here (default: a temporary folder).")] = None,
    min_psnr: Annotated[float, typer.Option(help="Fail below this mean held-out PSNR.")] = SELFTEST_MIN_PSNR,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
) -> None:
    """Reconstruct the bundled CC0 Spot cow with the reference teacher and check the held-out PSNR."""
    import tempfile

    from .evaluate import evaluate_gaussians
    from .pipeline import ImageTo3D, describe_iteration, resolve_device

    mesh = Path(__file__).resolve().parent / "assets" / "spot" / "spot.obj"
    console = _console()
    dev = resolve_device(device)
    cfg = _resolve_config("reference", None, None, model=str(mesh), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = out or Path(tmp)
        with _ProgressView(console, batch=False) as view:
            view.job_started(0, Job("spot", str(mesh)))
            view.loading(True)
            runner = ImageTo3D(cfg, dev)
            view.loading(False)
            report = runner.run(
                None, folder, overwrite=True,
                on_iteration=lambda log, total: view.step(log.iteration + 1, total, describe_iteration(log)),
            )
        scores = evaluate_gaussians(Path(report.outputs["ply"]), mesh, dev, shading=cfg.teacher.shading)
    ok = scores.mean_psnr >= min_psnr
    verdict = "[green]PASS[/]" if ok else "[red]FAIL[/]"
    console.print(
        f"{verdict} selftest ({scores.shading} teacher): mean held-out PSNR {scores.mean_psnr:.2f} dB "
        f"(threshold {min_psnr:.1f}), "
        f"SSIM {scores.mean_ssim:.4f}, {report.timings['sir']:.1f} s SIR on {dev}, {report.primitives} Gaussians"
    )
    if not ok:
        raise typer.Exit(1)


# models, presets, doctor ---------------------------------------------------------------------------

CacheDir = Annotated[Optional[Path], typer.Option(help="Hugging Face hub cache (default: HF_HUB_CACHE).")]


@models_app.command("list")
def models_list(
    cache_dir: CacheDir = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Every known teacher's weights: cached or not, size, licence."""
    from .teachers.catalog import CATALOG, cache_status

    rows = []
    for entry in CATALOG:
        cached, size = cache_status(entry, cache_dir)
        rows.append({
            "name": entry.name, "repo_id": entry.repo_id, "cached": cached, "size_bytes": size,
            "approx_download_gb": entry.approx_size_gb, "commercial_use": entry.commercial_use,
            "license": entry.license, "source": entry.source,
        })
    if json_out:
        _print_json(rows)
        return
    console = Console()
    table = Table("teacher", "cached", "size", "use", "weights", title="teacher weights")
    for r in rows:
        state = "[green]yes[/]" if r["cached"] else ("[yellow]incomplete[/]" if r["size_bytes"] else "no")
        size = f"{r['size_bytes'] / 1e9:.2f} GB" if r["size_bytes"] else f"~{r['approx_download_gb']:.1f} GB"
        use = "commercial ok" if r["commercial_use"] else "[bold red]non-commercial only[/]"
        table.add_row(r["name"], state, size, use, r["repo_id"])
    console.print(table)
    for r in rows:
        console.print(f"[bold]{r['name']}[/]: {escape(r['license'])}")
    console.print("The reference teacher needs no weights: it renders a mesh you pass with --model.")


@models_app.command("download")
def models_download(
    name: Annotated[str, typer.Argument(help="Teacher name, as in `microdreamer models list`.")],
    cache_dir: CacheDir = None,
) -> None:
    """Fetch one teacher's configs and safetensors weights into the Hugging Face cache."""
    from .teachers.catalog import download, find_entry

    entry = find_entry(name)
    console = _console()
    if not entry.commercial_use:
        console.print(f"[bold yellow]licence:[/] {escape(entry.license)}")
    with console.status(f"fetching {entry.repo_id} (about {entry.approx_size_gb:.1f} GB)"):
        folder = download(entry, cache_dir)
    console.print(f"[green]ready[/] {entry.name}: {escape(str(folder))}")
    typer.echo(str(folder))


@presets_app.command("list")
def presets_list(json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False) -> None:
    """The presets, with their teacher and description."""
    from .config import PRESET_DIR, load_preset, preset_names

    rows = []
    for name in preset_names():
        text = (PRESET_DIR / f"{name}.toml").read_text()
        header = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
        comment = header.split(". ")[0].rstrip(".")
        rows.append({"name": name, "teacher": load_preset(name).get("teacher", {}).get("name", ""), "about": comment})
    if json_out:
        _print_json(rows)
        return
    table = Table("preset", "teacher", "about", title="presets")
    for r in rows:
        table.add_row(r["name"], r["teacher"], escape(r["about"]))
    Console().print(table)


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
) -> None:
    """The preset resolved over the defaults, as a TOML file usable with --config."""
    from .config import resolve

    data = resolve(name).to_dict()
    if json_out:
        _print_json(data)
    else:
        sys.stdout.write(_to_toml(data))


def _to_toml(data: dict[str, Any]) -> str:
    """Our configs as TOML: top-level values, then one table per section (None values are left out)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    for section, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


@app.command("doctor")
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    build: Annotated[bool, typer.Option(help="Build the C++ kernels to check them (cached after the first time).")] = True,
    cache_dir: CacheDir = None,
) -> None:
    """What this machine can run: torch and devices, GPU memory, backends, cached models, ffmpeg."""
    from .doctor import run_checks, to_dict

    console = _console()
    with console.status("checking (the first run builds the C++ kernels, about a minute)"):
        checks = run_checks(build_kernels=build, cache_dir=cache_dir)
    report = to_dict(checks)
    if json_out:
        _print_json(report)
    else:
        table = Table("section", "check", "status", "detail", title="microdreamer doctor")
        for c in checks:
            style = _CHECK_STYLE.get(c.status, "")
            table.add_row(c.section, c.name, f"[{style}]{c.status}[/]", escape(c.detail))
        Console().print(table)
    if not report["ok"]:
        raise typer.Exit(1)


# entry point ---------------------------------------------------------------------------------------

# Typer may vendor its own click: take the usage-error class from its exception hierarchy.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure is one line on stderr and exit code 2; Ctrl-C is 130."""
    command = typer.main.get_command(app)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["--help"]
    try:
        rc = command.main(args=argv, prog_name="microdreamer", standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _UsageError as exc:
        hint = f" (see 'microdreamer {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted: no partial outputs were left behind", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


def run() -> None:
    sys.exit(main())
