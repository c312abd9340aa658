"""Condition images for distillation, as GECO trains on them, and the folder that holds them.

GECO needs one view per object as the condition (§4.1: Objaverse LVIS objects, zero elevation, gray 127/255
background, as Zero123++ wants its input: square, at least 320², spec teachers.md §4). ``prepare`` turns

- meshes (.obj, .glb, .gltf) into renders at elevation 0 from ``views`` azimuths evenly spaced from 0 (our
  orbit convention, radius 2, fovy 49.1°, albedo only: the project's mesh renderer does no lighting);
- images into the same form through :func:`microdreamer.preprocess.preprocess` (background removal);

then both are recentred (:func:`~microdreamer.preprocess.recentre`: longer side ``size·(1 − border_ratio)``)
and composited on uint8 gray 127. The folder gets ``manifest.json``: the settings, one record per condition
image (file, source, kind, azimuth) and one per input that failed, with its one-line reason.
:func:`load_conditions` checks such a folder completely before a run uses it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..batch import IMAGE_SUFFIXES
from ..errors import UserError
from ..io.atomic import atomic_path, check_output_dir
from ..io.images import load_image, save_image, to_uint8
from ..preprocess import MODES, preprocess, recentre
from ..sir.cameras import Cameras
from ..wording import plural

MANIFEST = "manifest.json"
FORMAT = "microdreamer-geco-conditions"
VERSION = 1
MESH_SUFFIXES = (".obj", ".glb", ".gltf")
#: Zero123++'s background, uint8
GRAY = 127
#: render distance and field of view of mesh conditions (the project's orbit defaults)
RADIUS, FOVY = 2.0, 49.1
#: mesh renders are made at this multiple of the output size, then recentred (area-shrunk) to it
RENDER_SCALE = 2


@dataclass
class PrepareOptions:
    size: int = 320
    views: int = 1  # per mesh
    border_ratio: float = 0.2
    remove_background: str = "auto"  # for images: see microdreamer.preprocess
    overwrite: bool = False
    device: str = "cpu"  # mesh rendering
    backend: str = "auto"

    def validate(self) -> "PrepareOptions":
        if self.size < 320:
            raise UserError(f"--size must be at least 320 (Zero123++ wants inputs of at least 320²), got {self.size}")
        if self.views < 1:
            raise UserError(f"--views must be at least 1, got {self.views}")
        if not 0.0 <= self.border_ratio < 1.0:
            raise UserError(f"--border-ratio must lie in [0, 1), got {self.border_ratio}")
        if self.remove_background not in MODES:
            raise UserError(f"unknown background removal {self.remove_background!r} (use {', '.join(MODES)})")
        return self


@dataclass
class PrepareReport:
    out: Path
    items: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def collect_inputs(specs: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(inputs, ignored): files named directly (which must be images or meshes) and the image and mesh
    files under folders (recursively, sorted, hidden files left out; other files are returned as ignored).
    A missing path, an unknown file type, an empty folder or two inputs with the same name are refused."""
    suffixes = IMAGE_SUFFIXES + MESH_SUFFIXES
    inputs: list[Path] = []
    ignored: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.rglob("*")
                           if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
            found = [f for f in files if f.suffix.lower() in suffixes]
            if not found:
                raise UserError(f"folder {path} holds no images or meshes ({', '.join(s[1:] for s in suffixes)})")
            inputs += found
            ignored += [f for f in files if f.suffix.lower() not in suffixes]
        elif path.is_file():
            if path.suffix.lower() not in suffixes:
                raise UserError(f"{path} is neither an image nor a mesh (use {', '.join(s[1:] for s in suffixes)})")
            inputs.append(path)
        else:
            raise UserError(f"input not found: {path}")
    unique = list(dict.fromkeys(f.resolve() for f in inputs))
    owners: dict[str, Path] = {}
    for f in unique:
        if f.stem in owners:
            raise UserError(f"{f} and {owners[f.stem]} would write the same condition images ('{f.stem}'); rename one")
        owners[f.stem] = f
    return unique, ignored


def on_gray(rgba: np.ndarray) -> np.ndarray:
    """Straight uint8 RGBA ``[H,W,4]`` composited on gray 127 → uint8 RGB ``[H,W,3]``."""
    alpha = rgba[:, :, 3:].astype(np.float64) / 255.0
    return to_uint8(rgba[:, :, :3] * alpha + GRAY * (1.0 - alpha))


def image_condition(path: Path, options: PrepareOptions) -> np.ndarray:
    """One image → its condition image (uint8 RGB ``[size,size,3]`` on gray)."""
    rgba = preprocess(load_image(path), size=options.size, border_ratio=options.border_ratio,
                      remove_background=options.remove_background)  # type: ignore[arg-type]
    return on_gray(rgba)


def mesh_azimuths(views: int) -> list[float]:
    return [360.0 * i / views for i in range(views)]


