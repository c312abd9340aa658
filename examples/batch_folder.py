"""A folder batch through the Python API: every image in a folder, the teacher loaded once, one manifest.

Makes a folder of two "photos" of the bundled Spot cow (renders of its mesh with an alpha channel), then runs
image → Gaussians → mesh over the folder. A real batch points ``run_batch`` at your own photos with a real
teacher; a bad file fails its own entry and the batch goes on.

    python examples/batch_folder.py [--out DIR] [--quick]
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import microdreamer
from microdreamer import Pipeline
from microdreamer.sir.cameras import Cameras
from microdreamer.teachers.reference import ReferenceTeacher

SPOT = Path(microdreamer.__file__).parent / "assets" / "spot" / "spot.obj"
#: --quick: a smoke test in seconds (a few hundred Gaussians, tiny renders), not a useful result
QUICK = dict(iters=1, steps=2, views=2, res=32, grid=32, faces=500, texture_size=64, refine_steps=1)
QUICK_CONFIG = {"gaussians": {"num_points": 300}, "mesh": {"bake_resolution": 64, "refine_resolution": 32, "refine_views": 2}}


def make_photos(folder: Path) -> None:
    """Two RGBA renders of the cow, 45° apart."""
    folder.mkdir(parents=True, exist_ok=True)
    teacher = ReferenceTeacher(SPOT, resolution=256)
    for name, azimuth in [("cow_front", 0.0), ("cow_side", 45.0)]:
        out = teacher.render(Cameras.orbit([0.0], [azimuth], 2.0, 256))
        rgba = torch.cat([out.rgb, out.alpha], 1)[0].permute(1, 2, 0).numpy()
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8)).save(folder / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/batch"))
    parser.add_argument("--quick", action="store_true", help="tiny settings: seconds instead of minutes")
    args = parser.parse_args()

    photos = args.out / "photos"
    make_photos(photos)
    pipe = Pipeline.from_preset(teacher="reference", model=str(SPOT), seed=0, overrides=QUICK_CONFIG if args.quick else None,
                                **(QUICK if args.quick else {}))
    manifest = pipe.run_batch([photos], args.out / "results", mesh=True, skip_existing=True)
    for entry in manifest.entries:
        print(f"{entry.status:8} {entry.input}: {entry.error or entry.note}")
    print(manifest.counts())


if __name__ == "__main__":
    main()
