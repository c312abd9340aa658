"""What ``--init lgm`` saves: SIR iterations to reach a full run's held-out PSNR when SIR starts from LGM.

Random LGM weights cannot show it, so by default the start is a stand-in for LGM's output: the reference
surface as LGM's four cameras see it (elevation 0, azimuths 0/90/180/270, radius 1.5, 256² renders), one
Gaussian per covered pixel, ``--gaussians`` (65,536, LGM's 4·128²) of them drawn at random, with controlled
noise: positions ± ``--position-noise`` (Gaussian σ, world units; the object's longest side is 1), colours
± ``--colour-noise``, isotropic scales of a pixel's footprint, opacity 0.8. Both runs use the reference
teacher on the shared asset and score the 16 held-out views after every iteration:

- full: the ``reference`` preset from the random blob (the init iteration and 20 iterations);
- lgm-init: the ``reference-lgm-init`` preset from the start.

It prints both PSNR curves, the first lgm-init iteration at or above the full run's final PSNR, and the
ratios of iterations and of SIR time. ``--start lgm`` starts from the real LGM on the same renders (the
figure the stand-in stands for; needs ``ashawkey/LGM``, ``--reconstructor`` to use a local copy). Not a
test: it prints numbers.

    python benchmarks/bench_lgm_init.py [--only spot] [--device cpu] [--start standin|lgm] [--eval-res 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from bench_assets import ASSETS, add_asset_arguments, teacher_overrides

from microdreamer.config import RunConfig, resolve
from microdreamer.evaluate import held_out_scores
from microdreamer.io.mesh import TexturedMesh
from microdreamer.io.ply import GaussianPLY
from microdreamer.pipeline import ImageTo3D, PreparedInput, resolve_device
from microdreamer.render.mesh import rasterize_mesh, shading_light
from microdreamer.representations.gaussians import SH_C0, Gaussians
from microdreamer.sir.cameras import Cameras
from microdreamer.sir.engine import SIREngine
from microdreamer.teachers.base import Condition

#: LGM's four input cameras (teachers spec §5)
LGM_AZIMUTHS, LGM_RADIUS, LGM_FOVY = (0.0, 90.0, 180.0, 270.0), 1.5, 49.1


def standin_start(mesh: TexturedMesh, shading: str, count: int, position_noise: float, colour_noise: float,
                  generator: torch.Generator, resolution: int = 256) -> GaussianPLY:
    """``count`` Gaussians on the surface LGM's cameras see (see the module docstring), noise from ``generator``."""
    cams = Cameras.orbit([0.0] * 4, LGM_AZIMUTHS, LGM_RADIUS, resolution, LGM_FOVY).to(mesh.device)
    white = torch.ones(3, device=mesh.device)
    with torch.no_grad():
        out = rasterize_mesh(mesh, cams, white, light=shading_light(shading))
    covered = (out.alpha[:, 0] > 0.5).reshape(-1).cpu()
    origins, directions = (x.reshape(-1, 3).cpu() for x in cams.rays())
    forward = -cams.c2w[:, :3, 2].cpu().repeat_interleave(resolution * resolution, 0)
    depth = out.depth[:, 0].reshape(-1).cpu()  # along each camera's axis
    rgb = out.rgb.permute(0, 2, 3, 1).reshape(-1, 3).cpu()
    candidates = covered.nonzero()[:, 0]
    pick = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    distance = depth[pick] / (directions[pick] * forward[pick]).sum(-1)
    means = origins[pick] + directions[pick] * distance[:, None]
    n = len(pick)
    means = means + position_noise * torch.randn(n, 3, generator=generator)
    colour = (rgb[pick] + colour_noise * torch.randn(n, 3, generator=generator)).clamp(0, 1)
    footprint = depth[pick] * 2 * math.tan(math.radians(LGM_FOVY) / 2) / resolution
    rotation = torch.zeros(n, 4)
    rotation[:, 0] = 1.0
    return GaussianPLY(means=means, f_dc=(colour - 0.5) / SH_C0, f_rest=torch.zeros(n, 0, 3),
                       opacity=torch.full((n,), math.log(0.8 / 0.2)), scale=footprint.log()[:, None].repeat(1, 3),
                       rotation=rotation)


