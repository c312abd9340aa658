"""The four shared CC0 assets (``../shared/assets`` beside the checkout) and the options that pick them."""

from __future__ import annotations

import argparse
from pathlib import Path

ASSETS = {
    "spot": "spot/spot.obj",
    "bob": "bob/bob_tri.obj",
    "avocado": "avocado/avocado.gltf",
    "fox": "fox/Fox.glb",
}


def add_asset_arguments(parser: argparse.ArgumentParser) -> None:
    """--assets, --only, --device, --seed and --json, as every asset benchmark takes them."""
    default = Path(__file__).resolve().parents[2] / "shared" / "assets"
    parser.add_argument("--assets", type=Path, default=default, help="folder of the shared assets")
    parser.add_argument("--only", nargs="*", default=list(ASSETS), choices=list(ASSETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
