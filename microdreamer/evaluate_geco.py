"""GECO's evaluation protocol (GECO §4.2, spec geco.md §2.5): a result against its ground-truth mesh on two
sets of views, with the input camera fixed at azimuth 0, elevation 0 of the frame both share (a
reference-teacher run's frame, as the held-out protocol assumes: the mesh fitted into the unit box):

- ``zero123plus``: the six Zero123++ viewpoints relative to the input (azimuths 30 + 60·k, 30° above and 20°
  below by turns);
- ``azimuths``: 15 views at elevation 0, azimuths 24·k (k = 0..14, the input view first).

Scores per view: PSNR, SSIM and, when its weights are given, LPIPS (VGG, v0.1: :mod:`microdreamer.metrics_lpips`),
with means per set and over all 21 views (GECO does not say which set or sets its Table 1 averages). The
result is rendered as :func:`~microdreamer.video.result_renderer` draws it (a mesh in its run's frame when its
export report says so), the mesh as the held-out protocol renders it (``shading``), all on white, by cameras at
the held-out protocol's distance and field of view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import video
from .evaluate import reference_renders, run_shading
from .generators.zero123plus import zero123plus_cameras
from .io.mesh import load_mesh
from .metrics import psnr, ssim
from .metrics_lpips import LPIPS
from .sir.cameras import Cameras

#: the sets of views and their sizes, in the order the cameras list them
SETS = (("zero123plus", 6), ("azimuths", 15))


def geco_cameras(radius: float = 2.0, resolution: int = 256, fovy: float = 49.1) -> Cameras:
    """The 21 views of the protocol: the six Zero123++ viewpoints, then 15 azimuths at elevation 0."""
    six = zero123plus_cameras(radius=radius, fovy=fovy, resolution=resolution)
    ring = torch.arange(SETS[1][1], dtype=torch.float32) * (360.0 / SETS[1][1])
    elevation = torch.cat([six.elevation.float(), torch.zeros_like(ring)])
    return Cameras.orbit(elevation, torch.cat([six.azimuth.float(), ring]), radius, resolution, fovy)


@dataclass
class GECOViewScore:
    view: int
    set: str  # zero123plus | azimuths
    elevation: float
    azimuth: float
    psnr: float
    ssim: float
    lpips: float | None  # None without LPIPS weights


@dataclass
class GECOEvalReport:
    result: str
    reference: str
    shading: str  # how the reference was rendered: lit | albedo
    views: list[GECOViewScore]

    def means(self, set_name: str | None = None) -> dict[str, float | None]:
        """PSNR, SSIM and LPIPS averaged over one set's views (None: all views)."""
        views = [v for v in self.views if set_name in (None, v.set)]
        lpips = [v.lpips for v in views if v.lpips is not None]
        return {"psnr": sum(v.psnr for v in views) / len(views), "ssim": sum(v.ssim for v in views) / len(views),
                "lpips": sum(lpips) / len(lpips) if lpips else None}

    def to_dict(self) -> dict:
        return {"protocol": "geco", "result": self.result, "reference": self.reference, "shading": self.shading,
                "mean": self.means(), **{f"mean_{name}": self.means(name) for name, _ in SETS},
                "views": [asdict(v) for v in self.views]}


def evaluate_geco(
    result: Path,
    reference: Path,
    device: torch.device,
    *,
    lpips: LPIPS | None = None,
    radius: float = 2.0,
    resolution: int = 256,
    shading: str | None = None,
) -> GECOEvalReport:
    """The protocol on a saved result (3DGS PLY, NeRF, mesh) against the mesh ``reference``."""
    shading = shading or run_shading(result)
    cams = geco_cameras(radius, resolution).to(device)
    render = video.result_renderer(Path(result), device, run_frame=True)
    with torch.no_grad():
        pred = render(cams).clamp(0, 1)
    gt, _ = reference_renders(load_mesh(reference), cams, (1.0, 1.0, 1.0), shading)
    p, s = psnr(pred, gt), ssim(pred, gt)
    distance = None
    if lpips is not None:
        with torch.no_grad():
            distance = lpips.to(device)(pred, gt)
    names = [name for name, count in SETS for _ in range(count)]
    views = [GECOViewScore(i, names[i], float(cams.elevation[i]), float(cams.azimuth[i]), float(p[i]), float(s[i]),
                           None if distance is None else float(distance[i])) for i in range(len(cams))]
    return GECOEvalReport(str(result), str(reference), shading, views)
