"""``microdreamer doctor``: what this machine can run, found without the network.

Each :class:`Check` has a status: ``ok`` (usable), ``missing`` (an optional part is not installed),
``warn`` (installed but not usable here, or worth knowing) or ``error`` (something the tool needs is
broken). Only ``error`` makes the doctor fail.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .wording import plural

STATUSES = ("ok", "missing", "warn", "error")
#: optional GPU backends the renderers use: (import name, what it is used for)
GPU_BACKENDS = (
    ("gsplat", "CUDA Gaussian rasterizer"),
    ("nvdiffrast", "CUDA mesh rasterizer"),
    ("nerfacc", "CUDA NeRF ray marching"),
    ("tinycudann", "CUDA hash-grid encoding (NeRF fields)"),
)
#: our C++ (OpenMP) kernels, built on first use
CPU_KERNELS = (("gaussians", "Gaussian rasterizer"), ("mesh", "mesh rasterizer"), ("volume", "NeRF volume renderer"),
               ("hashgrid", "hash-grid encoding"), ("nerf_heads", "NeRF MLP heads"))
_GIB = 1024**3


@dataclass
class Check:
    section: str
    name: str
    status: str
    detail: str


def _gib(n: int | float) -> str:
    return f"{n / _GIB:.1f} GiB"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:160]


def check_system() -> list[Check]:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return [
        Check("system", "microdreamer", "ok", __version__),
        Check("system", "python", "ok", f"{platform.python_version()} on {platform.platform()}"),
        Check("system", "torch", "ok", f"{torch.__version__} ({build}, {torch.get_num_threads()} CPU threads)"),
    ]


def check_devices() -> list[Check]:
    checks = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(index)
            try:
                free, total = torch.cuda.mem_get_info(index)
                memory = f"{_gib(free)} free of {_gib(total)}"
            except RuntimeError as error:
                memory = f"memory unknown ({_one_line(error)})"
            checks.append(Check("devices", f"cuda:{index}", "ok", f"{name}, {memory}"))
    else:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU visible"
        checks.append(Check("devices", "cuda", "missing", f"{why}: runs use the CPU (slow)"))
    if torch.backends.mps.is_available():
        checks.append(Check("devices", "mps", "ok", "Apple GPU available"))
    checks.append(Check("devices", "cpu", "ok", plural(os.cpu_count(), "core") if os.cpu_count() else "cores unknown"))
    return checks


def _module_check(section: str, module: str, purpose: str) -> Check:
    if importlib.util.find_spec(module) is None:
        return Check(section, module, "missing", f"not installed ({purpose})")
    try:
        imported = importlib.import_module(module)
    except (Exception, SystemExit) as error:  # a CUDA extension without a GPU; rembg exits without onnxruntime
        return Check(section, module, "warn", f"installed but does not import: {_one_line(error)}")
    version = getattr(imported, "__version__", "")
    if section == "backends" and not torch.cuda.is_available():
        return Check(section, module, "warn", f"{version} installed, but unusable without a CUDA GPU ({purpose})")
    return Check(section, module, "ok", f"{version} ({purpose})".strip())


def check_backends(build_kernels: bool = True) -> list[Check]:
    checks = [_module_check("backends", module, purpose) for module, purpose in GPU_BACKENDS]
    from .render._build import ExtensionUnavailable, load_extension

    for name, purpose in CPU_KERNELS:
        label = f"C++ {name} kernel"
        if not build_kernels:
            checks.append(Check("backends", label, "warn", "not checked (--no-build)"))
            continue
        try:
            load_extension(name)
        except ExtensionUnavailable as error:
            checks.append(Check("backends", label, "warn", f"cannot build, the slower torch {purpose} is used: "
                                                           f"{_one_line(error)}"))
        else:
            checks.append(Check("backends", label, "ok", f"built ({purpose}, OpenMP)"))
    return checks


def check_models(cache_dir: str | Path | None = None) -> list[Check]:
    if importlib.util.find_spec("huggingface_hub") is None:
        return [Check("models", "huggingface_hub", "missing", "not installed: pip install 'microdreamer[models]'")]
    from huggingface_hub import constants

    from .teachers.catalog import CATALOG, cache_status

    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    checks = []
    probe = next((p for p in (root, *root.parents) if p.exists()), None)
    space = f", {_gib(shutil.disk_usage(probe).free)} free on its disk" if probe is not None else ""
    checks.append(Check("models", "cache", "ok", f"{root}{space}"))
    for entry in CATALOG:
        cached, size = cache_status(entry, cache_dir)
        licence = "" if entry.commercial_use else "; non-commercial use only"
        if cached:
            checks.append(Check("models", entry.name, "ok", f"cached, {_gib(size or 0)}{licence}"))
        elif size:
            checks.append(Check("models", entry.name, "warn", f"incomplete in the cache ({_gib(size)}); "
                                                              f"run `microdreamer models download {entry.name}`"))
        else:
            checks.append(Check("models", entry.name, "missing", f"not cached (about {entry.approx_size_gb:.1f} GB "
                                                                 f"download){licence}"))
    return checks


def check_tools() -> list[Check]:
    from .video import ffmpeg_exe

    checks = []
    exe = ffmpeg_exe()
    if exe is not None:
        checks.append(Check("tools", "ffmpeg", "ok", f"{exe} (mp4 turntables)"))
    elif shutil.which("ffmpeg"):
        checks.append(Check("tools", "ffmpeg", "warn", "a system ffmpeg exists, but mp4 output needs imageio-ffmpeg: "
                                                       "pip install imageio-ffmpeg (gif works without it)"))
    else:
        checks.append(Check("tools", "ffmpeg", "missing", "pip install imageio-ffmpeg for mp4 turntables "
                                                          "(gif works without it)"))
    checks += [
        _module_check("tools", "rembg", "background removal of photos without alpha"),
        _module_check("tools", "diffusers", "the diffusion teachers"),
        _module_check("tools", "transformers", "the diffusion teachers' image/text encoders"),
    ]
    return checks


def run_checks(build_kernels: bool = True, cache_dir: str | Path | None = None) -> list[Check]:
    """All checks, in display order; no section raises."""
    sections: list[Callable[[], list[Check]]] = [
        check_system, check_devices, lambda: check_backends(build_kernels), lambda: check_models(cache_dir),
        check_tools,
    ]
    checks: list[Check] = []
    for section in sections:
        try:
            checks += section()
        except Exception as error:  # a broken part must not hide the rest of the report
            checks.append(Check("doctor", getattr(section, "__name__", "check"), "error", _one_line(error)))
    return checks


def to_dict(checks: list[Check]) -> dict:
    return {
        "ok": not any(c.status == "error" for c in checks),
        "checks": [asdict(c) for c in checks],
    }
