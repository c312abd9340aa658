"""The Python API in a dozen lines: image → 3D Gaussians → textured mesh → scores, on the CPU, no weights.

The reference teacher renders a ground-truth mesh (here the bundled Spot cow) instead of running a diffusion
model, so this runs anywhere; swap ``teacher="reference", model=...`` for ``teacher="stable-zero123"`` and an
image path to use a real model.

    python examples/quickstart.py [--out DIR] [--quick]
"""

import argparse
from pathlib import Path

import microdreamer
from microdreamer import Pipeline

SPOT = Path(microdreamer.__file__).parent / "assets" / "spot" / "spot.obj"
#: --quick: a smoke test in seconds (a few hundred Gaussians, tiny renders), not a useful result
QUICK = dict(iters=1, steps=2, views=2, res=32, grid=32, faces=500, texture_size=64, refine_steps=1)
QUICK_CONFIG = {"gaussians": {"num_points": 300}, "mesh": {"bake_resolution": 64, "refine_resolution": 32, "refine_views": 2}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/quickstart"))
    parser.add_argument("--quick", action="store_true", help="tiny settings: seconds instead of a minute")
    args = parser.parse_args()

    pipe = Pipeline.from_preset(teacher="reference", model=str(SPOT), seed=0, overrides=QUICK_CONFIG if args.quick else None,
                                **(QUICK if args.quick else {}))
    result = pipe.image_to_3d()  # no image: the reference teacher's own front view of the mesh
    report = result.save(args.out, overwrite=True)
    print(f"{result.stem}: {report.primitives} Gaussians, {report.evaluations['total']} teacher evaluations")

    mesh = pipe.to_mesh(result)
    mesh_report = mesh.save(args.out, overwrite=True)
    print(f"mesh: {mesh_report.outputs[0]} ({mesh.faces} faces)")

    scores = result.evaluate(SPOT, resolution=64 if args.quick else 256)
    print(f"held-out PSNR {scores.mean_psnr:.2f} dB, SSIM {scores.mean_ssim:.4f}")


if __name__ == "__main__":
    main()
