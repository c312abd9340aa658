"""The shared assets (``../shared/assets`` beside the checkout) and the options that pick them and the teacher.

spot, bob, avocado and fox are smooth and closed (CC0); spider, flight_helmet and scissors have thin parts,
holes and many parts (licences in the assets' README).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ASSETS = {
    "spot": "spot/spot.obj",
    "bob": "bob/bob_tri.obj",
    "avocado": "avocado/avocado.gltf",
    "fox": "fox/Fox.glb",
    "spider": "spider/spider_posix.obj",
    "flight_helmet": "flight_helmet/FlightHelmet.gltf",
    "scissors": "scissors/textured.obj",
}


def add_asset_arguments(parser: argparse.ArgumentParser) -> None:
    """--assets, --only, --device, --seeds, --shading, --imperfection and --json, as every asset benchmark
    takes them."""
    from microdreamer.render.mesh import SHADINGS
    from microdreamer.teachers.imperfection import LEVELS

    default = Path(__file__).resolve().parents[2] / "shared" / "assets"
    parser.add_argument("--assets", type=Path, default=default, help="folder of the shared assets")
    parser.add_argument("--only", nargs="*", default=list(ASSETS), choices=list(ASSETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="one run per seed")
    parser.add_argument("--shading", default="lit", choices=list(SHADINGS),
                        help="the reference teacher's renders, and what the results are scored against")
    parser.add_argument("--imperfection", nargs="*", default=["none"], choices=list(LEVELS),
                        help="the reference teacher's defect levels to run (teachers/imperfection.py)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")


def teacher_overrides(mesh: Path, shading: str, imperfection: str, seed: int) -> dict:
    """Config overrides of a reference-teacher run on ``mesh``."""
    return {"teacher": {"model": str(mesh), "shading": shading, "imperfection": imperfection}, "seed": seed}
