"""Held-out evaluation of a result against a ground-truth mesh.

The 16 evaluation cameras sit at half-integer azimuths and elevations, which the training sampler
(integer azimuth offsets and integer elevation offsets) can never draw, so no view was seen in training.
A result is 3D Gaussians (a 3DGS PLY), a NeRF (its safetensors) or a mesh (an exported GLB/OBJ/PLY); a
mesh is also compared as a surface (:mod:`microdreamer.mesh_metrics`). The reference is fitted into the
unit box, the frame reference-teacher runs reconstruct in. Gaussians and NeRFs are compared in their own
frame; so is a mesh whose export report (``<stem>_mesh.json``, with the centring, scale and up axis of the
export) lies beside it. Any other mesh is fitted into the unit box by its own bounding box, which is
sensitive to thin parts that the reconstruction lost or thickened (a 1 % longer box shifts every point by
~0.005).

The reference is rendered as the run's reference teacher rendered it: ``lit`` (the default teacher
mode; the result's colours carry the light it learnt) or ``albedo``. Without a mode given, the run's
report beside the result (``<stem>.json``) says which; failing that, ``lit``. The PSNR against the
reference's albedo is reported apart (``albedo_psnr``): it tells how far a result's colours are from
the surface colours, which only an ``albedo`` run can match.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .export.writers import OutputFrame
from .io.mesh import TexturedMesh, load_mesh
from .mesh_metrics import DEFAULT_SAMPLES, SurfaceScores, compare_surfaces
from .metrics import psnr, ssim
from .render.mesh import rasterize_mesh, shading_light
from .render.types import RenderOutput
from .representations.registry import load_saved
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
    albedo_psnr: float  # against the reference's albedo render


@dataclass
class EvalReport:
    result: str
    reference: str
    views: list[ViewScore]
    shading: str  # how the reference was rendered for ``psnr`` and ``ssim``: lit | albedo

    @property
    def mean_psnr(self) -> float:
        return sum(v.psnr for v in self.views) / len(self.views)

    @property
    def mean_ssim(self) -> float:
        return sum(v.ssim for v in self.views) / len(self.views)

    @property
    def mean_albedo_psnr(self) -> float:
        return sum(v.albedo_psnr for v in self.views) / len(self.views)

    def to_dict(self) -> dict:
        return {
            "result": self.result,
            "reference": self.reference,
            "shading": self.shading,
            "mean_psnr": self.mean_psnr,
            "mean_ssim": self.mean_ssim,
            "mean_albedo_psnr": self.mean_albedo_psnr,
            "views": [asdict(v) for v in self.views],
        }


def run_shading(result: Path) -> str:
    """The reference teacher's shading in the run that wrote ``result`` (its ``<stem>.json``), else ``lit``."""
    from .pipeline import SavedRun

    run = SavedRun.beside(Path(result))
    try:
        teacher = run.data["config"]["teacher"]
        return teacher["shading"] if teacher["name"] == "reference" else "lit"
    except (AttributeError, KeyError, TypeError):
        return "lit"


def evaluate_model(
    path: Path,
    mesh_path: Path,
    device: torch.device,
    radius: float = 2.0,
    resolution: int = 256,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    shading: str | None = None,
) -> EvalReport:
    """PSNR/SSIM of a saved representation's renders (a 3DGS PLY, a NeRF's safetensors) against the mesh's
    renders on the held-out views (``shading``: see the module docstring)."""
    shading = shading or run_shading(path)
    model = load_saved(path, device)
    views = held_out_scores(model.render, load_mesh(mesh_path), device, radius, resolution, background, shading)
    return EvalReport(str(path), str(mesh_path), views, shading)


def held_out_scores(
    render: Callable[[Cameras, Tensor], RenderOutput],
    truth: TexturedMesh,
    device: torch.device,
    radius: float,
    resolution: int,
    background: tuple[float, float, float],
    shading: str = "lit",
) -> list[ViewScore]:
    """Per-view PSNR/SSIM of ``render`` against the (antialiased) renders of ``truth`` on the held-out views,
    shaded as ``shading`` says, and the PSNR against its albedo renders."""
    cams = held_out_cameras(radius, resolution).to(device)
    with torch.no_grad():
        pred = render(cams, torch.tensor(background, dtype=torch.float32, device=device)).rgb.clamp(0, 1)
    gt, albedo = reference_renders(truth, cams, background, shading)
    p, s, a = psnr(pred, gt), ssim(pred, gt), psnr(pred, albedo)
    return [
        ViewScore(i, float(cams.elevation[i]), float(cams.azimuth[i]), float(p[i]), float(s[i]), float(a[i]))
        for i in range(len(cams))
    ]


