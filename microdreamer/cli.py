"""The ``microdreamer`` command: parse, call the pipeline, print. No logic of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import UserError

app = typer.Typer(
    name="microdreamer",
    help="One image or one prompt to a 3D asset with score-based iterative reconstruction (MicroDreamer).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SELFTEST_MIN_PSNR = 24.0


def _console(quiet: bool = False) -> Console:
    return Console(stderr=True, quiet=quiet)


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


def _resolve_config(teacher: str | None, preset: str | None, config: Path | None, **flags: Any):
    from .config import resolve
    from .teachers.registry import teacher_entry

    entry = teacher_entry(teacher or "stable-zero123")
    return resolve(preset or entry.preset, config, _overrides(teacher=teacher, **flags))


@app.command("image2gs")
def image2gs(
    image: Annotated[Optional[Path], typer.Argument(help="Input image (PNG/JPG/WebP). Optional with --teacher reference: its front render is used.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("out"),
    teacher: Annotated[Optional[str], typer.Option(help="Teacher: stable-zero123 (default), zero123-xl, reference.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Hugging Face id or local folder; for --teacher reference, a mesh.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Preset name (default: the teacher's).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML config, or the JSON saved by an earlier run.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    iters: Annotated[Optional[int], typer.Option(help="SIR iterations K (after the init iteration).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Reconstruction steps I per iteration.")] = None,
    views: Annotated[Optional[int], typer.Option(help="Views B per iteration.")] = None,
    res: Annotated[Optional[int], typer.Option(help="Render resolution.")] = None,
    elevation: Annotated[Optional[float], typer.Option(help="Input view elevation in degrees (negative = from above).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="Gaussian rasterizer: auto, cpu, torch, gsplat.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
) -> None:
    """Image → 3D Gaussians (DIR/<stem>.ply, <stem>_views.png, <stem>.json)."""
    from .pipeline import ImageTo3D, resolve_device

    from .io.images import load_image

    cfg = _resolve_config(
        teacher, preset, config, model=model, seed=seed, iters=iters, steps=steps, views=views, res=res,
        elevation=elevation, backend=backend, device=device,
    )
    if image is not None:
        if not image.is_file():
            raise UserError(f"input image not found: {image}")
        load_image(image)  # fail on a bad image before any model is loaded
    console = _console(quiet)
    dev = resolve_device(cfg.device)
    with console.status(f"loading teacher {cfg.teacher.name} on {dev}"):
        runner = ImageTo3D(cfg, dev)
    report = _run_with_progress(console, runner, image, out, overwrite)
    console.print(
        f"[green]wrote[/] {report.outputs['ply']} ({report.primitives} Gaussians, "
        f"{report.timings['sir']:.1f} s SIR, {report.evaluations['total']} network evaluations)"
    )


def _run_with_progress(console: Console, runner, image: Path | None, out: Path, overwrite: bool):
    columns = (
        TextColumn("[bold]SIR"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("sir", total=runner.cfg.schedule.iterations + 1, info="init")

        def on_iteration(log, total):
            info = "init (from noise)" if log.t2 is None else f"t2={log.t2} t1={log.t1}"
            progress.update(task, completed=log.iteration + 1, info=f"{info} loss={log.loss:.0f}")

        return runner.run(image, out, overwrite=overwrite, on_iteration=on_iteration)


@app.command("eval")
def eval_(
    result: Annotated[Path, typer.Argument(help="A 3DGS .ply written by image2gs.")],
    reference: Annotated[Path, typer.Option(help="Ground-truth mesh (.obj, .glb, .gltf).")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the scores to this JSON file.")] = None,
    radius: Annotated[float, typer.Option(help="Camera distance of the held-out views.")] = 2.0,
    res: Annotated[int, typer.Option(help="Render resolution.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
) -> None:
    """PSNR and SSIM on 16 held-out views against a reference mesh."""
    from .evaluate import evaluate_gaussians
    from .io.atomic import atomic_path
    from .pipeline import resolve_device

    if not result.is_file():
        raise UserError(f"result not found: {result}")
    if json_out is not None and json_out.exists():
        raise UserError(f"{json_out} already exists: remove it or choose another --json path")
    report = evaluate_gaussians(result, reference, resolve_device(device), radius=radius, resolution=res)
    table = Table("view", "elevation", "azimuth", "PSNR (dB)", "SSIM", title=f"{result.name} vs {reference.name}")
    for v in report.views:
        table.add_row(str(v.view), f"{v.elevation:.1f}", f"{v.azimuth:.2f}", f"{v.psnr:.2f}", f"{v.ssim:.4f}")
    table.add_row("mean", "", "", f"{report.mean_psnr:.2f}", f"{report.mean_ssim:.4f}", style="bold")
    Console().print(table)
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
    from .pipeline import ImageTo3D, resolve_device

    mesh = Path(__file__).resolve().parent / "assets" / "spot" / "spot.obj"
    console = _console()
    dev = resolve_device(device)
    cfg = _resolve_config("reference", None, None, model=str(mesh), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = out or Path(tmp)
        runner = ImageTo3D(cfg, dev)
        report = _run_with_progress(console, runner, None, folder, overwrite=True)
        scores = evaluate_gaussians(Path(report.outputs["ply"]), mesh, dev)
    ok = scores.mean_psnr >= min_psnr
    verdict = "[green]PASS[/]" if ok else "[red]FAIL[/]"
    console.print(
        f"{verdict} selftest: mean held-out PSNR {scores.mean_psnr:.2f} dB (threshold {min_psnr:.1f}), "
        f"SSIM {scores.mean_ssim:.4f}, {report.timings['sir']:.1f} s SIR on {dev}, {report.primitives} Gaussians"
    )
    if not ok:
        raise typer.Exit(1)


# Typer may vendor its own click: take the usage-error class from its exception hierarchy.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure is one line on stderr and exit code 2."""
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
