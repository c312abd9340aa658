"""Just-in-time build of the project's C++ (OpenMP) kernels, cached on disk.

The first use compiles with the machine's C++ compiler (about half a minute); later runs load the
cached library. ``MICRODREAMER_EXT_DIR`` moves the cache (default ``~/.cache/microdreamer/ext``).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent / "csrc"


class ExtensionUnavailable(RuntimeError):
    """The C++ kernels could not be built here (no compiler, or a build error)."""


@cache
def load_extension(name: str) -> ModuleType:
    """Build (once) and import ``csrc/<name>.cpp`` as a torch extension module."""
    from torch.utils import cpp_extension

    build_dir = Path(os.environ.get("MICRODREAMER_EXT_DIR", Path.home() / ".cache" / "microdreamer" / "ext")) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=f"microdreamer_{name}",
            sources=[str(CSRC / f"{name}.cpp")],
            extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffast-math"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # compiler missing or build failure: callers fall back to plain torch
        raise ExtensionUnavailable(f"could not build the C++ kernel '{name}': {exc}") from exc


@cache
def extension_unavailable_reason(name: str) -> str | None:
    """``None`` when ``csrc/<name>.cpp`` builds and loads here, else why not (one line)."""
    try:
        load_extension(name)
    except ExtensionUnavailable as exc:
        return str(exc).splitlines()[0]
    return None
