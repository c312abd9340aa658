"""The representation registry: ``representation`` in the run configuration → the class SIR optimises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..errors import UserError
from ..io.ply import GaussianPLY
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


def _gaussians(cfg: RunConfig, device: torch.device, generator: torch.Generator,
               start: GaussianPLY | None = None) -> Representation:
    from .gaussians import Gaussians

    return Gaussians(cfg.gaussians, device, generator, init=start)


def _nerf(cfg: RunConfig, device: torch.device, generator: torch.Generator,
          start: GaussianPLY | None = None) -> Representation:
    from .nerf import NerfField

    if start is not None:
        raise UserError("a NeRF cannot start from 3D Gaussians: use representation = \"gaussians\"")
    return NerfField(cfg.nerf, device, generator)


REPRESENTATIONS: dict[str, RepresentationEntry] = {
    e.name: e
    for e in (
        RepresentationEntry("gaussians", "ply", ".ply", "Gaussian", _gaussians),
        RepresentationEntry("nerf", "nerf", ".safetensors", "occupied grid cell", _nerf),
    )
}


def representation_entry(name: str) -> RepresentationEntry:
    if name not in REPRESENTATIONS:
        raise UserError(f"unknown representation '{name}' (available: {', '.join(REPRESENTATIONS)})")
    return REPRESENTATIONS[name]
