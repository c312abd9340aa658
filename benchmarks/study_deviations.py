"""The deviations from the reference that the code documents, measured (issue 13, item 3).

Every arm is a ``bench_mesh`` run (reference teacher, lit by default, the density mesh) with one change, and
every change is scored against its baseline arm over the same assets, imperfection levels and seeds:

- ``last-view`` against ``ours``: densification statistics from the last rendered novel view only, as the
  reference gathers them; ours average every view of the batch (``representations/densify.py``).
- ``init50-skip`` against ``init50``: the reference skips a densification step that falls on an
  outer-iteration increment of its step counter; we densify at the next step (``DensifyStrategy.fires``). On
  the reference preset's schedule none does (100, 200 and 300 fall on optimisation steps), so both arms take a
  50-step init iteration, as ImageDream's preset does, which puts step 100 on an increment.
- The texture refinement (export only, on ``ours``' Gaussians), learning rate and render size set explicitly:
  ``texture-0.05-256`` (what we used before this study) against ``texture-0.2-512`` (the reference's, now ours),
  and one at a time: ``texture-0.2-256`` and ``texture-0.05-512`` against ``texture-0.05-256``.

A change wins (or loses) in an (asset, teacher) group when its mean over the seeds beats (or trails) the
baseline's by more than the larger of the two standard deviations, on its primary metric (F-score @0.01 for
the densification changes, textured PSNR for the texture ones); it is worth keeping only if it wins in some
group and loses in none. Not a test: it prints numbers.

    python benchmarks/study_deviations.py run last-view --only spot --imperfection none moderate \\
        --seeds 0 1 2 --keep runs/ --out study/        # ours: bench_mesh --keep runs/ --json (or `run ours`)
    python benchmarks/study_deviations.py report study/ bench/   # every *.json of `run` and bench_mesh --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench_mesh import one_run, setting
from bench_assets import add_asset_arguments

import microdreamer.representations.gaussians as gaussians_module
from microdreamer.pipeline import resolve_device
from microdreamer.representations.densify import DensifyState, DensifyStrategy


@dataclass
class LastViewStrategy(DensifyStrategy):
    """Densification statistics from one view of the batch: the last novel view, as the reference's."""

    view: int = -2  # the engine appends the reference view after the novel views

    def accumulate(self, state: DensifyState, means2d_grad, radii, width: int, height: int) -> None:
        super().accumulate(state, means2d_grad[self.view].unsqueeze(0), radii[self.view].unsqueeze(0), width,
                           height)


@dataclass
class SkipStrategy(DensifyStrategy):
    """The reference's timing: a due step the counter skips over is not densified."""

    def fires(self, step: int, previous: int) -> bool:
        return super().fires(step, step - 1)


@dataclass(frozen=True)
class Arm:
    overrides: tuple[str, ...] = ()  # bench_mesh --set
    strategy: type[DensifyStrategy] = DensifyStrategy
    export_only: bool = False  # re-export ours' Gaussians (bench_mesh --reuse)


ARMS = {
    "ours": Arm(),
    "last-view": Arm(strategy=LastViewStrategy),
    "init50": Arm(("schedule.init_steps=50",)),
    "init50-skip": Arm(("schedule.init_steps=50",), SkipStrategy),
    "texture-0.05-256": Arm(("mesh.refine_lr=0.05", "mesh.refine_resolution=256"), export_only=True),
    "texture-0.2-256": Arm(("mesh.refine_lr=0.2", "mesh.refine_resolution=256"), export_only=True),
    "texture-0.05-512": Arm(("mesh.refine_lr=0.05", "mesh.refine_resolution=512"), export_only=True),
    "texture-0.2-512": Arm(("mesh.refine_lr=0.2", "mesh.refine_resolution=512"), export_only=True),
}
#: change → (baseline, primary metric, larger is better)
CHANGES = {
    "last-view": ("ours", "f1", True),
    "init50-skip": ("init50", "f1", True),
    "texture-0.05-256": ("texture-0.2-512", "psnr", True),
    "texture-0.2-256": ("texture-0.05-256", "psnr", True),
    "texture-0.05-512": ("texture-0.05-256", "psnr", True),
}
SHOWN = (("f1", True), ("f5", True), ("chamfer", False), ("nc", True), ("psnr", True), ("psnr_albedo", True))


