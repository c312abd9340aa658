"""Textured-mesh export of reference-teacher reconstructions of the shared CC0 assets.

For each asset: image2gs with the ground-truth mesh teacher (the reference preset: 20 iterations × 15
steps, 6 views, 256²), then the mesh export at default settings (256³ grid, 50k faces, 1024² texture,
one SIR texture pass of 30 steps) with the same loaded teacher, as ``image2mesh`` does. Prints Chamfer
distance, F-score at 0.01 and 0.05, normal consistency (100k samples a side), the textured PSNR on the
16 held-out views (next to the Gaussians' own PSNR) — with the mesh in its run's frame, the reference's
unit box, and again fitted into the unit box by its own bounding box — and the export time by stage
(wall seconds, plus the process CPU seconds of the whole export, which a loaded machine inflates less).
``--sweep`` also meshes each reconstruction at several thresholds (geometry only) to compare them.
Not a test: it prints numbers.

    python benchmarks/bench_mesh.py [--assets DIR] [--only spot fox] [--reuse DIR] [--sweep 0.25 0.5 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from shared_assets import ASSETS, add_asset_arguments

from microdreamer.config import resolve
from microdreamer.evaluate import evaluate_gaussians, evaluate_mesh
from microdreamer.export import STAGES
from microdreamer.export.extract import (
    GaussianField,
    clean,
    decimate,
    density_grid,
    marching_cubes,
    smooth,
)
from microdreamer.io.mesh import load_mesh
from microdreamer.mesh_metrics import compare_surfaces
from microdreamer.pipeline import (
    ImageTo3D,
    PreparedInput,
    front_view_stem,
    resolve_device,
)
from microdreamer.representations.gaussians import Gaussians


def sweep(gaussians: Gaussians, mesh_path: Path, thresholds: list[float], cfg) -> list[dict]:
    """Geometry at each threshold, in the run's frame: the extracted surface before UV and texture."""
    truth = load_mesh(mesh_path)
    field = GaussianField.from_gaussians(gaussians)
    rows = []
    for threshold in thresholds:
        grid = density_grid(field, cfg.mesh.resolution, threshold)
        vertices, faces = clean(*marching_cubes(grid, threshold), cfg.mesh.min_component)
        vertices, faces = decimate(smooth(vertices, faces), faces, cfg.mesh.faces)
        s = compare_surfaces(vertices, faces, truth.vertices.double().numpy(), truth.faces.numpy())
        rows.append({"threshold": threshold, "chamfer": round(s.chamfer, 4), "f1": round(s.fscore[0.01], 3),
                     "f5": round(s.fscore[0.05], 3), "nc": round(s.normal_consistency, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", type=Path, default=None,
                        help="take <DIR>/<asset>/<stem>.ply from earlier image2gs runs instead of training")
    parser.add_argument("--keep", type=Path, default=None, help="write the runs and meshes here")
    parser.add_argument("--sweep", nargs="*", type=float, default=[], help="thresholds to compare (geometry only)")
    add_asset_arguments(parser)
    args = parser.parse_args()

    device = resolve_device(args.device)
    rows = []
    for name in args.only:
        mesh_path = args.assets / ASSETS[name]
        cfg = resolve("reference", None, {"teacher": {"model": str(mesh_path)}, "seed": args.seed})
        with tempfile.TemporaryDirectory() as tmp:
            folder = (args.keep / name) if args.keep else Path(tmp)
            pipeline = ImageTo3D(cfg, device)
            stem = front_view_stem(cfg)
            prepared = PreparedInput(stem)
            if args.reuse is not None:
                ply = args.reuse / name / f"{stem}.ply"
            else:
                ply = Path(pipeline.run(prepared, folder, overwrite=True).outputs["ply"])
            gaussians = Gaussians.load(ply, cfg.gaussians, device)
            start, cpu = time.perf_counter(), time.process_time()
            report = pipeline.export_mesh(prepared, gaussians, folder, overwrite=True)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            scores = evaluate_mesh(Path(report.outputs[0]), mesh_path, device)
            unit = evaluate_mesh(Path(report.outputs[0]), mesh_path, device, run_frame=False)
            gs_scores = evaluate_gaussians(ply, mesh_path, device)
            s = scores.surface
            row = {
                "asset": name,
                "chamfer": round(s.chamfer, 4),
                "f1": round(s.fscore[0.01], 3),
                "f5": round(s.fscore[0.05], 3),
                "nc": round(s.normal_consistency, 3),
                "psnr_mesh": round(scores.mean_psnr, 2),
                "psnr_gaussians": round(gs_scores.mean_psnr, 2),
                "unit_box": {"chamfer": round(unit.surface.chamfer, 4), "f1": round(unit.surface.fscore[0.01], 3),
                             "f5": round(unit.surface.fscore[0.05], 3), "psnr_mesh": round(unit.mean_psnr, 2)},
                "faces": report.faces,
                "export_s": round(wall, 1),
                "export_cpu_s": round(cpu, 1),
                "stages_s": {k: round(report.timings.get(k, 0.0), 2) for k in STAGES},
            }
            if args.sweep:
                row["sweep"] = sweep(gaussians, mesh_path, args.sweep, cfg)
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'asset':<9}{'Chamfer':>9}{'F@0.01':>8}{'F@0.05':>8}{'NC':>7}{'PSNR mesh':>11}{'PSNR GS':>9}"
          f"{'export s':>10}{'cpu s':>7}  stages (s)")
    for r in rows:
        stages = " ".join(f"{k}={v}" for k, v in r["stages_s"].items())
        print(f"{r['asset']:<9}{r['chamfer']:>9.4f}{r['f1']:>8.3f}{r['f5']:>8.3f}{r['nc']:>7.3f}{r['psnr_mesh']:>11.2f}"
              f"{r['psnr_gaussians']:>9.2f}{r['export_s']:>10.1f}{r['export_cpu_s']:>7.1f}  {stages}")
    if rows:
        n = len(rows)
        print(f"{'mean':<9}{sum(r['chamfer'] for r in rows) / n:>9.4f}{sum(r['f1'] for r in rows) / n:>8.3f}"
              f"{sum(r['f5'] for r in rows) / n:>8.3f}{sum(r['nc'] for r in rows) / n:>7.3f}"
              f"{sum(r['psnr_mesh'] for r in rows) / n:>11.2f}{sum(r['psnr_gaussians'] for r in rows) / n:>9.2f}"
              f"{sum(r['export_s'] for r in rows) / n:>10.1f}{sum(r['export_cpu_s'] for r in rows) / n:>7.1f}")
    print("\nthe same meshes fitted into the unit box by their own bounding box (no run frame):")
    for r in rows:
        u = r["unit_box"]
        print(f"{r['asset']:<9}{u['chamfer']:>9.4f}{u['f1']:>8.3f}{u['f5']:>8.3f}{'':>7}{u['psnr_mesh']:>11.2f}")
    for r in rows:
        for s in r.get("sweep", []):
            print(f"sweep {r['asset']:<8} threshold {s['threshold']:<5} Chamfer {s['chamfer']:.4f} "
                  f"F@0.01 {s['f1']:.3f} F@0.05 {s['f5']:.3f} NC {s['nc']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
