"""Reference-teacher reconstruction of the shared CC0 assets: held-out PSNR/SSIM, time, evaluations.

Runs the stable-zero123 schedule (20 iterations × 15 steps, 6 views, 256²) with the ground-truth mesh
teacher and prints one row per asset plus the time breakdown of each run (render, backward, teacher,
update = optimiser + densification). Not a test: it prints numbers.

    python benchmarks/bench_reconstruction.py [--assets DIR] [--iters K] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from shared_assets import ASSETS, add_asset_arguments

from microdreamer.config import resolve
from microdreamer.evaluate import evaluate_gaussians
from microdreamer.pipeline import ImageTo3D, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=None, help="override the schedule's iterations")
    add_asset_arguments(parser)
    args = parser.parse_args()

    device = resolve_device(args.device)
    rows = []
    for name in args.only:
        mesh = args.assets / ASSETS[name]
        overrides = {"teacher": {"model": str(mesh)}, "seed": args.seed}
        if args.iters:
            overrides["schedule"] = {"iterations": args.iters}
        cfg = resolve("reference", None, overrides)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = ImageTo3D(cfg, device).run(None, Path(tmp), overwrite=True)
            wall = time.perf_counter() - start
            scores = evaluate_gaussians(Path(report.outputs["ply"]), mesh, device)
        row = {
            "asset": name,
            "psnr": round(scores.mean_psnr, 2),
            "ssim": round(scores.mean_ssim, 4),
            "wall_s": round(wall, 1),
            "evaluations": report.evaluations["total"],
            "gaussians": report.primitives,
            "breakdown_s": {k[4:]: round(v, 1) for k, v in report.timings.items() if k.startswith("sir.")},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'asset':<9}{'PSNR dB':>9}{'SSIM':>8}{'wall s':>8}{'NFE':>6}{'Gaussians':>11}  breakdown (s)")
    for r in rows:
        b = " ".join(f"{k}={v}" for k, v in r["breakdown_s"].items())
        print(f"{r['asset']:<9}{r['psnr']:>9.2f}{r['ssim']:>8.4f}{r['wall_s']:>8.1f}{r['evaluations']:>6}{r['gaussians']:>11}  {b}")
    if rows:
        mean = sum(r["psnr"] for r in rows) / len(rows)
        print(f"{'mean':<9}{mean:>9.2f}{sum(r['ssim'] for r in rows) / len(rows):>8.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