@contextlib.contextmanager
def densify_strategy(cls: type[DensifyStrategy]) -> Iterator[None]:
    """The Gaussians made inside the block densify with ``cls``."""
    saved = gaussians_module.DensifyStrategy
    gaussians_module.DensifyStrategy = cls
    try:
        yield
    finally:
        gaussians_module.DensifyStrategy = saved


def run(args) -> None:
    arm = ARMS[args.arm]
    args.methods, args.unit_box, args.sweep, args.iters, args.steps = ["density"], False, [], None, None
    args.set = [setting(s) for s in arm.overrides]
    args.tag = "" if args.arm == "ours" else args.arm
    args.reuse = args.keep if arm.export_only else None
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        for level in args.imperfection:
            for seed in args.seeds:
                with densify_strategy(arm.strategy):
                    rows = one_run(args, name, level, seed, device)
                (args.out / f"{args.arm}-{name}-{level}-{seed}.json").write_text(json.dumps({"rows": rows}, indent=2))


def verdict(base: list[float], changed: list[float], larger: bool) -> tuple[float, float, str]:
    """Mean difference (changed − base), the larger standard deviation, and win / loss / tie."""
    delta = statistics.fmean(changed) - statistics.fmean(base)
    sd = max(statistics.stdev(base) if len(base) > 1 else 0.0, statistics.stdev(changed) if len(changed) > 1 else 0.0)
    gain = delta if larger else -delta
    return delta, sd, "win" if gain > sd else "loss" if -gain > sd else "tie"


def report(args) -> None:
    rows = [row for folder in args.folders for path in sorted(folder.glob("*.json"))
            for row in json.loads(path.read_text())["rows"] if row["method"] == "density"]
    by_arm: dict[tuple[str, str, str], dict[int, dict]] = {}
    for row in rows:
        by_arm.setdefault((row.get("tag") or "ours", row["asset"], row["teacher"]), {})[row["seed"]] = row
    for change, (baseline, primary, larger) in CHANGES.items():
        groups = sorted({(a, t) for arm, a, t in by_arm if arm == change})
        outcomes = []
        print(f"\n{change} against {baseline} (primary: {primary})")
        for asset, teacher in groups:
            changed, base = by_arm[(change, asset, teacher)], by_arm.get((baseline, asset, teacher), {})
            seeds = sorted(set(changed) & set(base))
            if len(seeds) < 2:
                print(f"  {asset:<14}{teacher:<28}needs ≥ 2 common seeds (has {seeds})")
                continue
            cells = []
            for key, up in SHOWN:
                delta, sd, word = verdict([base[s][key] for s in seeds], [changed[s][key] for s in seeds], up)
                cells.append(f"{key} {statistics.fmean(base[s][key] for s in seeds):.4g}→"
                             f"{statistics.fmean(changed[s][key] for s in seeds):.4g} ({delta:+.3g}, sd {sd:.2g}, {word})")
                if key == primary:
                    outcomes.append(word)
            print(f"  {asset:<14}{teacher:<28}seeds {seeds}: " + "; ".join(cells))
        keep = "win" in outcomes and "loss" not in outcomes
        print(f"  → {change}: {outcomes.count('win')} wins, {outcomes.count('loss')} losses, "
              f"{outcomes.count('tie')} ties on {primary}: {'keep' if keep else 'do not keep'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="one arm over the assets, levels and seeds")
    runner.add_argument("arm", choices=list(ARMS))
    runner.add_argument("--keep", type=Path, required=True, help="runs and meshes (ours' runs for export-only arms)")
    runner.add_argument("--out", type=Path, required=True, help="one JSON file per run")
    add_asset_arguments(runner)
    runner.set_defaults(seeds=[0, 1, 2], imperfection=["none", "moderate"])
    reporter = commands.add_parser("report", help="compare every change with its baseline")
    reporter.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