def mesh_conditions(path: Path, options: PrepareOptions) -> list[np.ndarray]:
    """One mesh → its condition images at :func:`mesh_azimuths` (uint8 RGB ``[size,size,3]`` on gray)."""
    from ..io.mesh import load_mesh
    from ..render.mesh import rasterize_mesh

    mesh = load_mesh(path).to(options.device)
    azimuths = mesh_azimuths(options.views)
    cameras = Cameras.orbit([0.0] * len(azimuths), azimuths, RADIUS, options.size * RENDER_SCALE, FOVY)
    with torch.no_grad():
        out = rasterize_mesh(mesh, cameras, torch.zeros(3), options.backend, supersample=2)
    alpha = out.alpha.clamp(0, 1)
    straight = torch.where(alpha > 0, out.rgb / alpha.clamp_min(1e-12), torch.zeros_like(out.rgb)).clamp(0, 1)
    rgba = torch.cat([straight, alpha], 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0
    images = []
    for view in rgba:
        if not (view[:, :, 3] > 0).any():
            raise UserError(f"{path}: the mesh is not visible from the condition camera")
        images.append(on_gray(recentre(to_uint8(view), size=options.size, border_ratio=options.border_ratio)))
    return images


def prepare_conditions(
    specs: Sequence[str | Path],
    out: str | Path,
    options: PrepareOptions | None = None,
    on_input: Callable[[int, int, Path, str | None], None] | None = None,
) -> PrepareReport:
    """Write the condition images of ``specs`` (files and folders of images and meshes) and
    ``out/manifest.json``. Bad settings, inputs and output folders are refused before any work; an input
    that cannot be read is recorded as failed and the others go on. ``on_input(i, n, path, error)`` is
    called after each input."""
    options = (options or PrepareOptions()).validate()
    out = Path(out).expanduser()
    check_output_dir(out)
    inputs, ignored = collect_inputs(specs)
    manifest_path = out / MANIFEST
    if manifest_path.exists() and not options.overwrite:
        raise UserError(f"{out} already holds condition images ({MANIFEST}); pass --overwrite or choose another --out")
    report = PrepareReport(out, ignored=[str(f) for f in ignored])
    for i, path in enumerate(inputs):
        error = None
        try:
            if path.suffix.lower() in MESH_SUFFIXES:
                kind, images, azimuths = "mesh", mesh_conditions(path, options), mesh_azimuths(options.views)
                names = [f"{path.stem}_az{round(a):03d}.png" for a in azimuths]
            else:
                kind, images, azimuths, names = "image", [image_condition(path, options)], [None], [f"{path.stem}.png"]
            for name, image, azimuth in zip(names, images, azimuths):
                save_image(out / name, image)
                record = {"file": name, "source": str(path), "kind": kind}
                report.items.append(record if azimuth is None else {**record, "azimuth": azimuth})
        except UserError as exc:
            error = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            report.failed.append({"source": str(path), "error": error})
        if on_input is not None:
            on_input(i, len(inputs), path, error)
    manifest = {
        "format": FORMAT, "version": VERSION, "size": options.size, "background": GRAY, "elevation": 0.0,
        "border_ratio": options.border_ratio, "mesh_radius": RADIUS, "mesh_fovy": FOVY,
        "items": report.items, "failed": report.failed,
    }
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return report


@dataclass
class ConditionSet:
    """The condition images of a prepared folder, checked; :meth:`image` loads one as the models take it."""

    root: Path
    files: list[str]
    size: int

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> torch.Tensor:
        """Condition ``index`` as ``[1,3,S,S]`` float32 in [0, 1]."""
        rgb = load_image(self.root / self.files[index])[:, :, :3]
        return torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()

    @property
    def fingerprint(self) -> str:
        """sha256 of the ordered file list: the data order of a run depends on it."""
        return hashlib.sha256("\n".join(self.files).encode()).hexdigest()


def load_conditions(folder: str | Path) -> ConditionSet:
    """Read and check a folder written by :func:`prepare_conditions`: its manifest, and every listed image
    present, readable (header) and square. Everything wrong is one line, before any model is loaded."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"--data {root} is not a folder; prepare one with `microdreamer distill prepare`")
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"--data {root} has no {MANIFEST}; prepare it with `microdreamer distill prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read as JSON ({exc}); prepare the folder again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a manifest of condition images; "
                        "prepare the folder with `microdreamer distill prepare`")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path} has version {manifest.get('version')!r}, this microdreamer reads version {VERSION}")
    items = manifest.get("items")
    if not isinstance(items, list) or not all(isinstance(r, dict) and isinstance(r.get("file"), str) for r in items):
        raise UserError(f"{path} has no list of items with file names; prepare the folder again")
    if not items:
        raise UserError(f"{path} lists no condition images (all inputs failed?); prepare the folder again")
    files = [r["file"] for r in items]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise UserError(f"--data {root}: {plural(len(missing), 'listed file')} missing ({', '.join(missing[:3])}); "
                        "prepare the folder again")
    for name in files:
        try:
            with Image.open(root / name) as image:
                width, height = image.size
        except (OSError, Image.DecompressionBombError) as exc:
            raise UserError(f"--data {root}: {name} is not a readable image ({exc}); "
                            "prepare the folder again") from None
        if width != height:
            raise UserError(f"--data {root}: {name} is {width}×{height}, condition images are square; "
                            "prepare the folder again")
    return ConditionSet(root, files, int(manifest.get("size", 0)))
