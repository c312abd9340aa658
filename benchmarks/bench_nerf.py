"""NeRF benchmarks: reference-teacher SIR runs of each teacher's NeRF preset, and the renderer's speed.

1. For each NeRF preset (``mvdream-nerf``, ``stable-zero123-nerf``, ``imagedream-nerf``) and each shared
   asset, the preset's schedule, cameras and network with the ground-truth mesh teacher in place of the
   diffusion model: held-out PSNR/SSIM (16 views, 256², never trained on), wall time, optimisation steps,
   network evaluations, occupied grid cells, peak memory; then the mesh the preset exports (marching cubes
   at its threshold, texture sampled from the colour field, no teacher refinement): Chamfer distance,
   F-score at 0.01 and 0.05, normal consistency, textured held-out PSNR and export time (``--no-mesh``
   skips it). Renders train on a random subset of pixels per step (``--ray-budget``, default the
   ``reference-nerf`` preset's), as a CPU run must.
2. Forward + backward time per million samples of a whole field render (hash grid, MLP heads, marching,
   compositing) for the plain-torch path and the fast path (C++ kernels), and of the volume renderer alone
   (marching + compositing of given densities and colours), with their ratio; wall and process CPU time
   (on a shared machine the CPU time is the steadier figure).

Not a test: it prints numbers.

    python benchmarks/bench_nerf.py [--presets ...] [--only spot ...] [--iters K] [--skip-runs] [--skip-speed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_assets import ASSETS, add_asset_arguments

from microdreamer.config import resolve
from microdreamer.evaluate import evaluate_mesh, held_out_scores
from microdreamer.errors import UserError
from microdreamer.export import export_mesh
from microdreamer.io.mesh import load_mesh
from microdreamer.pipeline import ImageTo3D, resolve_device
from microdreamer.render.volume import MarchSettings, composite, march_rays
from microdreamer.representations.nerf import NerfField
from microdreamer.sir.cameras import Cameras

PRESETS = ("stable-zero123-nerf", "mvdream-nerf", "imagedream-nerf")


def run_preset(preset: str, mesh: Path, args: argparse.Namespace, device: torch.device, seed: int,
               imperfection: str) -> dict:
    overrides = {
        "teacher": {"name": "reference", "model": str(mesh), "shading": args.shading, "imperfection": imperfection},
        "seed": seed,
        "nerf": {"ray_budget": args.ray_budget},
    }
    if args.iters:
        overrides["schedule"] = {"iterations": args.iters}
    cfg = resolve(preset, None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = ImageTo3D(cfg, device).run(None, Path(tmp), overwrite=True)
        wall = time.perf_counter() - start
        field = NerfField.load(Path(report.outputs["nerf"]), device)
        views = held_out_scores(field.render, load_mesh(mesh), device, 2.0, 256, (1.0, 1.0, 1.0))
        meshed = None if args.no_mesh else mesh_scores(field, mesh, cfg, Path(tmp), device)
    return {
        "psnr": round(sum(v.psnr for v in views) / len(views), 2),
        "ssim": round(sum(v.ssim for v in views) / len(views), 4),
        "wall_s": round(wall, 1),
        "steps": report.optimisation_steps,
        "evaluations": report.evaluations["total"],
        "cells": report.primitives,
        "peak_memory": report.peak_memory,
        "breakdown_s": {k[4:]: round(v, 1) for k, v in report.timings.items() if k.startswith("sir.")},
        "mesh": meshed,
    }


def mesh_scores(field: NerfField, mesh: Path, cfg, out: Path, device: torch.device) -> dict:
    """Export the field's mesh as the preset would, without teacher refinement, and score it."""
    start = time.perf_counter()
    try:
        exported = export_mesh(field, out, "mesh", cfg, device=device, overwrite=True)
    except UserError as error:  # e.g. a field too short-trained to reach the threshold: a row says so
        return {"error": str(error)}
    seconds = time.perf_counter() - start
    scores = evaluate_mesh(Path(exported.outputs[0]), mesh, device, shading=cfg.teacher.shading)
    s = scores.surface
    return {
        "chamfer": round(s.chamfer, 4),
        "fscore_0.01": round(s.fscore[0.01], 3),
        "fscore_0.05": round(s.fscore[0.05], 3),
        "normal_consistency": round(s.normal_consistency, 3),
        "textured_psnr": round(scores.mean_psnr, 2),
        "faces": exported.faces,
        "export_s": round(seconds, 1),
    }


def _timed(fn, repeats: int) -> tuple[float, float, int]:
    """Best wall and process-CPU seconds of ``fn`` (returning its sample count) over ``repeats`` runs."""
    wall, cpu, samples = float("inf"), float("inf"), 0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        samples = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, samples


def _row(wall: float, cpu: float, samples: int) -> dict:
    return {"samples": samples, "s_per_M": round(wall / samples * 1e6, 3), "cpu_s_per_M": round(cpu / samples * 1e6, 3)}


