"""Where the tests find the shared CC0 meshes: ``../shared/assets`` beside the checkout (as in CI), or
``$MICRODREAMER_ASSETS``."""

import os
from pathlib import Path

SHARED_ASSETS = Path(os.environ.get("MICRODREAMER_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
