"""A trained representation → a clean, textured mesh file (paper §V "3DGS settings and mesh refinement";
for a NeRF threestudio's mesh exporter, spec nerf §1.8).

Stages, each timed: ``grid`` (the representation's density field) → ``marching_cubes`` → ``cleanup``
(floaters, orientation, smoothing) → ``decimation`` (face budget) → ``uv`` (xatlas) → ``bake`` (texture
sampled from the representation's colour field, or without one baked from its renders, padded across
chart borders) → ``refine`` (one SIR iteration on the texture, when a teacher is given) → ``write`` (GLB,
OBJ+MTL+PNG or PLY, plus ``<stem>_mesh.json`` with this report).

``mesh.method = "lgm"`` (LGM's convert.py, :mod:`.convert`) meshes a NeRF fitted to the Gaussians' renders
instead of their own density: ``field_fit`` comes first, ``grid`` samples the fitted σ, ``vertex_fit``
follows the decimation, the bake samples the fitted colour and ``texture_fit`` follows it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..errors import UserError
from ..io.atomic import atomic_path
from ..render.mesh import rasterize_mesh
from ..representations.base import Representation
from ..sir.engine import Reference
from ..teachers.base import Teacher
from . import convert
from .extract import clean, decimate, marching_cubes, smooth
from .texture import RefineLog, bake, bake_cameras, dilate, refine_texture, texel_surface
from .uv import UVMesh, unwrap
from .writers import MeshAsset, output_frame, output_paths, write_mesh

__all__ = ["STAGES", "MeshExportReport", "StageCallback", "TexturedMesh", "export_mesh", "make_mesh", "mesh_output_paths"]

#: the timed stages of an export, in order (``refine`` only with a teacher; the ``*_fit`` ones with
#: ``mesh.method = "lgm"`` only)
STAGES = ("field_fit", "grid", "marching_cubes", "cleanup", "decimation", "vertex_fit", "uv", "bake", "texture_fit",
          "refine", "write")
StageCallback = Callable[[str], None]  # called with a stage's name as it starts


@dataclass
class MeshExportReport:
    stem: str
    outputs: list[str]
    vertices: int
    faces: int
    faces_by_stage: dict[str, int]
    timings: dict[str, float]
    refine: dict | None = None
    convert: dict | None = None  # ConvertLog of mesh.method lgm
    settings: dict = field(default_factory=dict)
    frame: dict = field(default_factory=dict)  # OutputFrame: the run's frame → the file's

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def mesh_output_paths(out_dir: Path, stem: str, fmt: str) -> list[Path]:
    """Every file :func:`export_mesh` writes: the mesh file(s), then ``<stem>_mesh.json``."""
    return [*output_paths(out_dir, stem, fmt), out_dir / f"{stem}_mesh.json"]


@dataclass
class TexturedMesh:
    """A finished mesh export in memory (:func:`make_mesh`); :meth:`save` writes its files."""

    asset: MeshAsset
    report: MeshExportReport  # its ``outputs`` are filled in by :meth:`save`

    def paths(self, out_dir: Path) -> list[Path]:
        return mesh_output_paths(Path(out_dir), self.report.stem, self.report.settings["format"])

    def save(self, out_dir: Path, overwrite: bool = False) -> MeshExportReport:
        """Write the mesh file(s) and ``<stem>_mesh.json``; all appear together, once complete."""
        out_dir = Path(out_dir)
        paths = self.paths(out_dir)
        taken = [p for p in paths if p.exists()]
        if taken and not overwrite:
            raise UserError(f"{taken[0]} already exists: pass --overwrite to replace it, or choose another --out")
        start = time.perf_counter()
        report = self.report
        report.outputs = [str(p) for p in paths]
        with atomic_path(paths[-1]) as report_tmp:
            write_mesh(self.asset, out_dir, report.stem, report.settings["format"])
            report.timings["write"] = round(report.timings.get("write", 0.0) + time.perf_counter() - start, 3)
            report_tmp.write_text(report.to_json())
        return report


def export_mesh(
    model: Representation,
    out_dir: Path,
    stem: str,
    cfg: RunConfig,
    teacher: Teacher | None = None,
    reference: Reference | None = None,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    backend: str = "auto",
    on_stage: StageCallback | None = None,
) -> MeshExportReport:
    """Mesh, unwrap, texture and write ``model`` (:func:`make_mesh`, then :meth:`TexturedMesh.save`).
    Nothing is written unless every stage succeeds; an existing output is an error unless ``overwrite``
    (checked before any work)."""
    taken = [p for p in mesh_output_paths(Path(out_dir), stem, cfg.mesh.format) if p.exists()]
    if taken and not overwrite:
        raise UserError(f"{taken[0]} already exists: pass --overwrite to replace it, or choose another --out")
    mesh = make_mesh(model, stem, cfg, teacher, reference, device, backend, on_stage)
    return mesh.save(out_dir, overwrite)


def make_mesh(
    model: Representation,
    stem: str,
    cfg: RunConfig,
    teacher: Teacher | None = None,
    reference: Reference | None = None,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    on_stage: StageCallback | None = None,
) -> TexturedMesh:
    """The textured mesh of ``model`` (settings in ``cfg.mesh``: the density field's iso-level
    ``threshold`` is the representation's own scale, 0.5 for Gaussians, 25 for a NeRF), in memory.

    With ``cfg.mesh.method = "lgm"`` the geometry and first texture come from LGM's convert.py fits
    (:mod:`.convert`, at ``cfg.mesh.lgm``'s threshold and the iteration counts for ``device``).
    The texture is refined with ``teacher`` (and the ``reference`` view, when given) unless
    ``cfg.mesh.refine_steps`` is 0 or there is no teacher. Randomness (convert's cameras and field,
    refinement cameras and noise) comes from one generator seeded with ``cfg.seed``.
    """
    m = cfg.mesh
    device = torch.device(device)
    timings: dict[str, float] = {}
    faces: dict[str, int] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        if on_stage is not None:
            on_stage(name)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = round(time.perf_counter() - start, 3)

    generator = torch.Generator().manual_seed(cfg.seed)
    lgm = m.method == "lgm"
    schedule = m.lgm.schedule(device.type)
    colour = model.colour if model.colour_field else None
    losses: dict[str, list[float]] = {}
    if lgm:
        with stage("field_fit"):
            field, losses["field"] = convert.fit_field(model, cfg, schedule, generator, device)
        colour = convert.field_colour(field, cfg)
    with stage("grid"):
        grid = convert.field_grid(field, cfg) if lgm else model.density_grid(m.resolution, m.threshold)
    with stage("marching_cubes"):
        vertices, tris = (marching_cubes(grid, m.lgm.threshold, convert.EMPTY_FIELD_REMEDY) if lgm
                          else marching_cubes(grid, m.threshold))
        faces["marching_cubes"] = len(tris)
    with stage("cleanup"):
        vertices, tris = clean(vertices, tris, m.min_component)
        vertices = smooth(vertices, tris)
        faces["cleanup"] = len(tris)
    with stage("decimation"):
        vertices, tris = decimate(vertices, tris, m.faces)
        faces["decimation"] = len(tris)
    if lgm and schedule.vertex_iterations > 0:
        with stage("vertex_fit"):
            vertices, losses["vertex"] = convert.fit_vertices(model, field, vertices, tris, cfg, schedule, generator,
                                                              backend)
    with stage("uv"):
        mesh = unwrap(vertices, tris, m.texture, padding=max(2, m.texture // 256))
    background = torch.tensor(cfg.background, dtype=torch.float32, device=device)
    with stage("bake"):
        texture, covered = _bake(model, colour, mesh, cfg, background, device, backend)
    if lgm:
        with stage("texture_fit"):
            texture, losses["texture"] = convert.fit_texture(model, mesh, texture, covered, cfg, schedule, generator,
                                                             backend)
    refine_log: RefineLog | None = None
    if teacher is not None and m.refine_steps > 0:
        with stage("refine"):
            texture, refine_log = refine_texture(
                mesh.textured().to(device), texture, covered, teacher, m, cfg.cameras.radius, cfg.cameras.fovy,
                background, generator, reference, backend)
    with stage("write"):  # the output frame here, the files in TexturedMesh.save
        asset = output_frame(mesh, texture, m.up, m.scale)
    report = MeshExportReport(
        stem=stem,
        outputs=[],
        vertices=len(asset.vertices),
        faces=len(asset.uv_faces),
        faces_by_stage=faces,
        timings=timings,
        refine=None if refine_log is None else asdict(refine_log),
        convert=asdict(convert.ConvertLog.of(losses)) if lgm else None,
        settings=asdict(m),
        frame=asdict(asset.frame),
    )
    return TexturedMesh(asset, report)


def _bake(model: Representation, colour: Callable[[torch.Tensor], torch.Tensor] | None, mesh: UVMesh, cfg: RunConfig,
          background: torch.Tensor, device: torch.device, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial texture: a ``colour`` field (points → colours) at the surface point behind each texel, or
    without one ``model``'s renders around the object; padded across chart borders."""
    m = cfg.mesh
    surface = texel_surface(mesh, m.texture, backend, device)
    if colour is not None:
        texture = torch.zeros(m.texture * m.texture, 3, device=device)
        texture[surface.index.to(device)] = colour(surface.position).to(device)
        return dilate(texture.reshape(m.texture, m.texture, 3), surface.covered), surface.covered
    cameras = bake_cameras(cfg.cameras.radius, m.bake_resolution, cfg.cameras.fovy).to(device)
    textured = mesh.textured().to(device)
    with torch.no_grad():
        images = model.render(cameras, background).rgb
        depth = rasterize_mesh(textured, cameras, background, backend).depth
    extent = float(np.ptp(mesh.vertices, axis=0).max())
    texture = bake(surface, m.texture, images, depth, cameras, depth_tolerance=0.01 * extent)
    return dilate(texture, surface.covered), surface.covered
