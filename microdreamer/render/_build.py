"""Just-in-time build of the project's C++ (OpenMP) kernels, cached on disk.

The first use compiles with the machine's C++ compiler (about a minute per kernel); later runs load the
cached library. ``MICRODREAMER_EXT_DIR`` moves the cache (default ``~/.cache/microdreamer/ext``).

Each build lives in ``<cache>/<name>-<key>``, where the key hashes everything the library depends on: the
source, the compiler flags (and with them the CPU baseline), the compiler's version, torch's version and
the Python ABI. Two checkouts or virtual environments therefore keep their own builds instead of rebuilding
each other's, and a source change builds afresh. The code is compiled for a portable baseline, never
``-march=native``: on x86-64 with AVX2 and FMA (checked at run time) for those instructions, else for
plain x86-64; elsewhere for the architecture's default. A cache shared between different CPUs (a network
home) thus only ever holds libraries that run on the CPU that loads them.

Concurrent builds of one key are serialised by an OS file lock on ``<folder>/build.lock``, which the
kernel releases when its holder exits, however it exits. torch's own ``lock`` file in the folder is not:
a build killed mid-way leaves it behind and every later load would wait on it forever. Holding our lock,
no other build of the folder can be running, so a ``lock`` file found then is such a leftover and is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

try:
    import fcntl
except ImportError:  # Windows: torch's lock file alone serialises builds
    fcntl = None

CSRC = Path(__file__).resolve().parent / "csrc"
# -ffast-math lets the compiler reassociate and vectorise the blending sums; the gradient tests hold the
# kernels to the torch reference with it on. Finite inputs are assumed (the kernels never test for NaN).
OPTIMISE = ("-O3", "-fopenmp", "-ffast-math")
# x86-64 instruction sets by torch's CPU capability, which requires exactly these features (AVX2: avx2 and
# fma; AVX512: avx512 vl, bw, dq and fma). Where present, AVX-512 saves a third of the kernels' time
# (Gaussian forward+backward on an AMD EPYC core: 150 ms against 230 ms with AVX2).
X86_BASELINES = {
    "AVX2": ("-mavx2", "-mfma"),
    "AVX512": ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"),
}


class ExtensionUnavailable(RuntimeError):
    """The C++ kernels could not be built here (no compiler, or a build error)."""


def cpu_baseline_flags(machine: str | None = None, capability: str | None = None) -> tuple[str, ...]:
    """Instruction-set flags for this CPU's portable baseline (never ``-march=native``).

    ``machine`` is ``platform.machine()``, ``capability`` torch's run-time CPU check
    (``torch.backends.cpu.get_cpu_capability()``: "AVX2", "AVX512", "DEFAULT", …); both default to this
    machine's.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return ()
    if capability is None:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    return X86_BASELINES.get(capability.upper(), ())


@cache
def _compiler_version() -> str:
    """The first line of ``$CXX --version`` (torch builds with ``$CXX``, default ``c++``); "" without one."""
    compiler = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    first_line = result.stdout.partition("\n")[0].strip()
    return f"{compiler}: {first_line}"


def build_key(source: bytes, flags: tuple[str, ...], *, torch_version: str, compiler: str, python_abi: str) -> str:
    """16 hex digits naming one build: a hash of the source and of everything it is compiled with."""
    digest = hashlib.sha256(source)
    for part in (" ".join(flags), torch_version, compiler, python_abi):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("MICRODREAMER_EXT_DIR", Path.home() / ".cache" / "microdreamer" / "ext"))


def build_directory(name: str, flags: tuple[str, ...]) -> Path:
    """``<cache>/<name>-<key>`` for ``csrc/<name>.cpp`` compiled with ``flags`` by this environment."""
    import torch

    key = build_key(
        (CSRC / f"{name}.cpp").read_bytes(), flags, torch_version=torch.__version__,
        compiler=_compiler_version(), python_abi=f"{sys.implementation.cache_tag}-{platform.machine()}",
    )
    return cache_root() / f"{name}-{key}"


@contextlib.contextmanager
def exclusive_build(build_dir: Path):
    """Hold ``build_dir``'s build lock (waiting for another process's build to end), with torch's leftover
    ``lock`` file from a killed build removed."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "build.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released with the process, however it ends
            (build_dir / "lock").unlink(missing_ok=True)
        yield


@cache
def load_extension(name: str) -> ModuleType:
    """Build (once per cache key) and import ``csrc/<name>.cpp`` as a torch extension module."""
    from torch.utils import cpp_extension

    flags = OPTIMISE + cpu_baseline_flags()
    build_dir = build_directory(name, flags)
    try:
        with exclusive_build(build_dir):
            return cpp_extension.load(
                name=f"microdreamer_{name}",
                sources=[str(CSRC / f"{name}.cpp")],
                extra_cflags=list(flags),
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as exc:  # compiler missing or build failure: callers fall back to plain torch
        raise ExtensionUnavailable(f"could not build the C++ kernel '{name}': {exc}") from exc


@cache
def kernel_unavailable(name: str) -> str | None:
    """``None`` when ``csrc/<name>.cpp`` builds and loads here, else why not (one line)."""
    try:
        load_extension(name)
    except ExtensionUnavailable as exc:
        return str(exc).splitlines()[0]
    return None
