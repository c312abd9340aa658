"""The ``microdreamer`` command: parse, call the pipeline or the batch runner, print. No logic of its own.

Progress and messages go to stderr; stdout carries only results (tables of the listing commands, or the
``--json`` document), so ``--json`` output can be piped.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    Executor,
    Job,
    Manifest,
    ManifestEntry,
    batch_manifest_path,
    is_single_input,
)
from .config import ELEVATION_LIMIT, RESOLUTION, TURNTABLE_FPS, TURNTABLE_FRAMES, TURNTABLE_RESOLUTION
from .errors import UserError
from .io.atomic import check_output_dir, check_output_file
from .wording import plural, shorten

if TYPE_CHECKING:
    from .config import RunConfig
    from .evaluate import EvalReport
    from .evaluate_clip import ClipEvalReport
    from .evaluate_geco import GECOEvalReport
    from .executors import Shard
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
manifest_app = typer.Typer(help="Batch manifests: join the manifests of a batch's shards.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(presets_app, name="presets")
app.add_typer(manifest_app, name="manifest")

SELFTEST_MIN_PSNR = 24.0
_STATUS_STYLE = {"done": "green", "skipped": "cyan", "failed": "red", "interrupted": "yellow", "pending": "dim"}
_CHECK_STYLE = {"ok": "green", "missing": "dim", "warn": "yellow", "error": "red"}


def _console(quiet: bool = False, stderr: bool = True) -> Console:
    """stderr (messages, progress) or stdout (tables). Off a terminal (a log, a pipe) nothing is wrapped
    and tables are as wide as their cells."""
    console = Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal:
        console.soft_wrap, console.width = True, 1000
    return console


@contextmanager
def _status(console: Console, text: str) -> Iterator[None]:
    """A spinner with ``text`` on a terminal; elsewhere ``text`` once, as a line."""
    if console.is_terminal:
        with console.status(text):
            yield
    else:
        console.print(text, markup=False, highlight=False)
        yield


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


#: how the messages of :func:`check_output_dir` name an output folder the user did not give
_BESIDE = "--out (default: beside {})"


# configuration -------------------------------------------------------------------------------------


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
    """Progress on stderr. On a terminal, rich bars: one for the batch (several inputs), one for the
    current run. Elsewhere (a log, CI, a scheduler) plain lines: each input, the teacher load, each SIR
    iteration and mesh stage."""

    def __init__(self, console: Console, batch: bool) -> None:
        self.console = console
        self.batch = batch
        self.lines = not console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=True, disable=console.quiet or self.lines,
        )
        self.batch_task: Any = None
        self.run_task: Any = None
        self.total = 0
        self.label = ""
        self.loading_since = 0.0
        self.loaded_in: float | None = None

    def __enter__(self) -> "_ProgressView":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _line(self, text: str) -> None:
        if self.lines:
            self.console.print(text, markup=False, highlight=False)

    def batch_started(self, total: int) -> None:
        self.total = total
        if self.batch:
            self.batch_task = self.progress.add_task("batch", total=total, info="")

    def job_started(self, index: int, job: Job) -> None:
        self.label = shorten(job.stem, 40)
        if self.run_task is not None:
            self.progress.remove_task(self.run_task)
        self.run_task = self.progress.add_task(escape(self.label), total=None, info="")
        if self.batch_task is not None:
            self.progress.update(self.batch_task, info=escape(shorten(job.input)))
            self._line(f"[{index + 1}/{self.total}] {shorten(job.input)}")

    def loading(self, active: bool) -> None:
        self.progress.update(self.run_task, info="loading the teacher…" if active else "")
        if active:
            self.loading_since = time.perf_counter()
            self._line(f"{self.label}: loading the teacher")
        else:
            self.loaded_in = time.perf_counter() - self.loading_since  # said with the first step: it loaded

    def step(self, done: int, total: int, info: str) -> None:
        self.progress.update(self.run_task, completed=done, total=total, info=escape(info))
        if self.loaded_in is not None:
            self._line(f"{self.label}: teacher loaded in {self.loaded_in:.1f} s")
            self.loaded_in = None
        if info:
            self._line(f"{self.label} [{done}/{total}] {info}")

    def say(self, info: str) -> None:
        """What the current run is doing now, outside its steps (``spot: scoring 16 held-out views``)."""
        self.progress.update(self.run_task, info=escape(info))
        self._line(f"{self.label}: {info}")

    def job_finished(self, index: int, entry: ManifestEntry) -> None:
        if self.batch_task is not None:
            self.progress.advance(self.batch_task)
            self.console.print(_entry_line(entry))


def _entry_line(entry: ManifestEntry) -> str:
    """``done photo.png: 5000 Gaussians, …`` (rich markup) for the log of a batch or a single run."""
    detail = entry.error if entry.status == "failed" else entry.note
    return f"[{_STATUS_STYLE[entry.status]}]{entry.status}[/] {escape(shorten(entry.input))}: {escape(detail or '')}"


def run_batch(
    run: Callable[[BatchObserver], Manifest],
    *,
    single: bool,
    manifest_path: Path | None,
    json_out: bool,
    quiet: bool,
) -> Manifest:
    """Run a batch (``run``, an API call given the progress observer) with progress, a summary and the exit
    code. A single plain input behaves like a single command: its error ends the command (exit 2).
    Otherwise the batch goes on after failures, writes the manifest and exits 1 when any input failed.
    Ctrl-C exits 130 once the manifest is written."""
    console = _console(quiet)
    with _ProgressView(console, batch=not single) as view:
        try:
            result = run(view)
        except KeyboardInterrupt:
            where = f"; {manifest_path} records what finished" if manifest_path is not None else ""
            print(f"interrupted: no partial outputs were left behind{where}", file=sys.stderr)
            raise typer.Exit(130) from None
    if single:
        console.print(_entry_line(result.entries[0]))
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
    title = f"{manifest.command}: {plural(len(manifest.entries), 'input')}"
    table = Table("input", "status", "seconds", "result", title=title)
    for e in manifest.entries:
        detail = e.error if e.status == "failed" else e.note
        table.add_row(escape(shorten(e.input)), f"[{_STATUS_STYLE[e.status]}]{e.status}[/]", f"{e.seconds:.1f}",
                      escape(detail or ""))
    console.print(table)
    counts = ", ".join(f"{n} {s}" for s, n in manifest.counts().items() if n)
    console.print(f"{counts}" + (f"; manifest: {escape(str(path))}" if path is not None else ""))
    if manifest.ignored:
        console.print(f"ignored {plural(len(manifest.ignored), 'file')} without an image suffix "
                      f"({', '.join(IMAGE_SUFFIXES)}): {_first_names(manifest.ignored)}")
    if manifest.earlier_outputs:
        console.print(f"left out {plural(len(manifest.earlier_outputs), 'earlier output')}, not inputs: "
                      f"{_first_names(manifest.earlier_outputs)}")


def _first_names(paths: list[str], count: int = 5) -> str:
    return escape(", ".join(Path(p).name for p in paths[:count]) + (", …" if len(paths) > count else ""))


# options shared by the generation commands --------------------------------------------------------


def _within(low: float, high: float, *, strict: bool = False, unit: str = "") -> Callable[[Any], Any]:
    """An option callback refusing a number outside [low, high] (``strict``: the open interval), NaN included."""
    def check(value: Any) -> Any:
        if value is not None and not (low < value < high if strict else low <= value <= high):
            if (low, high) == (-math.inf, math.inf):
                bounds = "be a finite number"
            elif high == math.inf:
                bounds = f"be {'greater than' if strict else 'at least'} {low:g} and finite"
            else:
                bounds = f"lie {'strictly between' if strict else 'in'} {low:g}{' and ' if strict else '..'}{high:g}"
            raise typer.BadParameter(f"must {bounds}{unit}, got {value:g}")
        return value

    return check


#: a distance: positive and finite
_POSITIVE = _within(0, math.inf, strict=True)


def _flag(*decls: str, help: str) -> Any:
    """A flag: its help shows no value, as it takes none (``--video``, not ``--video true``)."""
    return typer.Option(*decls, help=help, metavar="")


Prompts = Annotated[list[str], typer.Argument(help="Text prompt(s), each quoted; several make a batch.", show_default=False)]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
TextTeacher = Annotated[Optional[str], typer.Option(help="Teacher: mvdream (default).")]
NegativePrompt = Annotated[Optional[str], typer.Option(help="Negative prompt (default: the preset's).")]
TextModel = Annotated[Optional[str], typer.Option(help="Hugging Face id or local folder.")]
Preset = Annotated[Optional[str], typer.Option(help="Preset name (default: the teacher's).")]
NerfPreset = Annotated[Optional[str], typer.Option(help="Preset name (default: the teacher's NeRF preset, e.g. stable-zero123-nerf).")]
MeshRepresentation = Annotated[Optional[str], typer.Option(help="What SIR optimises before meshing: gaussians or nerf (default: the --config's, else gaussians; nerf takes the teacher's NeRF preset).")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="TOML config, or the JSON saved by an earlier run.")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed.")]
Iters = Annotated[Optional[int], typer.Option(help="SIR iterations K (after the init iteration).")]
Steps = Annotated[Optional[int], typer.Option(help="Reconstruction steps I per iteration.")]
TextViews = Annotated[Optional[int], typer.Option(help="Views B per iteration (a multiple of 4).")]
Res = Annotated[Optional[int], typer.Option(help="Render resolution.")]
Backend = Annotated[Optional[str], typer.Option(help="Gaussian rasterizer: auto, cpu, torch, gsplat.")]
NerfBackend = Annotated[Optional[str], typer.Option("--backend", help="NeRF ray marcher: auto, cpu, torch, nerfacc.")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps.")]
Video = Annotated[bool, _flag("--video", help="Also write a 360° turntable <stem>_turntable.mp4 (gif without ffmpeg).")]
VideoFormat = Annotated[Optional[str], typer.Option(help="Turntable format: mp4 or gif (implies --video).")]
Overwrite = Annotated[bool, _flag(help="Replace existing outputs.")]
SkipPrompts = Annotated[bool, _flag(help="Skip prompts whose outputs all exist (resume a batch).")]
BatchManifest = Annotated[Optional[Path], typer.Option(help="Batch manifest JSON (default OUT/manifest.json for batches).")]
JsonOut = Annotated[bool, _flag("--json", help="Print the run summary as JSON on stdout.")]
Quiet = Annotated[bool, _flag("--quiet", "-q", help="Print only errors.")]
ImageTeacher = Annotated[Optional[str], typer.Option("--teacher", help="Teacher: stable-zero123 (default), zero123-xl, imagedream (with --prompt; the default with --method lgm), reference; zero123plus with --method lgm only (experimental).")]
ImagePrompt = Annotated[Optional[str], typer.Option("--prompt", help="Text prompt for an image+text teacher (imagedream); optional there.")]
Model = Annotated[Optional[str], typer.Option("--model", help="Hugging Face id or local folder; for --teacher reference, a mesh; for --method geco, the run folder of `distill stage1` or `stage2`.")]
Views = Annotated[Optional[int], typer.Option(help="Views B per iteration.")]
Elevation = Annotated[Optional[float], typer.Option(help="Input view elevation in degrees (negative = photo from above).")]
Shading = Annotated[Optional[str], typer.Option(help="--teacher reference: its renders lit (a key light fixed to the object plus ambient, the default) or albedo.")]
Imperfection = Annotated[Optional[str], typer.Option(help="--teacher reference: none (default) or moderate, seeded defects that grow with t2 as a diffusion model's freedom does (see README).")]
BorderRatio = Annotated[Optional[float], typer.Option(help="Empty border around the recentred object (default 0.2).")]
Rembg = Annotated[Optional[bool], _flag("--rembg/--no-rembg", help="Background removal for images without alpha: force rembg, or never use it (plain uniform backgrounds). Default: rembg when installed.")]
SkipExisting = Annotated[bool, _flag(help="Skip inputs whose outputs all exist (resume a batch).")]
# where a batch runs: shared by every batch command
ExecutorName = Annotated[str, typer.Option("--executor", help="Where the inputs run: local (this process) or ray (workers of a Ray cluster, each with its own model; pip install 'microdreamer[ray]').")]
RayAddress = Annotated[Optional[str], typer.Option("--address", help="With --executor ray: a running Ray cluster (HOST:6379 or ray://HOST:10001; default RAY_ADDRESS, else Ray on this machine). --out must be on storage all its machines reach.")]
Workers = Annotated[Optional[int], typer.Option(help="With --executor ray: how many workers (default: as many as the cluster's GPUs, or CPUs, hold).")]
GpusPerWorker = Annotated[Optional[float], typer.Option(help="With --executor ray: GPUs per worker; 0.5 packs two workers on a GPU (default 1 when the cluster has GPUs, else 0).")]
CpusPerWorker = Annotated[Optional[float], typer.Option(help="With --executor ray: CPUs per worker, also its torch threads (default 1).")]
MaxAttempts = Annotated[Optional[int], typer.Option(help="With --executor ray: tries of an input whose worker dies under it (default 3).")]
Method = Annotated[Optional[str], typer.Option(help="sir (default): score-based iterative reconstruction; lgm: the teacher's four views → LGM → Gaussians in one network pass (imagedream, mvdream, reference, zero123plus); geco: a distilled GECO run (--model RUN_DIR) → Gaussians in one generator pass and one LGM pass.")]
Init = Annotated[Optional[str], typer.Option(help="Where SIR starts: random (default); lgm, LGM's Gaussians with a shorter schedule (presets *-lgm-init); geco, a GECO run's (--init-model) with the same schedule.")]
InitModel = Annotated[Optional[str], typer.Option(help="The GECO run SIR starts from with --init geco: the --out folder of `distill stage1` or `distill stage2`.")]
Reconstructor = Annotated[Optional[str], typer.Option(help="LGM weights for --method lgm / --init lgm (and a Stage I run's --method geco / --init geco): Hugging Face id or local folder holding model_fp16_fixrot.safetensors (default ashawkey/LGM).")]
ShardSpec = Annotated[Optional[str], typer.Option("--shard", help="Run only shard I of N (0 <= I < N; an input's shard is a hash of its name, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); its manifest is OUT/manifest.shard-I-of-N.json, joined by 'microdreamer manifest merge'.")]


@dataclass(frozen=True)
class _Where:
    """Where a batch runs: the executor, and the shard of the inputs (None: all)."""

    executor: Executor
    shard: "Shard | None"


def _where(executor: str, address: str | None, workers: int | None, gpus_per_worker: float | None,
           cpus_per_worker: float | None, max_attempts: int | None, shard: str | None) -> _Where:
    from .executors import Shard, make_executor

    return _Where(
        make_executor(executor, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                      cpus_per_worker=cpus_per_worker, max_attempts=max_attempts),
        None if shard is None else Shard.parse(shard),
    )


# image commands ------------------------------------------------------------------------------------

Inputs = Annotated[
    Optional[list[Path]],
    typer.Argument(help="Images (PNG/JPG/WebP), folders or globs. None with --config RUN.json: the run's input "
                        "image; else with --teacher reference: its front view.", show_default=False),
]


def _run_images(
    command: str,
    specs: list[Path],
    out: Path,
    *,
    mesh: bool,
    teacher: str | None,
    preset: str | None,
    config: Path | None,
    prompt: str | None,
    border_ratio: float | None,
    rembg: bool | None,
    video: bool,
    video_format: str | None,
    overwrite: bool,
    skip_existing: bool,
    manifest: Path | None,
    json_out: bool,
    quiet: bool,
    where: _Where,
    **flags: Any,
) -> None:
    """An image command through :meth:`Pipeline.run_batch`: everything is checked before the teacher loads."""
    from .api import Pipeline, check_run_outputs, resolve_config
    from .pipeline import PreprocessOptions, SavedRun

    pipe = Pipeline(resolve_config(teacher, preset, config, **flags))
    run = SavedRun.read(config)
    prompt = prompt if prompt is not None or run is None else run.prompt
    pipe.check_prompt(prompt)
    options = PreprocessOptions.resolve(config, border_ratio=border_ratio, remove_background=_removal(rembg))
    video_options = _video_options(video, video_format)
    check_run_outputs(out, manifest)
    _warn_cut_prompts(pipe.config, [prompt] if prompt else [], quiet)
    geco_run = {"geco": pipe.config.teacher.model}.get(pipe.config.method) or pipe.config.lgm.init_model
    if geco_run:  # --method geco, or --init geco
        from .distill.runs import LICENCE_LINE

        print(f"GECO run {geco_run}: {LICENCE_LINE}", file=sys.stderr)
    single = is_single_input(specs) and where.shard is None
    run_batch(
        lambda observer: pipe.run_batch(
            specs, out, mesh=mesh, prompt=prompt, config_file=config, preprocess=options, video=video_options,
            overwrite=overwrite, skip_existing=skip_existing, manifest=manifest, stop_on_error=single,
            observer=observer, command=command, executor=where.executor, shard=where.shard,
        ),
        single=single, manifest_path=batch_manifest_path(manifest, out, single, where.shard), json_out=json_out,
        quiet=quiet,
    )


@app.command("image2gs")
def image2gs(
    images: Inputs = None,
    out: Out = Path("out"),
    teacher: ImageTeacher = None,
    prompt: ImagePrompt = None,
    model: Model = None,
    shading: Shading = None,
    imperfection: Imperfection = None,
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
    method: Method = None,
    init: Init = None,
    reconstructor: Reconstructor = None,
    init_model: InitModel = None,
    border_ratio: BorderRatio = None,
    rembg: Rembg = None,
    video: Video = False,
    video_format: VideoFormat = None,
    overwrite: Overwrite = False,
    skip_existing: SkipExisting = False,
    manifest: BatchManifest = None,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = None,
    max_attempts: MaxAttempts = None,
    shard: ShardSpec = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Image(s) → 3D Gaussians (OUT/<stem>.ply, <stem>_views.png, <stem>_rgba.png, <stem>.json)."""
    _run_images(
        "image2gs", images or [], out, mesh=False, teacher=teacher, preset=preset, config=config, prompt=prompt,
        border_ratio=border_ratio, rembg=rembg, video=video, video_format=video_format, overwrite=overwrite,
        skip_existing=skip_existing, manifest=manifest, json_out=json_out, quiet=quiet,
        where=_where(executor, address, workers, gpus_per_worker, cpus_per_worker, max_attempts, shard), model=model, shading=shading, imperfection=imperfection, seed=seed,
        iters=iters, steps=steps, views=views, res=res, elevation=elevation, backend=backend, device=device,
        method=method, init=init, reconstructor=reconstructor, init_model=init_model,
        representation="gaussians",
    )