def speed(args: argparse.Namespace) -> dict:
    """Forward + backward seconds per million samples, torch against the fast path (CPU)."""
    base = resolve("reference-nerf").nerf
    cams = Cameras.orbit([-20.0, 5.0, 15.0, -40.0], [0.0, 90.0, 180.0, 270.0], 3.8, args.speed_res, fovy=20.0)
    rows = {}
    for name, backend in (("torch", "torch"), ("fast", "cpu")):
        field = NerfField(dataclasses.replace(base, backend=backend, encoding_backend=backend), "cpu",
                          torch.Generator().manual_seed(0))

        def whole() -> int:
            out = field.render(cams, torch.ones(3))
            (out.rgb.sum() + out.alpha.sum()).backward()
            field.optimizer.zero_grad(set_to_none=True)
            return int(out.extras["samples"])

        rows[f"field_{name}"] = _row(*_timed(whole, args.repeats))

    # the volume renderer alone: marching (no grid) and compositing of fixed densities and colours
    rays_o, rays_d = (t.reshape(-1, 3) for t in cams.rays())
    settings = MarchSettings(radius=2.0, step=2 * 3**0.5 * 2 / 512)
    n = len(march_rays(rays_o, rays_d, settings))
    g = torch.Generator().manual_seed(0)
    sigmas = (torch.rand(n, generator=g) * 5).requires_grad_()
    rgbs = torch.rand(n, 3, generator=g).requires_grad_()
    for name, backend in (("torch", "torch"), ("fast", "cpu")):
        def volume() -> int:
            samples = march_rays(rays_o, rays_d, settings, backend=backend)
            rgb, opacity, depth = composite(samples, sigmas, rgbs, backend)
            (rgb.sum() + opacity.sum() + depth.sum()).backward()
            return len(samples)

        rows[f"volume_{name}"] = _row(*_timed(volume, args.repeats))
    for part in ("field", "volume"):
        rows[f"{part}_speedup"] = round(rows[f"{part}_torch"]["s_per_M"] / rows[f"{part}_fast"]["s_per_M"], 1)
        rows[f"{part}_cpu_speedup"] = round(rows[f"{part}_torch"]["cpu_s_per_M"] / rows[f"{part}_fast"]["cpu_s_per_M"], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--iters", type=int, default=None, help="override the schedule's iterations")
    parser.add_argument("--ray-budget", type=int, default=resolve("reference-nerf").nerf.ray_budget,
                        help="pixels per optimisation step (0: whole images)")
    parser.add_argument("--skip-runs", action="store_true", help="only the speed measurement")
    parser.add_argument("--skip-speed", action="store_true", help="only the reconstruction runs")
    parser.add_argument("--no-mesh", action="store_true", help="skip the mesh export and its scores")
    parser.add_argument("--speed-res", type=int, default=96, help="render size of the speed measurement")
    parser.add_argument("--repeats", type=int, default=2)
    add_asset_arguments(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    result: dict = {"threads": torch.get_num_threads(), "runs": []}

    if not args.skip_speed:
        result["speed"] = speed(args)
        print(json.dumps({"speed": result["speed"]}), flush=True)
    if not args.skip_runs:
        for preset in args.presets:
            for name in args.only:
                for level in args.imperfection:
                    for seed in args.seeds:
                        row = {"preset": preset, "asset": name, "shading": args.shading, "imperfection": level,
                               "seed": seed,
                               **run_preset(preset, args.assets / ASSETS[name], args, device, seed, level)}
                        result["runs"].append(row)
                        print(json.dumps(row), flush=True)

    if "speed" in result:
        s = result["speed"]
        print("\nforward+backward per million samples, wall s (process CPU s):")
        for part in ("field", "volume"):
            t, f = s[f"{part}_torch"], s[f"{part}_fast"]
            print(f"  {part:<7} torch {t['s_per_M']} ({t['cpu_s_per_M']}), fast {f['s_per_M']} ({f['cpu_s_per_M']}): "
                  f"{s[f'{part}_speedup']}x ({s[f'{part}_cpu_speedup']}x)")
    if result["runs"]:
        print(f"\n{'preset':<21}{'asset':<9}{'PSNR dB':>9}{'SSIM':>8}{'wall s':>8}{'steps':>7}{'NFE':>6}"
              f"{'cells':>7}{'peak GiB':>9}")
        for r in result["runs"]:
            peak = max(r["peak_memory"].values()) if r["peak_memory"] else float("nan")
            print(f"{r['preset']:<21}{r['asset']:<9}{r['psnr']:>9.2f}{r['ssim']:>8.4f}{r['wall_s']:>8.1f}"
                  f"{r['steps']:>7}{r['evaluations']:>6}{r['cells']:>7}{peak:>9.2f}")
        meshed = [r for r in result["runs"] if r["mesh"]]
        if meshed:
            print(f"\n{'mesh of':<21}{'asset':<9}{'Chamfer':>9}{'F@0.01':>8}{'F@0.05':>8}{'NC':>7}{'PSNR dB':>9}"
                  f"{'export s':>9}")
            for r in meshed:
                m = r["mesh"]
                if "error" in m:
                    print(f"{r['preset']:<21}{r['asset']:<9}  {m['error']}")
                    continue
                print(f"{r['preset']:<21}{r['asset']:<9}{m['chamfer']:>9.4f}{m['fscore_0.01']:>8.3f}"
                      f"{m['fscore_0.05']:>8.3f}{m['normal_consistency']:>7.3f}{m['textured_psnr']:>9.2f}"
                      f"{m['export_s']:>9.1f}")
        for preset in args.presets:
            rows = [r for r in result["runs"] if r["preset"] == preset]
            if rows:
                print(f"{preset:<21}{'mean':<9}{sum(r['psnr'] for r in rows) / len(rows):>9.2f}"
                      f"{sum(r['ssim'] for r in rows) / len(rows):>8.4f}"
                      f"{sum(r['wall_s'] for r in rows) / len(rows):>8.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