def reference_renders(truth: TexturedMesh, cams: Cameras, background: tuple[float, float, float],
                      shading: str = "lit") -> tuple[Tensor, Tensor]:
    """The (antialiased) renders of ``truth`` by ``cams`` (on their device), shaded as ``shading`` says and in
    albedo, each ``[V,3,H,W]`` in [0, 1]."""
    device = cams.c2w.device
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    truth = truth.to(device)
    with torch.no_grad():
        gt = rasterize_mesh(truth, cams, bg, supersample=2, light=shading_light(shading)).rgb.clamp(0, 1)
        albedo = gt if shading == "albedo" else rasterize_mesh(truth, cams, bg, supersample=2).rgb.clamp(0, 1)
    return gt, albedo


def export_frame(mesh_path: Path) -> OutputFrame | None:
    """The frame recorded by the export that wrote ``mesh_path`` (its ``<stem>_mesh.json``), if any."""
    mesh_path = Path(mesh_path)
    stem = mesh_path.stem.removesuffix("_mesh")
    report = mesh_path.with_name(f"{stem}_mesh.json")
    try:
        data = json.loads(report.read_text())
        if Path(data["outputs"][0]).name != mesh_path.name:
            return None
        frame = data["frame"]
        return OutputFrame(tuple(frame["center"]), frame["size"], frame["scale"], frame["up"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def load_result_mesh(mesh_path: Path, run_frame: bool = True) -> tuple[TexturedMesh, bool]:
    """A result mesh and whether it is in its run's frame: with ``run_frame``, put back there by the frame its
    export report records; otherwise (or without that report) fitted into the unit box."""
    frame = export_frame(mesh_path) if run_frame else None
    if frame is None:
        return load_mesh(mesh_path), False
    mesh = load_mesh(mesh_path, normalize=False)
    mesh.vertices = torch.from_numpy(frame.to_world(mesh.vertices.double().numpy())).float()
    return mesh, True


@dataclass
class MeshEvalReport(EvalReport):
    surface: SurfaceScores | None = None
    frame: str = "unit box"  # or "run": put back into the run's frame by its export report

    def to_dict(self) -> dict:
        s = self.surface
        return {
            **super().to_dict(),
            "frame": self.frame,
            "chamfer": s.chamfer,
            "fscore": {str(t): v for t, v in s.fscore.items()},
            "precision": {str(t): v for t, v in s.precision.items()},
            "recall": {str(t): v for t, v in s.recall.items()},
            "normal_consistency": s.normal_consistency,
        }


def evaluate_mesh(
    mesh_path: Path,
    reference_path: Path,
    device: torch.device,
    radius: float = 2.0,
    resolution: int = 256,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    samples: int = DEFAULT_SAMPLES,
    run_frame: bool = True,
    shading: str | None = None,
) -> MeshEvalReport:
    """Textured-render PSNR/SSIM on the held-out views and surface scores (Chamfer, F-score at 0.01
    and 0.05, normal consistency). With ``run_frame``, a result whose export report records its frame
    goes back into its run's frame; otherwise it is fitted into the unit box. The result is rendered
    with its texture alone (its colours carry the light it learnt); ``shading`` is the reference's."""
    shading = shading or run_shading(mesh_path)
    result, in_run_frame = load_result_mesh(mesh_path, run_frame)
    truth = load_mesh(reference_path)
    surface = compare_surfaces(result.vertices.double().numpy(), result.faces.numpy(),
                               truth.vertices.double().numpy(), truth.faces.numpy(), samples=samples)
    result = result.to(device)
    views = held_out_scores(
        lambda cams, bg: rasterize_mesh(result, cams, bg, supersample=2), truth, device, radius, resolution, background,
        shading,
    )
    return MeshEvalReport(str(mesh_path), str(reference_path), views, shading, surface,
                          "run" if in_run_frame else "unit box")
