"""A white mug on the white background, end to end: SIR with the shaded reference teacher, the final clean-up
(whose white-Gaussian filter must keep the mug's body) and the mesh export (which must keep its cavity).

The mug (a revolved profile: wall, bottom, a cavity open at the top, white albedo) is built here. Its
Gaussians start on its surface in an untrained mid-grey, as a stand-in for a reconstruction whose geometry
has converged; a short SIR run then teaches them the colours the teacher shows (the feature lr is raised 6×
so that 36 steps move the colours as far as a full run's ~200 do), with the position lr at its decayed
final value, as late in a run.
"""

import dataclasses

import numpy as np
import pytest
import torch
import trimesh
from test_export_pipeline import gaussians_on

from microdreamer.config import resolve
from microdreamer.evaluate import export_frame
from microdreamer.export import export_mesh
from microdreamer.io.mesh import TexturedMesh, load_mesh
from microdreamer.mesh_metrics import topology
from microdreamer.sir.cameras import CameraSampler, Cameras
from microdreamer.sir.engine import Reference, SIREngine
from microdreamer.teachers.reference import ReferenceTeacher

OUTER, INNER, HEIGHT, BOTTOM = 0.5, 0.42, 0.7, 0.1  # radii, height and bottom thickness: the unit box
RES = 64
GRID = 64  # the export's density grid: cells of about 1.1/64 = 0.017 over the field's box


def mug() -> TexturedMesh:
    """The white mug, y up, centred in the unit box (its diameter is 1)."""
    low, high = -HEIGHT / 2, HEIGHT / 2
    profile = [(0, low), (OUTER, low), (OUTER, high), (INNER, high), (INNER, low + BOTTOM), (0, low + BOTTOM)]
    revolved = trimesh.creation.revolve(np.array(profile, float), sections=48)  # about z
    vertices = revolved.vertices[:, [0, 2, 1]] * np.array([1.0, 1.0, -1.0])  # z up → y up (a rotation)
    return TexturedMesh(torch.tensor(vertices, dtype=torch.float32), torch.tensor(revolved.faces),
                        vertex_colors=torch.ones(len(vertices), 3))


def cavity_points(n: int = 24) -> np.ndarray:
    """A grid over the true cavity (inside the inner wall, from the cavity's floor to the rim)."""
    across = np.linspace(-INNER, INNER, n)
    heights = np.linspace(-HEIGHT / 2 + BOTTOM, HEIGHT / 2, n + 2)[1:-1]
    x, y, z = np.meshgrid(across, heights, across, indexing="ij")
    points = np.stack([x, y, z], -1).reshape(-1, 3)
    return points[points[:, 0] ** 2 + points[:, 2] ** 2 < INNER**2 * 0.999]


def trained(shading: str):
    """The mug's Gaussians after a short SIR run with the ``shading`` teacher (clean-up not yet applied)."""
    truth = mug()
    cfg = resolve("reference", None, {
        "teacher": {"shading": shading},
        "cameras": {"resolution": RES, "views": 4, "elevation": -15.0},  # the input photo from a little above
        "schedule": {"iterations": 3, "steps": 12, "init_steps": 0},
        "gaussians": {"backend": "auto", "feature_lr": 0.06, "position_lr_init": 0.00002},
        "mesh": {"resolution": GRID, "faces": 5000, "texture": 64, "bake_resolution": 64, "refine_steps": 0},
    })
    grey = dataclasses.replace(truth, vertex_colors=torch.full_like(truth.vertex_colors, 0.5))
    gaussians = gaussians_on(grey, count=10000, scale=0.02, cfg=cfg.gaussians)
    teacher = ReferenceTeacher(truth, resolution=RES, shading=shading)
    c = cfg.cameras
    camera = CameraSampler(c.views, c.elevation, c.min_ver, c.max_ver, c.radius, c.resolution, c.fovy).reference()
    rgb, mask = teacher.front_image(camera)
    generator = torch.Generator().manual_seed(0)
    engine = SIREngine(teacher, gaussians, cfg, generator, torch.device("cpu"), reference=Reference(rgb, mask, camera))
    finalize, gaussians.finalize = gaussians.finalize, lambda: None  # the clean-up is looked at on its own
    engine.run()
    gaussians.finalize = finalize
    return truth, gaussians, cfg


def cleaned_up(gaussians) -> tuple[float, float]:
    """Apply the clean-up; the share of Gaussians the white filter removed and of held-out alpha lost."""
    views = Cameras.orbit([-20.5, 10.5, -40.0, 0.0], [11.25, 123.75, 236.25, 303.75], 2.0, RES)
    with torch.no_grad():
        before, count = gaussians.render(views, torch.ones(3)).alpha, gaussians.num_primitives
        gaussians.finalize()
        after = gaussians.render(views, torch.ones(3)).alpha
    return gaussians.cleanup["white_filter"] / count, float((before - after).clamp_min(0).sum() / before.sum())


@pytest.mark.slow
def test_the_filter_keeps_a_white_mug_taught_by_the_shaded_teacher_and_the_export_keeps_its_cavity(tmp_path):
    truth, gaussians, cfg = trained("lit")
    # lit targets peak at 0.9 on a white surface: its Gaussians stay below the filter's colour test, but
    # for the few that the raised lr overshoots (about 1 % of them, ~0.2 % of the alpha when measured)
    removed, lost = cleaned_up(gaussians)
    assert removed < 0.03 and lost < 0.005  # the body is there

    points = cavity_points()
    held = 1 - (gaussians.density(torch.tensor(points, dtype=torch.float32)) > cfg.mesh.threshold).float().mean()
    # the Gaussians' own field leaves most of the cavity empty: a surface layer of σ = 0.02 reaches the
    # threshold about 2σ from its centres, so the walls grow inwards by ~0.04 and the floor up by as much
    assert 0.6 < float(held) < 0.95
    report = export_mesh(gaussians, tmp_path, "mug", cfg, device="cpu")
    path = tmp_path / "mug.glb"
    exported = load_mesh(path, normalize=False)
    vertices = export_frame(path).to_world(exported.vertices.double().numpy())  # back into the run's frame
    surface = trimesh.Trimesh(vertices, exported.faces.numpy())
    assert topology(vertices, exported.faces.numpy()).components == 1 and report.faces > 100
    inside = surface.contains(points)
    # cavity volume ratio (the share of the true cavity the mesh leaves empty): at most one grid cell of
    # wall growth from the field's (≈ 6.4 per unit of inward growth × 0.017 = 0.11), and the axis open
    ratio = 1 - inside.mean()
    assert ratio >= float(held) - 0.11 and ratio > 0.5
    floor = -HEIGHT / 2 + BOTTOM
    axis = (points[:, 0] ** 2 + points[:, 2] ** 2 < 0.2**2) & (points[:, 1] > floor + 0.04 + 0.017)
    assert not inside[axis].any()  # open down to the floor (grown by ~2σ and a cell)
    assert trimesh.Trimesh(truth.vertices.numpy(), truth.faces.numpy()).contains(points).sum() == 0  # the fixture


@pytest.mark.slow
def test_the_same_white_mug_taught_by_the_albedo_teacher_is_eaten_by_the_filter():
    """Why the shaded teacher is the default for geometry: white on white, the Gaussians' colours drift
    above 1 and the reference's filter takes the visible surface."""
    _, gaussians, _ = trained("albedo")
    removed, lost = cleaned_up(gaussians)
    assert removed > 0.5 and lost > 0.2