@app.command("image2nerf")
def image2nerf(
    images: Inputs = None,
    out: Out = Path("out"),
    teacher: ImageTeacher = None,
    prompt: ImagePrompt = None,
    model: Model = None,
    shading: Shading = None,
    imperfection: Imperfection = None,
    preset: NerfPreset = None,
    config: ConfigFile = None,
    seed: Seed = None,
    iters: Iters = None,
    steps: Steps = None,
    views: Views = None,
    res: Res = None,
    elevation: Elevation = None,
    nerf_backend: NerfBackend = None,
    device: Device = None,
    border_ratio: BorderRatio = None,
    rembg: Rembg = None,
    video: Video = False,
    video_format: VideoFormat = None,
    overwrite: Overwrite = False,
    skip_existing: SkipExisting = False,
    manifest: BatchManifest = None,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = None,
    max_attempts: MaxAttempts = None,
    shard: ShardSpec = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Image(s) → a NeRF (OUT/<stem>.safetensors, <stem>_views.png, <stem>_rgba.png, <stem>.json), with the
    paper's Table I NeRF settings for the teacher (stable-zero123-nerf by default). --res is the size of the
    reference view and the teacher's images; the renders follow the preset's progressive sizes
    (cameras.resolutions)."""
    _run_images(
        "image2nerf", images or [], out, mesh=False, teacher=teacher, preset=preset, config=config, prompt=prompt,
        border_ratio=border_ratio, rembg=rembg, video=video, video_format=video_format, overwrite=overwrite,
        skip_existing=skip_existing, manifest=manifest, json_out=json_out, quiet=quiet,
        where=_where(executor, address, workers, gpus_per_worker, cpus_per_worker, max_attempts, shard), model=model, shading=shading, imperfection=imperfection, seed=seed,
        iters=iters, steps=steps, views=views, res=res, elevation=elevation, nerf_backend=nerf_backend, device=device,
        representation="nerf",
    )


# mesh options, shared by image2mesh, text2mesh and export
MeshFormat = Annotated[Optional[str], typer.Option("--format", help="Mesh file: glb (default; embedded texture), obj (+mtl+png), ply (vertex colours).")]
Faces = Annotated[Optional[int], typer.Option(help="Face budget after decimation (default 50000).")]
TextureSize = Annotated[Optional[int], typer.Option(help="Texture side in texels, a power of two (default 1024).")]
Grid = Annotated[Optional[int], typer.Option(help="Density grid points per axis (default 256).")]
Threshold = Annotated[Optional[float], typer.Option(help="Iso-level of the density field (default: the preset's; 0.5 of the Gaussians' summed opacity, 25 of a NeRF's density).")]
RefineSteps = Annotated[Optional[int], typer.Option(help="Steps of the SIR texture refinement (default: the preset's, 30 for Zero123, 0 for the multi-view teachers; 0 = bake only).")]
MeshMethod = Annotated[Optional[str], typer.Option("--mesh-method", help="How the mesh is made: density (default): the representation's own density at --threshold; lgm: LGM's convert.py, a NeRF fitted to renders of the Gaussians, meshed at σ = 5, its vertices and texture fitted to the renders (Gaussians only).")]
Up = Annotated[Optional[str], typer.Option(help="Up axis of the file: y (default; glTF) or z (obj/ply only).")]
Scale = Annotated[Optional[float], typer.Option(help="Longest side of the object's box, centred at the origin (default 1).")]


@app.command("image2mesh")
def image2mesh(
    images: Inputs = None,
    out: Out = Path("out"),
    teacher: ImageTeacher = None,
    prompt: ImagePrompt = None,
    model: Model = None,
    shading: Shading = None,
    imperfection: Imperfection = None,
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
    method: Method = None,
    init: Init = None,
    reconstructor: Reconstructor = None,
    init_model: InitModel = None,
    border_ratio: BorderRatio = None,
    rembg: Rembg = None,
    representation: MeshRepresentation = None,
    mesh_format: MeshFormat = None,
    faces: Faces = None,
    texture_size: TextureSize = None,
    grid: Grid = None,
    threshold: Threshold = None,
    mesh_method: MeshMethod = None,
    refine_steps: RefineSteps = None,
    up: Up = None,
    scale: Scale = None,
    overwrite: Overwrite = False,
    skip_existing: SkipExisting = False,
    manifest: BatchManifest = None,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = None,
    max_attempts: MaxAttempts = None,
    shard: ShardSpec = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Image(s) → 3D Gaussians (or a NeRF) → textured mesh (image2gs or image2nerf outputs plus
    OUT/<stem>.glb and <stem>_mesh.json).

    The mesh is centred at the origin in a box of side --scale, Y-up with the input view's camera on +z
    (glTF convention). Its texture is baked from the Gaussians (sampled from a NeRF's colour field) and
    refined with one SIR pass of the teacher.
    """
    _run_images(
        "image2mesh", images or [], out, mesh=True, teacher=teacher, preset=preset, config=config, prompt=prompt,
        border_ratio=border_ratio, rembg=rembg, video=False, video_format=None, overwrite=overwrite,
        skip_existing=skip_existing, manifest=manifest, json_out=json_out, quiet=quiet,
        where=_where(executor, address, workers, gpus_per_worker, cpus_per_worker, max_attempts, shard), model=model, shading=shading, imperfection=imperfection, seed=seed,
        iters=iters, steps=steps, views=views, res=res, elevation=elevation, backend=backend, device=device,
        method=method, init=init, reconstructor=reconstructor, init_model=init_model,
        mesh_format=mesh_format, faces=faces, texture_size=texture_size, grid=grid, threshold=threshold,
        mesh_method=mesh_method, refine_steps=refine_steps, up=up, scale=scale, representation=representation,
    )


@app.command("export")
def export(
    result: Annotated[Path, typer.Argument(help="A 3DGS .ply written by image2gs/text2gs, or a NeRF .safetensors written by image2nerf/text2nerf.")],
    to: Annotated[str, typer.Option("--to", help="What to make of it: mesh.")] = "mesh",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: beside RESULT).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="The run's JSON report or a TOML config (default: RESULT's <stem>.json when present).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher that refines the texture (default: the run's).")] = None,
    model: Model = None,
    image: Annotated[Optional[Path], typer.Option(help="The run's input image (default: the one its report names).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="The run's prompt, for text and image+text teachers (default: the report's).")] = None,
    refine: Annotated[bool, _flag("--refine/--no-refine", help="Refine the baked texture with the teacher (one SIR pass).")] = True,
    mesh_format: MeshFormat = None,
    faces: Faces = None,
    texture_size: TextureSize = None,
    grid: Grid = None,
    threshold: Threshold = None,
    mesh_method: MeshMethod = None,
    refine_steps: RefineSteps = None,
    up: Up = None,
    scale: Scale = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed of the refinement (default: the run's).")] = None,
    device: Device = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """A saved 3DGS or NeRF run → textured mesh (<stem>.glb, or .obj+.mtl+_albedo.png, or _mesh.ply; <stem>_mesh.json)."""
    from .api import export_run

    if to != "mesh":
        raise UserError(f"--to must be mesh, got '{to}'")
    if not result.is_file():
        raise UserError(f"result not found: {result}")
    check_output_dir(out or result.parent, "--out" if out is not None else _BESIDE.format("RESULT"))
    console = _console(quiet)
    with console.status(f"meshing {escape(result.name)}") as status:
        outcome = export_run(
            result, out, config=config, teacher=teacher, image=image, prompt=prompt, refine=refine,
            overwrite=overwrite, on_stage=lambda stage: status.update(f"meshing {escape(result.name)}: {stage}"),
            model=model, seed=seed, device=device, mesh_format=mesh_format, faces=faces, texture_size=texture_size,
            grid=grid, threshold=threshold, mesh_method=mesh_method, refine_steps=refine_steps, up=up, scale=scale,
        )
    mesh = outcome.report
    console.print(f"[green]wrote[/] {escape(mesh.outputs[0])} ({mesh.faces} faces, "
                  f"{sum(mesh.timings.values()):.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in mesh.timings.items()) + ")")
    if not outcome.refined:
        console.print(f"no run report beside {escape(str(result))}: the texture is baked, not refined "
                      "(give --config, or --teacher/--model/--image, to refine it)")


def _warn_cut_prompts(cfg: "RunConfig", prompts: list[str], quiet: bool) -> None:
    """One warning line for each prompt the teacher's text encoder would cut, before the teacher loads."""
    from .teachers.registry import prompt_reader

    reader = prompt_reader(cfg) if prompts and not quiet else None
    if reader is None:
        return
    for prompt in prompts:
        kept = reader.cut(prompt)
        if kept is not None:
            tail = " ".join(kept.split()[-4:])
            print(f"warning: prompt '{shorten(prompt, 50)}' is longer than the {reader.length} tokens "
                  f"{cfg.teacher.name} reads: it is cut after '…{tail}'", file=sys.stderr)


# text commands -------------------------------------------------------------------------------------



def _run_prompts(
    command: str,
    prompts: list[str],
    out: Path,
    *,
    mesh: bool,
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
    where: _Where,
    **flags: Any,
) -> None:
    """One job per prompt through :meth:`Pipeline.run_batch`, the text-to-3D teacher loaded once; ``flags``
    are settings (:data:`microdreamer.api.SETTINGS`). A lone bad prompt fails before any model is loaded."""
    from .api import Pipeline, check_run_outputs, resolve_config
    from .pipeline import prompt_jobs

    jobs = prompt_jobs(prompts)
    single = len(jobs) == 1 and where.shard is None
    if single and jobs[0].problem is not None:
        raise UserError(jobs[0].problem)
    pipe = Pipeline(resolve_config(teacher or "mvdream", preset, config, **flags))
    if pipe.inputs != "text":
        raise UserError(f"{command} needs a text-to-3D teacher (mvdream), not '{pipe.config.teacher.name}'")
    video_options = _video_options(video, video_format)
    check_run_outputs(out, manifest)
    _warn_cut_prompts(pipe.config, [job.input for job in jobs if job.problem is None], quiet)
    run_batch(
        lambda observer: pipe.run_batch(
            prompts, out, mesh=mesh, video=video_options, overwrite=overwrite, skip_existing=skip_existing,
            manifest=manifest, stop_on_error=single, observer=observer, executor=where.executor, shard=where.shard,
        ),
        single=single, manifest_path=batch_manifest_path(manifest, out, single, where.shard), json_out=json_out,
        quiet=quiet,
    )


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
    method: Method = None,
    init: Init = None,
    reconstructor: Reconstructor = None,
    video: Video = False,
    video_format: VideoFormat = None,
    overwrite: Overwrite = False,
    skip_existing: SkipPrompts = False,
    manifest: BatchManifest = None,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = None,
    max_attempts: MaxAttempts = None,
    shard: ShardSpec = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Prompt(s) → 3D Gaussians (OUT/<prompt words>.ply, _views.png, .json)."""
    _run_prompts(
        "text2gs", prompts, out, mesh=False, teacher=teacher, preset=preset, config=config, video=video,
        video_format=video_format, overwrite=overwrite, skip_existing=skip_existing, manifest=manifest,
        json_out=json_out, quiet=quiet, where=_where(executor, address, workers, gpus_per_worker, cpus_per_worker, max_attempts, shard),
        model=model, seed=seed, iters=iters, steps=steps, views=views, res=res,
        backend=backend, device=device, negative_prompt=negative_prompt, representation="gaussians",
        method=method, init=init, reconstructor=reconstructor,
    )


@app.command("text2nerf")
def text2nerf(
    prompts: Prompts,
    out: Out = Path("out"),
    teacher: TextTeacher = None,
    negative_prompt: NegativePrompt = None,
    model: TextModel = None,
    preset: NerfPreset = None,
    config: ConfigFile = None,
    seed: Seed = None,
    iters: Iters = None,
    steps: Steps = None,
    views: TextViews = None,
    res: Res = None,
    nerf_backend: NerfBackend = None,
    device: Device = None,
    video: Video = False,
    video_format: VideoFormat = None,
    overwrite: Overwrite = False,
    skip_existing: SkipPrompts = False,
    manifest: BatchManifest = None,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = None,
    max_attempts: MaxAttempts = None,
    shard: ShardSpec = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Prompt(s) → a NeRF (OUT/<prompt words>.safetensors, _views.png, .json), MVDream with the paper's
    Table I NeRF settings (the mvdream-nerf preset)."""
    _run_prompts(
        "text2nerf", prompts, out, mesh=False, teacher=teacher, preset=preset, config=config, video=video,
        video_format=video_format, overwrite=overwrite, skip_existing=skip_existing, manifest=manifest,
        json_out=json_out, quiet=quiet, where=_where(executor, address, workers, gpus_per_worker, cpus_per_worker, max_attempts, shard),
        model=model, seed=seed, iters=iters, steps=steps, views=views, res=res, nerf_backend=nerf_backend,
        device=device, negative_prompt=negative_prompt, representation="nerf",
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
    representation: MeshRepresentation = None,
    method: Method = None,
    init: Init = None,
    reconstructor: Reconstructor = None,
    mesh_format: MeshFormat = None,
    faces: Faces = None,
    texture_size: TextureSize = None,
    grid: Grid = None,
    threshold: Threshold = None,
    mesh_method: MeshMethod = None,
    refine_steps: RefineSteps = None,
    up: Up = None,
    scale: Scale = None,
    video: Video = False,
    video_format: VideoFormat = None,
    overwrite: Overwrite = False,
    skip_existing: SkipPrompts = False,
    manifest: BatchManifest = None,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = None,
    max_attempts: MaxAttempts = None,
    shard: ShardSpec = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Prompt(s) → 3D Gaussians (or a NeRF) → textured mesh (text2gs or text2nerf outputs plus
    OUT/<prompt words>.glb and _mesh.json).

    The mesh is centred at the origin in a box of side --scale, Y-up (glTF convention). Its texture is
    baked from the Gaussians (sampled from a NeRF's colour field); the mvdream presets do not refine it (as
    the reference), --refine-steps N refines it with one SIR pass of the teacher.
    """
    _run_prompts(
        "text2mesh", prompts, out, mesh=True, teacher=teacher, preset=preset, config=config, video=video,
        video_format=video_format, overwrite=overwrite, skip_existing=skip_existing, manifest=manifest,
        json_out=json_out, quiet=quiet, where=_where(executor, address, workers, gpus_per_worker, cpus_per_worker, max_attempts, shard),
        model=model, seed=seed, iters=iters, steps=steps, views=views, res=res,
        backend=backend, device=device,
        method=method, init=init, reconstructor=reconstructor, negative_prompt=negative_prompt,
        mesh_format=mesh_format, faces=faces,
        texture_size=texture_size, grid=grid, threshold=threshold, mesh_method=mesh_method, refine_steps=refine_steps,
        up=up, scale=scale, representation=representation,
    )


@app.command("preprocess")
def preprocess_(
    images: Annotated[list[Path], typer.Argument(help="Images (PNG/JPG/WebP), folders or globs.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: beside each input).")] = None,
    size: Annotated[int, typer.Option(help="Output side in pixels.")] = 256,
    border_ratio: Annotated[float, typer.Option(help="Empty border around the recentred object.")] = 0.2,
    rembg: Rembg = None,
    overwrite: Overwrite = False,
    skip_existing: Annotated[bool, _flag(help="Skip inputs whose output exists.")] = False,
    manifest: Annotated[Optional[Path], typer.Option(help="Batch manifest JSON (default OUT/manifest.json with --out).")] = None,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = None,
    max_attempts: MaxAttempts = None,
    shard: ShardSpec = None,
    json_out: Annotated[bool, _flag("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: Quiet = False,
) -> None:
    """Mask, recentre and rescale images → <stem>_rgba.png (what every image command does first)."""
    from .api import preprocess_images
    from .pipeline import PreprocessOptions

    options = PreprocessOptions(border_ratio=border_ratio, remove_background=_removal(rembg) or "auto", size=size)
    where = _where(executor, address, workers, gpus_per_worker, cpus_per_worker, max_attempts, shard)
    single = is_single_input(images) and where.shard is None
    run_batch(
        lambda observer: preprocess_images(
            images, out, options=options, overwrite=overwrite, skip_existing=skip_existing, manifest=manifest,
            stop_on_error=single, observer=observer, executor=where.executor, shard=where.shard,
        ),
        single=single, manifest_path=batch_manifest_path(manifest, out, single, where.shard), json_out=json_out,
        quiet=quiet,
    )


@app.command("render")
def render(
    result: Annotated[Path, typer.Argument(help="A 3DGS .ply written by image2gs, a NeRF .safetensors written by image2nerf, or a mesh (.obj, .glb, .gltf).")],
    video: Annotated[Optional[Path], typer.Option(help="Output .mp4 or .gif (default: RESULT_turntable.mp4).")] = None,
    frames: Annotated[int, typer.Option(help="Frames over 360°.", callback=_within(*TURNTABLE_FRAMES))] = 90,
    fps: Annotated[int, typer.Option(help="Frames per second.", callback=_within(*TURNTABLE_FPS))] = 30,
    res: Annotated[int, typer.Option(help="Frame size in pixels.", callback=_within(*TURNTABLE_RESOLUTION))] = 512,
    elevation: Annotated[float, typer.Option(
        help="Camera elevation in degrees (negative = from above).",
        callback=_within(-ELEVATION_LIMIT, ELEVATION_LIMIT, strict=True, unit=" degrees"))] = 0.0,
    radius: Annotated[float, typer.Option(help="Camera distance.", callback=_POSITIVE)] = 2.0,
    fovy: Annotated[float, typer.Option(
        help="Vertical field of view in degrees.", callback=_within(0, 180, strict=True, unit=" degrees"))] = 49.1,
    azimuth: Annotated[float, typer.Option(
        help="Azimuth of the first frame in degrees.", callback=_within(-math.inf, math.inf, strict=True))] = 0.0,
    normalize: Annotated[bool, _flag(help="Fit a mesh into the unit box first.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
    overwrite: Annotated[bool, _flag(help="Replace an existing video.")] = False,
    quiet: Quiet = False,
) -> None:
    """A 360° turntable video of a saved result."""
    from .api import render_video
    from .video import VideoOptions, default_format, format_of

    target = video or result.with_name(f"{result.stem}_turntable.{default_format()}")
    options = VideoOptions(format=format_of(target), frames=frames, fps=fps, resolution=res)
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists: pass --overwrite to replace it, or choose another --video")
    check_output_file(target, "--video" if video is not None else _BESIDE.format("RESULT"))
    console = _console(quiet)
    with _status(console, f"rendering {plural(frames, 'frame')} of {escape(result.name)}"):
        render_video(result, target, options=options, elevation=elevation, radius=radius, fovy=fovy,
                     azimuth=azimuth, normalize=normalize, device=device, overwrite=overwrite)
    console.print(f"[green]wrote[/] {escape(str(target))} ({plural(frames, 'frame')}, {res}x{res}, {fps} fps)")


EVAL_PROTOCOLS = ("held-out", "clip", "geco")


@app.command("eval")
def eval_(
    result: Annotated[Path, typer.Argument(help="A 3DGS .ply written by image2gs, a NeRF .safetensors written by image2nerf, or a mesh written by image2mesh/export (.glb, .obj, _mesh.ply; Y-up).")],
    reference: Annotated[Optional[Path], typer.Option(help="Ground-truth mesh (.obj, .glb, .gltf) of the held-out protocol.")] = None,
    protocol: Annotated[str, typer.Option(help="held-out: PSNR/SSIM on 16 held-out views against --reference; clip: CLIP similarity of 8 views at elevation 0 to the run's input image or prompt (MicroDreamer's Table III); geco: PSNR/SSIM (and LPIPS with --lpips-vgg/--lpips-heads) against --reference on the six Zero123++ views and 15 azimuths at elevation 0 (GECO's Table 1).")] = "held-out",
    lpips_vgg: Annotated[Optional[Path], typer.Option(help="--protocol geco: torchvision's VGG16 weights (vgg16-397923af.pth) for LPIPS.")] = None,
    lpips_heads: Annotated[Optional[Path], typer.Option(help="--protocol geco: the lpips v0.1 VGG heads (vgg.pth) for LPIPS.")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="The CLIP checkpoint of --protocol clip: a folder in the transformers layout or a Hugging Face id (the paper's: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k).")] = None,
    image: Annotated[Optional[Path], typer.Option(help="--protocol clip: compare with this image (default: the run's preprocessed input, else its input image).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="--protocol clip: compare with this text (default: the run's prompt when it had no input image).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the scores to this JSON file.")] = None,
    radius: Annotated[Optional[float], typer.Option(help="Camera distance (default: 2 for the held-out views; the run's reference-view distance for clip).", callback=_POSITIVE)] = None,
    res: Annotated[Optional[int], typer.Option(help="Render resolution (default: 256 for held-out, 512 for clip).", callback=_within(*RESOLUTION))] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
    shading: Annotated[Optional[str], typer.Option(help="Render the reference lit or albedo (default: as the run's report beside the result says, else lit).")] = None,
) -> None:
    """PSNR and SSIM on 16 held-out views against a reference mesh; for a mesh result also Chamfer
    distance, F-score at 0.01 and 0.05 and normal consistency. The reference is fitted into the unit
    box; a mesh goes back into its run's frame through the <stem>_mesh.json beside it, else it is
    fitted into the unit box too. With --protocol clip: the CLIP similarity of 8 albedo renders to the
    run's input image or prompt, per view and their mean."""
    from .metrics_clip import PAPER_MODEL

    if not result.is_file():
        raise UserError(f"result not found: {result}")
    if protocol not in EVAL_PROTOCOLS:
        raise UserError(f"unknown protocol '{protocol}' (use {', '.join(EVAL_PROTOCOLS[:-1])} or {EVAL_PROTOCOLS[-1]})")
    if json_out is not None and json_out.exists():
        raise UserError(f"{json_out} already exists: remove it or choose another --json path")
    if json_out is not None:
        check_output_file(json_out, "--json")
    if protocol != "geco" and (lpips_vgg is not None or lpips_heads is not None):
        raise UserError("--lpips-vgg and --lpips-heads belong to --protocol geco")
    if protocol == "clip":
        if reference is not None or shading is not None:
            raise UserError("--reference and --shading belong to the held-out protocol; --protocol clip compares "
                            "with the run's input image or prompt (--image, --prompt)")
        if clip_model is None:
            raise UserError("--protocol clip needs --clip-model: a CLIP checkpoint folder in the transformers layout "
                            f"or a Hugging Face id (the paper's: {PAPER_MODEL})")
        report = _eval_clip(result, clip_model, image, prompt, radius, res, device)
    else:
        if clip_model is not None or image is not None or prompt is not None:
            raise UserError("--clip-model, --image and --prompt belong to --protocol clip")
        if reference is None and protocol == "geco":
            raise UserError("eval --protocol geco needs --reference MESH (the ground truth of its views)")
        if protocol == "geco":
            report = _eval_geco(result, reference, lpips_vgg, lpips_heads, shading, radius, res, device)
        elif reference is None:
            raise UserError("eval needs --reference MESH (the ground truth of the held-out views), or --protocol clip")
        else:
            report = _eval_held_out(result, reference, shading, radius, res, device)
    if json_out is not None:
        from .io.atomic import atomic_path

        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2))


def _eval_held_out(result: Path, reference: Path, shading: str | None, radius: float | None, res: int | None,
                   device: str) -> "EvalReport":
    from .api import evaluate
    from .evaluate import MeshEvalReport
    from .render.mesh import shading_light

    if shading is not None:
        shading_light(shading)  # one line for an unknown mode
    report = evaluate(result, reference, device=device, radius=2.0 if radius is None else radius,
                      resolution=res or 256, shading=shading)
    table = Table("view", "elevation", "azimuth", "PSNR (dB)", "SSIM", "albedo PSNR",
                  title=f"{result.name} vs {reference.name} ({report.shading})")
    for v in report.views:
        table.add_row(str(v.view), f"{v.elevation:.1f}", f"{v.azimuth:.2f}", f"{v.psnr:.2f}", f"{v.ssim:.4f}",
                      f"{v.albedo_psnr:.2f}")
    table.add_row("mean", "", "", f"{report.mean_psnr:.2f}", f"{report.mean_ssim:.4f}",
                  f"{report.mean_albedo_psnr:.2f}", style="bold")
    console = _console(stderr=False)
    console.print(table)
    if isinstance(report, MeshEvalReport):
        s = report.surface
        console.print(
            f"surface ({'run frame' if report.frame == 'run' else 'unit box'}): Chamfer {s.chamfer:.4f}, "
            f"F-score@0.01 {s.fscore[0.01]:.3f}, "
            f"F-score@0.05 {s.fscore[0.05]:.3f}, normal consistency {s.normal_consistency:.3f}"
        )
    return report


def _eval_geco(result: Path, reference: Path, lpips_vgg: Path | None, lpips_heads: Path | None,
               shading: str | None, radius: float | None, res: int | None, device: str) -> "GECOEvalReport":
    from .api import evaluate_geco
    from .render.mesh import shading_light

    if shading is not None:
        shading_light(shading)  # one line for an unknown mode
    report = evaluate_geco(result, reference, lpips_vgg=lpips_vgg, lpips_heads=lpips_heads, device=device,
                           radius=2.0 if radius is None else radius, resolution=res or 256, shading=shading)
    table = Table("view", "set", "elevation", "azimuth", "PSNR (dB)", "SSIM", "LPIPS",
                  title=escape(f"{result.name} vs {reference.name} ({report.shading}, GECO's views)"))

    def lpips(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for v in report.views:
        table.add_row(str(v.view), v.set, f"{v.elevation:.1f}", f"{v.azimuth:.1f}", f"{v.psnr:.2f}",
                      f"{v.ssim:.4f}", lpips(v.lpips))
    for name in ("zero123plus", "azimuths", None):
        m = report.means(name)
        table.add_row("mean", name or "all", "", "", f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", lpips(m["lpips"]),
                      style="bold")
    _console(stderr=False).print(table)
    return report


def _eval_clip(result: Path, clip_model: str, image: Path | None, prompt: str | None, radius: float | None,
               res: int | None, device: str) -> "ClipEvalReport":
    from .api import evaluate_clip
    from .evaluate_clip import CLIP_RESOLUTION

    report = evaluate_clip(result, clip_model, image=image, prompt=prompt, device=device, radius=radius,
                           resolution=res or CLIP_RESOLUTION)
    against = f'"{shorten(report.target.prompt)}"' if report.target.text else Path(report.target.source).name
    table = Table("view", "elevation", "azimuth", "CLIP similarity", title=escape(f"{result.name} vs {against} (CLIP)"))
    for v in report.views:
        table.add_row(str(v.view), f"{v.elevation:.1f}", f"{v.azimuth:.1f}", f"{v.similarity:.4f}")
    table.add_row("mean", "", "", f"{report.similarity:.4f}", style="bold")
    console = _console(stderr=False)
    console.print(table)
    console.print(f"CLIP model: {escape(report.model)}; views from distance {report.radius:g} at fovy "
                  f"{report.fovy:g}, {report.resolution}x{report.resolution}")
    return report


@app.command("selftest")
def selftest(
    out: Annotated[Optional[Path], typer.Option(help="Keep the outputs here (default: a temporary folder).")] = None,
    min_psnr: Annotated[float, typer.Option(
        help="Fail below this mean held-out PSNR (dB).", callback=_within(0, 100))] = SELFTEST_MIN_PSNR,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
) -> None:
    """Reconstruct the bundled CC0 Spot cow with the reference teacher and check the held-out PSNR."""
    from .api import SELFTEST_MESH, Progress, selftest as run_selftest
    from .pipeline import resolve_device

    console = _console()
    dev = resolve_device(device)
    if out is not None:
        check_output_dir(out)
    console.print(f"selftest: the Spot cow from its front view with the reference teacher on {dev} "
                  "(a first run also builds the C++ kernels, about a minute)", markup=False, highlight=False)
    with _ProgressView(console, batch=False) as view:
        view.job_started(0, Job("spot", str(SELFTEST_MESH)))

        def show(event: Progress) -> None:
            if event.stage == "load":
                view.loading(event.done == 0)
            elif event.stage == "score":
                view.say(event.info)
            else:
                view.step(event.done, event.total, event.info)

        outcome = run_selftest(out, device=device, on_progress=show)
    report, scores = outcome.report, outcome.scores
    ok = scores.mean_psnr >= min_psnr
    verdict = "[green]PASS[/]" if ok else "[red]FAIL[/]"
    console.print(
        f"{verdict} selftest ({scores.shading} teacher): mean held-out PSNR {scores.mean_psnr:.2f} dB "
        f"(threshold {min_psnr:.1f}), "
        f"SSIM {scores.mean_ssim:.4f}, {report.timings['sir']:.1f} s SIR on {outcome.device}, "
        f"{plural(report.primitives, 'Gaussian')}"
    )
    if not ok:
        raise typer.Exit(1)


@manifest_app.command("merge")
def manifest_merge(
    shards: Annotated[list[Path], typer.Argument(help="Output folders holding the shards' manifests (manifest.shard-I-of-N.json), or those files.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The joined manifest (default: manifest.json beside the first shard's).")] = None,
    overwrite: Annotated[bool, _flag(help="Replace an existing manifest.")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Join the manifests of a batch's shards (--shard I/N) into the manifest of the whole batch, its inputs in
    the unsharded order. Every shard must be there once; exits 1 when any input failed, as the batch would."""
    from .executors.shard import merge_manifests, merged_manifest_path, shard_manifests

    paths = shard_manifests(shards)
    merged = merge_manifests(paths)
    target = out or merged_manifest_path(paths[0])
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists: pass --overwrite to replace it, or choose another --out")
    check_output_file(target, "--out")
    merged.write(target)
    console = _console(quiet)
    console.print(f"joined {plural(len(paths), 'shard manifest')} into {escape(str(target))}")
    if not quiet:
        _print_summary(console, merged, target)
    if json_out:
        _print_json(merged.to_dict())
    if merged.failed:
        raise typer.Exit(1)


# models, presets, doctor ---------------------------------------------------------------------------

CacheDir = Annotated[Optional[Path], typer.Option(help="Hugging Face hub cache (default: HF_HUB_CACHE).")]


@models_app.command("list")
def models_list(
    cache_dir: CacheDir = None,
    json_out: Annotated[bool, _flag("--json", help="Print JSON on stdout.")] = False,
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
    console = _console(stderr=False)
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
    console.print("Generators and students distilled from Zero123++ by `microdreamer distill` inherit its weights' "
                  "licence: CC-BY-NC 4.0, non-commercial use only (NOTICE.txt in each run folder).")


@models_app.command("download")
def models_download(
    name: Annotated[str, typer.Argument(help="Teacher name, as in `microdreamer models list`.")],
    cache_dir: CacheDir = None,
) -> None:
    """Fetch one teacher's configs and safetensors weights into the Hugging Face cache."""
    from .teachers.catalog import cache_status, download, find_entry, hub_cache

    entry = find_entry(name)
    if not cache_status(entry, cache_dir)[0]:
        option = "--cache-dir" if cache_dir is not None else "--cache-dir (default: HF_HUB_CACHE)"
        check_output_dir(hub_cache(cache_dir), option)
    console = _console()
    if not entry.commercial_use:
        console.print(f"[bold yellow]licence:[/] {escape(entry.license)}")
    with _status(console, f"fetching {entry.repo_id} (about {entry.approx_size_gb:.1f} GB)"):
        folder = download(entry, cache_dir)
    console.print(f"[green]ready[/] {entry.name}: {escape(str(folder))}")
    typer.echo(str(folder))


@presets_app.command("list")
def presets_list(json_out: Annotated[bool, _flag("--json", help="Print JSON on stdout.")] = False) -> None:
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
    _console(stderr=False).print(table)


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name.")],
    json_out: Annotated[bool, _flag("--json", help="Print JSON instead of TOML.")] = False,
) -> None:
    """The preset resolved over the defaults, as a TOML file usable with --config."""
    from .config import resolve

    data = resolve(name).to_dict()
    if json_out:
        _print_json(data)
    else:
        sys.stdout.write(_to_toml(data))


def _to_toml(data: dict[str, Any]) -> str:
    """Our configs as TOML: top-level values, then one table per section, nested sections as dotted
    tables after their parent's values (None values are left out)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    def table(name: str, items: dict[str, Any]) -> list[str]:
        lines = ([""] if name else []) + ([f"[{name}]"] if name else [])
        lines += [f"{k} = {value(v)}" for k, v in items.items() if not isinstance(v, dict) and v is not None]
        for key, sub in items.items():
            if isinstance(sub, dict):
                lines += table(f"{name}.{key}" if name else key, sub)
        return lines

    return "\n".join(table("", data)) + "\n"


@app.command("doctor")
def doctor(
    json_out: Annotated[bool, _flag("--json", help="Print JSON on stdout.")] = False,
    build: Annotated[bool, _flag(help="Build the C++ kernels to check them (cached after the first time).")] = True,
    cache_dir: CacheDir = None,
) -> None:
    """What this machine can run: torch and devices, GPU memory, backends, cached models, ffmpeg."""
    from .doctor import run_checks, to_dict

    console = _console()
    with _status(console, "checking (the first run builds the C++ kernels, about a minute)"):
        checks = run_checks(build_kernels=build, cache_dir=cache_dir)
    report = to_dict(checks)
    if json_out:
        _print_json(report)
    else:
        table = Table("section", "check", "status", "detail", title="microdreamer doctor")
        for c in checks:
            style = _CHECK_STYLE.get(c.status, "")
            table.add_row(c.section, c.name, f"[{style}]{c.status}[/]", escape(c.detail))
        _console(stderr=False).print(table)
    if not report["ok"]:
        raise typer.Exit(1)


# entry point ---------------------------------------------------------------------------------------

# Typer may vendor its own click: take the usage-error class from its exception hierarchy.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


#: words that read as a value given to a flag (``--video true``)
_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _check_flags_take_no_value(command: Any, argv: list[str]) -> None:
    """``--video true`` would make ``true`` an input (an image path, a second prompt): refuse it in one line."""
    args = list(argv)
    while getattr(command, "commands", None) and args and args[0] in command.commands:
        command = command.commands[args.pop(0)]
    flags = {name: param for param in command.params if getattr(param, "is_flag", False)
             for name in (*param.opts, *param.secondary_opts)}
    for option, word in zip(args, args[1:]):
        if option == "--":
            return
        if option in flags and word.lower() in _BOOLEAN_WORDS and not Path(word).exists():
            off = flags[option].secondary_opts
            how = f"write {option} to turn it on" + (f", {off[0]} to turn it off" if off else ", or leave it out")
            raise UserError(f"{option} is a flag and takes no value: {how}, not '{option} {word}'")


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Library warnings (a slow fallback in use) as one ``warning: …`` line on stderr, not Python's two."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        yield


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure is one line on stderr and exit code 2; Ctrl-C is 130."""
    command = typer.main.get_command(app)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["--help"]
    try:
        _check_flags_take_no_value(command, argv)
        with _one_line_warnings():
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


# distillation (GECO) -------------------------------------------------------------------------------

distill_app = typer.Typer(
    help="GECO distillation: condition images, Stage I (Zero123++ → a one-step generator by VSD), Stage II "
    "(generator and LGM fine-tuned together on pseudo ground truth).",
    no_args_is_help=True,
)
app.add_typer(distill_app, name="distill")

_Opt = typer.Option


@distill_app.command("prepare")
def distill_prepare(
    inputs: Annotated[list[Path], typer.Argument(help="Meshes (.obj, .glb, .gltf), images, or folders of them (searched recursively).", show_default=False)],
    out: Annotated[Path, _Opt("--out", "-o", help="Output folder: condition images and manifest.json.")],
    size: Annotated[int, _Opt(help="Side of the square condition images (at least 320).")] = 320,
    views: Annotated[int, _Opt(help="Condition images per mesh, at azimuths evenly spaced from 0.")] = 1,
    border_ratio: Annotated[float, _Opt(help="Empty border around the recentred object.")] = 0.2,
    rembg: Rembg = None,
    device: Annotated[str, _Opt(help="Device of the mesh renderer: cpu, cuda.")] = "cpu",
    overwrite: Annotated[bool, _flag(help="Replace the condition images of an earlier prepare in OUT.")] = False,
    json_out: Annotated[bool, _flag("--json", help="Print the manifest's summary as JSON on stdout.")] = False,
    quiet: Quiet = False,
) -> None:
    """Condition images as GECO trains on them: elevation 0, gray 127 background, square; and OUT/manifest.json."""
    from .distill.data import MANIFEST, PrepareOptions, prepare_conditions

    options = PrepareOptions(size=size, views=views, border_ratio=border_ratio,
                             remove_background=_removal(rembg) or "auto", overwrite=overwrite, device=device)
    console = _console(quiet)

    def show(index: int, total: int, path: Path, error: str | None) -> None:
        state = f"[red]failed[/] {escape(error)}" if error else "[green]done[/]"
        console.print(f"[{index + 1}/{total}] {escape(path.name)}: {state}")

    report = prepare_conditions(inputs, out, options, on_input=show)
    summary = {"out": str(report.out), "manifest": str(report.out / MANIFEST), "images": len(report.items),
               "failed": report.failed, "ignored": report.ignored}
    if json_out:
        _print_json(summary)
    if report.ignored:
        console.print(f"ignored {plural(len(report.ignored), 'file')} that are neither images nor meshes")
    console.print(f"wrote {plural(len(report.items), 'condition image')} and {MANIFEST} in {escape(str(report.out))}"
                  + (f"; [red]{plural(len(report.failed), 'input')} failed[/]" if report.failed else ""))
    if report.failed:
        raise typer.Exit(1)


def _distill_settings(**options: Any) -> dict[str, Any]:
    """The options the user gave (None: not given), as distillation settings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v is not None}


def _numbers(option: str, text: str | None, kind: type, count: int | None = None) -> tuple | None:
    """A comma-separated list of ``kind`` (``count`` of them when given) from ``text``; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(kind(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count):
        what = f"{count} comma-separated numbers" if count else "comma-separated numbers"
        raise UserError(f"{option} takes {what}, got {text!r}")
    return values


def _training_progress(
    console: Console, out: Path, step_line: Callable[[dict[str, Any]], str]
) -> Callable[[dict[str, Any]], None]:
    """What a distillation run says about its events (``step_line``: a step's losses)."""
    from .distill.runs import LICENCE_LINE

    steps = 1

    def show(event: dict[str, Any]) -> None:
        nonlocal steps
        kind = event["event"]
        if kind == "loaded":
            steps = event["steps"]
            start = f"resuming at step {event['step']}" if event["step"] else "starting"
            console.print(f"{start} of {steps} ({plural(event['processes'], 'process', 'processes')}); "
                          + LICENCE_LINE)
        elif kind == "pseudo_gt_progress":
            console.print(f"pseudo ground truth: {event['done']}/{event['total']} samples made")
        elif kind == "pseudo_gt":
            made = f"made {event['made']}" if event["made"] else "all cached"
            console.print(f"pseudo ground truth: {plural(event['samples'], 'sample')} ({made}) in "
                          f"{escape(event['folder'])}")
        elif kind == "step" and (event["step"] % max(1, steps // 100) == 0 or event["step"] == steps):
            console.print(f"step {event['step']}/{steps}: {step_line(event)} ({event['seconds']:.2f} s)")
        elif kind == "checkpoint":
            console.print(f"[green]checkpoint[/] {escape(event['path'])}")
        elif kind == "validation":
            console.print(f"validation at step {event['step']}: PSNR {event['psnr']:.2f} dB "
                          f"({escape(event['sheet'])})")
        elif kind == "finished":
            console.print(f"[green]done[/]: step {event['step']} in {escape(str(out))}")

    return show


_Resume = Annotated[bool, _flag(help="Continue the run in OUT from its newest complete checkpoint, exactly.")]
_CheckpointEvery = Annotated[Optional[int], _Opt(help="Steps between checkpoints (default 500; the last step always).")]
_KeepCheckpoints = Annotated[Optional[int], _Opt(help="Newest complete checkpoints kept (default 1).")]
_ValidateEvery = Annotated[Optional[int], _Opt(help="Steps between validations (default 500; 0: never).")]
_Precision = Annotated[Optional[str], _Opt(help="auto (bf16 autocast on CUDA, else fp32), fp32, bf16.")]
_Offline = Annotated[bool, _flag(help="Never download a model.")]


@distill_app.command("stage1")
def distill_stage1(
    out: Annotated[Path, _Opt("--out", "-o", help="Run folder: settings, log, checkpoints, validation sheets.")],
    data: Annotated[Optional[Path], _Opt(help="Condition images made by `microdreamer distill prepare`.")] = None,
    model: Annotated[Optional[str], _Opt(help="Zero123++ v1.1 folder or Hugging Face id (default: sudo-ai/zero123plus-v1.1).")] = None,
    resume: _Resume = False,
    steps: Annotated[Optional[int], _Opt(help="Train up to this step (GECO: 5000).")] = None,
    batch_size: Annotated[Optional[int], _Opt(help="Condition images per process and step (default 1).")] = None,
    seed: Seed = None,
    lr_generator: Annotated[Optional[float], _Opt(help="Adam learning rate of the generator (GECO: 1e-6).")] = None,
    lr_student: Annotated[Optional[float], _Opt(help="Adam learning rate of the student (GECO: 1e-6).")] = None,
    t_min: Annotated[Optional[float], _Opt(help="Lowest timestep fraction (GECO: 0.02).")] = None,
    t_max: Annotated[Optional[float], _Opt(help="Highest timestep fraction (GECO: 0.98).")] = None,
    generator_timestep: Annotated[Optional[int], _Opt(help="Timestep t* at which the one-step generator runs (default 999).")] = None,
    guidance_teacher: Annotated[Optional[float], _Opt(help="Teacher guidance scale (GECO: 4).")] = None,
    guidance_generator: Annotated[Optional[float], _Opt(help="Generator guidance scale (GECO: 4).")] = None,
    guidance_student: Annotated[Optional[float], _Opt(help="Student guidance scale (GECO: 1).")] = None,
    weighting: Annotated[Optional[str], _Opt(help="VSD weighting w(t): dmd (default), sds, constant.")] = None,
    view_size: Annotated[Optional[int], _Opt(help="Pixels per generated view (default 320).")] = None,
    precision: _Precision = None,
    device: Device = None,
    checkpoint_every: _CheckpointEvery = None,
    keep_checkpoints: _KeepCheckpoints = None,
    validate_every: _ValidateEvery = None,
    validation_images: Annotated[Optional[int], _Opt(help="Condition images validated (the first ones; default 4).")] = None,
    validation_steps: Annotated[Optional[int], _Opt(help="Sampling steps of the teacher's reference grids (default 75).")] = None,
    offline: _Offline = False,
    quiet: Quiet = False,
) -> None:
    """Stage I: distil Zero123++ v1.1 into a one-step multi-view generator (VSD, GECO §3.1). Under
    `torchrun --nproc_per_node N` the global batch is split over N processes. The weights are non-commercial."""
    from .distill.stage1 import run_stage1, stage1_config

    settings = _distill_settings(
        data=data, model=model, steps=steps, batch_size=batch_size, seed=seed, lr_generator=lr_generator,
        lr_student=lr_student, t_min=t_min, t_max=t_max, generator_timestep=generator_timestep,
        guidance_teacher=guidance_teacher, guidance_generator=guidance_generator, guidance_student=guidance_student,
        weighting=weighting, view_size=view_size, precision=precision, device=device,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, validate_every=validate_every,
        validation_images=validation_images, validation_steps=validation_steps,
        allow_download=False if offline else None,
    )
    config = stage1_config(out, settings, resume)
    show = _training_progress(_console(quiet), out, lambda e: f"generator {e['generator_loss']:.4g}, "
                                                            f"student {e['student_loss']:.4g}")
    run_stage1(config, out, resume=resume, on_event=show)


@distill_app.command("stage2")
def distill_stage2(
    out: Annotated[Path, _Opt("--out", "-o", help="Run folder: settings, log, pseudo ground truth, checkpoints, validation sheets.")],
    data: Annotated[Optional[Path], _Opt(help="Condition images made by `microdreamer distill prepare`.")] = None,
    model: Annotated[Optional[Path], _Opt(help="The Stage I run to fine-tune (the --out of `distill stage1`).")] = None,
    reconstructor: Annotated[Optional[str], _Opt(help="LGM weights: Hugging Face id, folder or .safetensors file (default: ashawkey/LGM).")] = None,
    teacher: Annotated[Optional[str], _Opt(help="Zero123++ v1.1 of the pseudo ground truth (default: the Stage I run's).")] = None,
    pseudo_gt: Annotated[Optional[Path], _Opt(help="Pseudo-ground-truth cache, reusable by runs with the same settings (default: OUT/pseudo_gt).")] = None,
    lpips_vgg: Annotated[Optional[Path], _Opt(help="torchvision's VGG16 weights for LPIPS (vgg16-397923af.pth).")] = None,
    lpips_heads: Annotated[Optional[Path], _Opt(help="lpips' v0.1 VGG heads (weights/v0.1/vgg.pth).")] = None,
    lambda_lpips: Annotated[Optional[float], _Opt(help="λ of MSE + λ·LPIPS (default 1, LGM's; 0: MSE alone, no LPIPS weights needed).")] = None,
    resume: _Resume = False,
    steps: Annotated[Optional[int], _Opt(help="Train up to this step (default: --epochs passes over the samples).")] = None,
    epochs: Annotated[Optional[int], _Opt(help="Passes over the samples when --steps is not given (GECO: 10).")] = None,
    batch_size: Annotated[Optional[int], _Opt(help="Samples per process and step (default 1; GECO: 8 in all).")] = None,
    seed: Seed = None,
    lr_generator: Annotated[Optional[float], _Opt(help="Adam learning rate of the generator (GECO: 1e-6).")] = None,
    lr_reconstructor: Annotated[Optional[float], _Opt(help="Adam learning rate of LGM (GECO: 1e-6).")] = None,
    teacher_steps: Annotated[Optional[int], _Opt(help="Deterministic sampling steps of the pseudo ground truth (GECO: 75).")] = None,
    teacher_guidance: Annotated[Optional[float], _Opt(help="Guidance scale of the pseudo ground truth (default 4).")] = None,
    samples_per_image: Annotated[Optional[int], _Opt(help="Noise draws, each a sample, per condition image (default 1).")] = None,
    poses: Annotated[Optional[int], _Opt(help="Random viewpoints per sample (GECO: 50).")] = None,
    pose_elevations: Annotated[Optional[str], _Opt(help="LOW,HIGH elevations of the viewpoints, degrees, negative = above (default -30,20).")] = None,
    fovy: Annotated[Optional[float], _Opt(help="Field of view of Zero123++'s views and of the renders, degrees (default 30).")] = None,
    lgm_views: Annotated[Optional[str], _Opt(help="The Zero123++ views LGM sees, of 0..5 (default 0,1,3,4; all six: 0,1,2,3,4,5).")] = None,
    background: Annotated[Optional[str], _Opt(help="white (default): the views moved onto LGM's white; gray: as generated.")] = None,
    render_views: Annotated[Optional[int], _Opt(help="Poses of a sample rendered per step (default 8).")] = None,
    render_size: Annotated[Optional[int], _Opt(help="Render side in pixels (default 256).")] = None,
    renderer: Annotated[Optional[str], _Opt(help="Gaussian rasterizer: auto, torch, cpu, gsplat.")] = None,
    precision: _Precision = None,
    device: Device = None,
    checkpoint_every: _CheckpointEvery = None,
    keep_checkpoints: _KeepCheckpoints = None,
    validate_every: _ValidateEvery = None,
    validation_images: Annotated[Optional[int], _Opt(help="Samples validated (the first ones; default 4).")] = None,
    validation_views: Annotated[Optional[int], _Opt(help="Poses rendered per validated sample (default 4).")] = None,
    offline: _Offline = False,
    quiet: Quiet = False,
) -> None:
    """Stage II: fine-tune a Stage I generator and LGM together on pseudo ground truth (Zero123++'s 75-step
    views → LGM → Gaussians, rendered from 50 random poses) with MSE + λ·LPIPS (GECO §3.2). Under
    `torchrun --nproc_per_node N` the global batch is split over N processes. The weights are non-commercial."""
    from .distill.stage2 import run_stage2, stage2_config

    settings = _distill_settings(
        data=data, model=model, reconstructor=reconstructor, teacher=teacher, pseudo_gt=pseudo_gt,
        lpips_vgg=lpips_vgg, lpips_heads=lpips_heads, lambda_lpips=lambda_lpips, steps=steps, epochs=epochs,
        batch_size=batch_size, seed=seed, lr_generator=lr_generator, lr_reconstructor=lr_reconstructor,
        teacher_steps=teacher_steps, teacher_guidance=teacher_guidance, samples_per_image=samples_per_image,
        poses=poses, pose_elevations=_numbers("--pose-elevations", pose_elevations, float, 2), fovy=fovy,
        lgm_views=_numbers("--lgm-views", lgm_views, int), background=background, render_views=render_views,
        render_size=render_size, renderer=renderer, precision=precision, device=device,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, validate_every=validate_every,
        validation_images=validation_images, validation_views=validation_views,
        allow_download=False if offline else None,
    )
    config = stage2_config(out, settings, resume)
    show = _training_progress(_console(quiet), out, lambda e: f"loss {e['loss']:.4g} (MSE {e['mse']:.4g}, "
                                                            f"LPIPS {e['lpips']:.4g})")
    run_stage2(config, out, resume=resume, on_event=show)
