"""The representation registry: ``representation`` in the run configuration → the class SIR optimises, and
a saved file → the representation it holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import UserError
from ..io.ply import GaussianPLY, is_gaussian_ply
from .base import Representation


@dataclass(frozen=True)
class RepresentationEntry:
    name: str
    output: str  # key of the saved file in run reports ("ply" for Gaussians, as before)
    suffix: str  # the saved file's suffix
    primitive: str  # what num_primitives counts (singular), for summaries
    # (config, device, generator, start): ``start`` is raw 3DGS parameters to begin from, None for the
    # representation's own initialisation
    build: Callable[[RunConfig, torch.device, torch.Generator, GaussianPLY | None], Representation]
    load: Callable[[Path, RunConfig, torch.device], Representation]  # a saved file, ready to render
    holds: Callable[[Path], bool]  # whether a file with its suffix is one this representation saved (header)
    # refuses, in one line, renderer backends the device cannot run; cheap (builds nothing), so a run makes it
    # before any model loads
    check: Callable[[RunConfig, torch.device], None]


def _gaussians(cfg: RunConfig, device: torch.device, generator: torch.Generator,
               start: GaussianPLY | None = None) -> Representation:
    from .gaussians import Gaussians

    return Gaussians(cfg.gaussians, device, generator, init=start)


def _load_gaussians(path: Path, cfg: RunConfig, device: torch.device) -> Representation:
    from .gaussians import Gaussians

    return Gaussians.load(path, cfg.gaussians, device)


def _check_gaussians(cfg: RunConfig, device: torch.device) -> None:
    from ..render.gaussians import resolve_backend

    resolve_backend(cfg.gaussians.backend, device, build=False)


def _nerf(cfg: RunConfig, device: torch.device, generator: torch.Generator,
          start: GaussianPLY | None = None) -> Representation:
    from .nerf import NerfField

    if start is not None:
        raise UserError("a NeRF cannot start from 3D Gaussians: use representation = \"gaussians\"")
    return NerfField(cfg.nerf, device, generator)


def _load_nerf(path: Path, cfg: RunConfig, device: torch.device) -> Representation:
    from .nerf import NerfField

    return NerfField.load(path, device)  # its configuration travels in the file


def _check_nerf(cfg: RunConfig, device: torch.device) -> None:
    from ..render.hashgrid import resolve_backend
    from ..render.volume import resolve_volume_backend

    resolve_backend(cfg.nerf.encoding_backend, device, build=False)
    resolve_volume_backend(cfg.nerf.backend, device, build=False)


REPRESENTATIONS: dict[str, RepresentationEntry] = {
    e.name: e
    for e in (
        RepresentationEntry("gaussians", "ply", ".ply", "Gaussian", _gaussians, _load_gaussians, is_gaussian_ply,
                            _check_gaussians),
        RepresentationEntry("nerf", "nerf", ".safetensors", "occupied grid cell", _nerf, _load_nerf,
                            lambda path: True, _check_nerf),
    )
}


def representation_entry(name: str) -> RepresentationEntry:
    if name not in REPRESENTATIONS:
        raise UserError(f"unknown representation '{name}' (available: {', '.join(REPRESENTATIONS)})")
    return REPRESENTATIONS[name]


def representation_for_file(path: Path) -> RepresentationEntry | None:
    """The representation whose runs save files with ``path``'s suffix (``.ply``: Gaussians,
    ``.safetensors``: a NeRF); None for another suffix."""
    return next((e for e in REPRESENTATIONS.values() if Path(path).suffix.lower() == e.suffix), None)


def saved_representation(path: Path) -> RepresentationEntry | None:
    """The representation a saved run's file holds (a 3DGS PLY, a NeRF's safetensors), by name and header;
    None for any other file (a mesh, a mesh PLY)."""
    entry = representation_for_file(path)
    return entry if entry is not None and Path(path).is_file() and entry.holds(Path(path)) else None


def load_saved(path: Path, device: torch.device) -> Representation:
    """A run's saved file (a 3DGS PLY, a NeRF's safetensors) ready to render, with the default settings (a
    NeRF's own travel in its file)."""
    entry = saved_representation(path)
    if entry is None:
        raise UserError(f"{path} is neither a 3DGS PLY nor a NeRF (.safetensors) written by microdreamer")
    return entry.load(Path(path), RunConfig(), device)