def sir_curve(runner: ImageTo3D, cfg: RunConfig, start: GaussianPLY | None, generator: torch.Generator,
              mesh: TexturedMesh, shading: str, eval_res: int) -> dict:
    """One SIR run as ImageTo3D.reconstruct runs it (from ``start``, or the random blob), held-out PSNR after
    every iteration and after the final clean-up."""
    device = runner.device
    reference = runner.reference_view(PreparedInput("bench"))
    runner.teacher.prepare(Condition(image=reference.rgb, mask=reference.mask, elevation=cfg.cameras.elevation),
                           generator)
    model = Gaussians(cfg.gaussians, device, generator, init=start)

    def psnr() -> float:
        views = held_out_scores(model.render, mesh, device, cfg.cameras.radius, eval_res, tuple(cfg.background),
                                shading)
        return round(sum(v.psnr for v in views) / len(views), 2)

    curve, seconds = [psnr()], [0.0]
    last = time.perf_counter()

    def score(log, total) -> None:
        nonlocal last
        seconds.append(seconds[-1] + time.perf_counter() - last)  # SIR time, scoring left out
        curve.append(psnr())
        last = time.perf_counter()

    SIREngine(runner.teacher, model, cfg, generator, device, reference=reference, on_iteration=score).run()
    return {"psnr_start": curve[0], "psnr_by_iteration": curve[1:], "psnr_final": psnr(),
            "sir_seconds": round(seconds[-1], 1), "seconds_by_iteration": [round(s, 1) for s in seconds[1:]],
            "gaussians_start": None if start is None else start.num_points, "gaussians_end": model.num_primitives}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", default="standin", choices=["standin", "lgm"])
    parser.add_argument("--reconstructor", default=None, help="LGM weights for --start lgm (default ashawkey/LGM)")
    parser.add_argument("--gaussians", type=int, default=65_536)
    parser.add_argument("--position-noise", type=float, default=0.01)
    parser.add_argument("--colour-noise", type=float, default=0.05)
    parser.add_argument("--res", type=int, default=None, help="render size of both runs (default: the presets' 256)")
    parser.add_argument("--eval-res", type=int, default=256, help="held-out views' size")
    parser.add_argument("--full-iters", type=int, default=None,
                        help="the full run's iterations (default: its preset's)")
    parser.add_argument("--init-iters", type=int, default=None,
                        help="the lgm-init run's iterations (default: its preset's; more shows where its curve goes)")
    parser.add_argument("--full-from", type=Path, default=None,
                        help="take the full runs from an earlier --json of this script (same settings)")
    add_asset_arguments(parser)
    parser.set_defaults(only=["spot"])
    args = parser.parse_args()

    device = resolve_device(args.device)
    earlier = {} if args.full_from is None else {(r["asset"], r["seed"]): r["full"]
                                                 for r in json.loads(args.full_from.read_text())}
    rows = []
    for name in args.only:
        mesh_path = args.assets / ASSETS[name]
        for seed in args.seeds:
            overrides = teacher_overrides(mesh_path, args.shading, args.imperfection[0], seed)
            if args.res:
                overrides["cameras"] = {"resolution": args.res}
            full_cfg = resolve("reference", None, overrides | (
                {"schedule": {"iterations": args.full_iters}} if args.full_iters else {}))
            lgm_overrides = overrides | ({"lgm": {"reconstructor": args.reconstructor}} if args.reconstructor else {})
            if args.init_iters:
                lgm_overrides["schedule"] = {"iterations": args.init_iters}
            init_cfg = resolve("reference-lgm-init", None, lgm_overrides)
            if args.start == "standin":
                init_cfg = dataclasses.replace(init_cfg, init="random")  # the stand-in replaces LGM below
            full_runner = ImageTo3D(full_cfg, device)
            mesh = full_runner.teacher.mesh
            full = earlier.get((name, seed)) or sir_curve(
                full_runner, full_cfg, None, torch.Generator().manual_seed(seed), mesh, args.shading, args.eval_res)
            print(json.dumps({"asset": name, "seed": seed, "run": "full", **full}), flush=True)

            runner = ImageTo3D(init_cfg, device)
            generator = torch.Generator().manual_seed(seed)
            timings: dict[str, float] = {}
            if args.start == "standin":
                start = standin_start(mesh, args.shading, args.gaussians, args.position_noise, args.colour_noise,
                                      generator)
            else:
                start = runner.feedforward(PreparedInput(name), generator, timings)[0]
            init = sir_curve(runner, init_cfg, start, generator, mesh, args.shading, args.eval_res)
            print(json.dumps({"asset": name, "seed": seed, "run": f"lgm-init ({args.start})", **init,
                              **({"lgm_seconds": round(timings["lgm"], 2)} if timings else {})}), flush=True)

            # iterations done after entry k of a curve: the init iteration counts when it takes steps
            target, skipped = full["psnr_final"], init_cfg.schedule.init_steps == 0
            reached = next((k for k, p in enumerate(init["psnr_by_iteration"]) if p >= target), None)
            done = None if reached is None else reached + (not skipped)
            full_iterations = len(full["psnr_by_iteration"])
            rows.append({
                "asset": name, "seed": seed, "start": args.start, "full": full, "init": init,
                "full_psnr": target, "full_iterations": full_iterations, "full_sir_s": full["sir_seconds"],
                "init_psnr_start": init["psnr_start"], "init_psnr_final": init["psnr_final"],
                "init_iterations": len(init["psnr_by_iteration"]) - skipped,
                "iterations_to_reach_full": done,
                "iteration_ratio": None if not done else round(full_iterations / done, 2),
                "sir_time_ratio": None if not done else round(
                    full["sir_seconds"] / max(init["seconds_by_iteration"][reached], 1e-9), 2),
            })

    print(f"\n{'asset':<8}{'seed':>5}{'start':>9}{'full dB':>9}{'iters':>6}{'SIR s':>8}"
          f"{'start dB':>10}{'init dB':>9}{'iters':>6}{'reached':>9}{'iter ×':>8}{'time ×':>8}")
    for r in rows:
        done = r["iterations_to_reach_full"]
        reached, ratios = ("never", ("", "")) if done is None else (
            str(done), (r["iteration_ratio"], r["sir_time_ratio"]))
        print(f"{r['asset']:<8}{r['seed']:>5}{r['start']:>9}{r['full_psnr']:>9.2f}{r['full_iterations']:>6}"
              f"{r['full_sir_s']:>8.1f}{r['init_psnr_start']:>10.2f}{r['init_psnr_final']:>9.2f}"
              f"{r['init_iterations']:>6}{reached:>9}{ratios[0]:>8}{ratios[1]:>8}")
    print("\nthe real figure (LGM's own Gaussians; a GPU, ashawkey/LGM downloaded):\n"
          "    python benchmarks/bench_lgm_init.py --start lgm --device cuda --only spot bob avocado fox")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
