"""Held-out evaluation of a result against a ground-truth mesh.

The 16 evaluation cameras sit at half-integer azimuths and elevations, which the training sampler
(integer azimuth offsets and integer elevation offsets) can never draw, so no view was seen in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import GaussianConfig
from .io.mesh import load_mesh
from .metrics import psnr, ssim
from .render.mesh import rasterize_mesh
from .representations.gaussians import Gaussians
from .sir.cameras import Cameras

HELD_OUT_VIEWS = 16


def held_out_cameras(radius: float = 2.0, resolution: int = 256, fovy: float = 49.1) -> Cameras:
    """16 views: azimuths 11.25° + 22.5°·i, elevations alternating −20.5° (above) and +10.5° (below)."""
    i = torch.arange(HELD_OUT_VIEWS, dtype=torch.float32)
    azimuth = 11.25 + 22.5 * i
    elevation = torch.where(i % 2 == 0, torch.tensor(-20.5), torch.tensor(10.5))
    return Cameras.orbit(elevation, azimuth, radius, resolution, fovy)


@dataclass
class ViewScore:
    view: int
    elevation: float
    azimuth: float
    psnr: float
    ssim: float


@dataclass
class EvalReport:
    result: str
    reference: str
    views: list[ViewScore]

    @property
    def mean_psnr(self) -> float:
        return sum(v.psnr for v in self.views) / len(self.views)

    @property
    def mean_ssim(self) -> float:
        return sum(v.ssim for v in self.views) / len(self.views)

    def to_dict(self) -> dict:
        return {
            "result": self.result,
            "reference": self.reference,
            "mean_psnr": self.mean_psnr,
            "mean_ssim": self.mean_ssim,
            "views": [asdict(v) for v in self.views],
        }


def evaluate_gaussians(
    ply: Path,
    mesh_path: Path,
    device: torch.device,
    radius: float = 2.0,
    resolution: int = 256,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> EvalReport:
    """PSNR/SSIM of the Gaussians' renders against the mesh's renders on the held-out views."""
    mesh = load_mesh(mesh_path).to(device)
    gaussians = Gaussians.load(ply, GaussianConfig(), device)
    cams = held_out_cameras(radius, resolution).to(device)
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    with torch.no_grad():
        truth = rasterize_mesh(mesh, cams, bg, supersample=2).rgb.clamp(0, 1)
        pred = gaussians.render(cams, bg).rgb.clamp(0, 1)
    p, s = psnr(pred, truth), ssim(pred, truth)
    views = [
        ViewScore(i, float(cams.elevation[i]), float(cams.azimuth[i]), float(p[i]), float(s[i]))
        for i in range(len(cams))
    ]
    return EvalReport(str(ply), str(mesh_path), views)
