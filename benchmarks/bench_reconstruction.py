"""Reference-teacher reconstruction of the shared assets: held-out PSNR/SSIM, time, evaluations.

Runs the stable-zero123 schedule (20 iterations × 15 steps, 6 views, 256²) with the ground-truth mesh
teacher (``--shading``: lit by default, scored against lit renders, with the albedo PSNR apart;
``--imperfection``: its defect levels) and prints one row per asset, level and seed plus the time
breakdown of each run (render, backward, teacher, update = optimiser + densification + the final
clean-up) and the white Gaussians the filter removed. Not a test: it prints numbers.

    python benchmarks/bench_reconstruction.py [--assets DIR] [--iters K] [--device cpu] [--imperfection none moderate]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_assets import ASSETS, add_asset_arguments, teacher_overrides

from microdreamer.config import resolve
from microdreamer.evaluate import evaluate_model
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
        for level in args.imperfection:
            for seed in args.seeds:
                overrides = teacher_overrides(mesh, args.shading, level, seed)
                if args.iters:
                    overrides["schedule"] = {"iterations": args.iters}
                cfg = resolve("reference", None, overrides)
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    report = ImageTo3D(cfg, device).run(None, Path(tmp), overwrite=True)
                    wall = time.perf_counter() - start
                    scores = evaluate_model(Path(report.outputs["ply"]), mesh, device, shading=args.shading)
                row = {
                    "asset": name,
                    "teacher": report.teacher_mode,
                    "seed": seed,
                    "psnr": round(scores.mean_psnr, 2),
                    "ssim": round(scores.mean_ssim, 4),
                    "psnr_albedo": round(scores.mean_albedo_psnr, 2),
                    "wall_s": round(wall, 1),
                    "evaluations": report.evaluations["total"],
                    "gaussians": report.primitives,
                    "white_removed": report.cleanup.get("white_filter", 0),
                    "breakdown_s": {k[4:]: round(v, 1) for k, v in report.timings.items() if k.startswith("sir.")},
                }
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\nscored against {args.shading} renders (albedo PSNR apart)")
    print(f"{'asset':<14}{'teacher':<28}{'seed':>5}{'PSNR dB':>9}{'SSIM':>8}{'albedo':>8}{'wall s':>8}{'NFE':>6}"
          f"{'Gaussians':>11}{'white':>7}  breakdown (s)")
    for r in rows:
        b = " ".join(f"{k}={v}" for k, v in r["breakdown_s"].items())
        print(f"{r['asset']:<14}{r['teacher']:<28}{r['seed']:>5}{r['psnr']:>9.2f}{r['ssim']:>8.4f}{r['psnr_albedo']:>8.2f}"
              f"{r['wall_s']:>8.1f}{r['evaluations']:>6}{r['gaussians']:>11}{r['white_removed']:>7}  {b}")
    if rows:
        mean = sum(r["psnr"] for r in rows) / len(rows)
        print(f"{'mean':<14}{'':<28}{'':>5}{mean:>9.2f}{sum(r['ssim'] for r in rows) / len(rows):>8.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
