"""A NeRF → textured mesh through the export's Representation seam: a field built by hand (the blob bias alone
for density, a colour linear in x through the first hash-grid level) meshes to the sphere its iso-level
implies, wearing the colours of its colour field."""

import json
import math

import numpy as np
import pytest
import torch

from microdreamer.config import NerfConfig, resolve
from microdreamer.errors import UserError
from microdreamer.evaluate import export_frame
from microdreamer.export import export_mesh, mesh_output_paths
from microdreamer.export.extract import COARSE_POINTS, DensityGrid, marching_cubes, sample_grid
from microdreamer.io.mesh import load_mesh
from microdreamer.render.mesh import sample_texture
from microdreamer.representations.nerf import NerfField

from test_export_extract import sphere_grid

TINY = NerfConfig(hash_levels=8, hash_log2_size=14, radius=1.0)
LEVEL = 5.0  # σ iso-level: softplus(10·(1 − r/0.5)) = 5 on the sphere r = 0.5·(1 − softplus⁻¹(5)/10)
RADIUS = 0.5 * (1 - math.log(math.expm1(LEVEL)) / 10)  # 0.25034
GAIN = 16.0  # red = sigmoid(GAIN·(u − ½)), green = sigmoid(−GAIN·(u − ½)), u = (x + 1)/2 the box coordinate


def ball_field() -> NerfField:
    """σ = softplus(blob) exactly (zero density network); colour (sigmoid(16(u − ½)), sigmoid(−16(u − ½)), ½):
    the dense first level holds each vertex's u = (i − ½)/15 (feature 0), which trilinear interpolation
    reproduces, and 1 (feature 1), the MLP's missing bias."""
    field = NerfField(TINY, "cpu", torch.Generator().manual_seed(0))
    grid = field.grid_cfg
    res, f = grid.level_resolutions()[0], grid.n_features_per_level
    assert not grid.level_hashed()[0] and res == 16
    with torch.no_grad():
        field.params.zero_()
        i = torch.arange(res**3) % res  # entry x + y·res + z·res²: its x index
        field.params[: res**3 * f : f] = (i - 0.5) / (res - 1)
        field.params[1 : res**3 * f : f] = 1.0
        for net in (field.density_network, field.feature_network):
            for p in net.parameters():
                p.zero_()
        first, last = field.feature_network.layers[0].weight, field.feature_network.layers[-1].weight
        first[0, 0], first[1, 1] = 1.0, 1.0  # hidden units u and 1
        last[0, 0], last[0, 1], last[1, 0], last[1, 1] = GAIN, -GAIN / 2, -GAIN, GAIN / 2
    field.finalize()
    return field


def expected_colour(points: torch.Tensor) -> torch.Tensor:
    u = (points[:, 0:1] + 1) / 2
    return torch.cat([torch.sigmoid(GAIN * (u - 0.5)), torch.sigmoid(-GAIN * (u - 0.5)), torch.full_like(u, 0.5)], 1)


def test_the_fields_density_and_colour_are_the_ones_built(one_thread):
    field = ball_field()
    points = torch.tensor([[0.0, 0.0, 0.0], [RADIUS, 0.0, 0.0], [0.0, -0.2, 0.1], [-0.3, 0.4, 0.0]])
    blob = torch.nn.functional.softplus(10 * (1 - points.norm(dim=-1) / 0.5))
    torch.testing.assert_close(field.density(points), blob)
    assert float(field.density(points[1:2])) == pytest.approx(LEVEL, rel=1e-5)
    torch.testing.assert_close(field.colour(points), expected_colour(points))


def test_sample_grid_finds_the_ball_coarse_to_fine(one_thread):
    field = ball_field()
    grid = sample_grid(field.density, 1.0, 48, LEVEL)
    side = grid.spacing * 47
    coarse = 2.0 / (COARSE_POINTS - 1)
    # the coarse pass's box around the ball (±RADIUS, to a coarse spacing), grown by 10 % and a coarse spacing
    assert 2 * RADIUS * 1.2 < side <= (2 * RADIUS + 2 * coarse) * 1.2 + 2 * coarse
    centre = grid.origin + side / 2
    assert abs(centre).max() <= coarse
    # every grid value is the field's at that point
    index = torch.tensor([[0, 0, 0], [24, 24, 24], [10, 30, 47], [47, 5, 20]])
    points = torch.from_numpy(grid.to_world(index.numpy())).float()
    torch.testing.assert_close(torch.from_numpy(grid.values[tuple(index.T)]), field.density(points))
    # a level above the whole field: the coarse grid, whose point nearest the centre lies √3/63 from it
    peak = 10 * (1 - math.sqrt(3) / 63 / 0.5)
    with pytest.raises(UserError, match=f"peaks at {peak:.3g}, below the meshing threshold 50"):
        marching_cubes(sample_grid(field.density, 1.0, 48, 50.0), 50.0)


def test_nerf_mesh_is_the_iso_sphere_wearing_the_colour_field(tmp_path, one_thread):
    field = ball_field()
    cfg = resolve("reference-nerf", None, {"mesh": {"resolution": 64, "threshold": LEVEL, "faces": 2000,
                                                    "texture": 256, "refine_steps": 0}})
    report = export_mesh(field, tmp_path, "ball", cfg)
    glb, report_path = mesh_output_paths(tmp_path, "ball", "glb")
    assert report.outputs == [str(glb), str(report_path)] and report.faces <= 2000
    assert set(report.timings) == {"grid", "marching_cubes", "cleanup", "decimation", "uv", "bake", "write"}
    assert json.loads(report_path.read_text())["settings"]["threshold"] == LEVEL
    mesh = load_mesh(glb, normalize=False)  # back into the run's frame through the export report
    world = torch.from_numpy(export_frame(glb).to_world(mesh.vertices.double().numpy())).float()
    radius = world.norm(dim=-1)
    # the fine grid spacing is 0.66/63 ≈ 0.011: marching cubes and Taubin smoothing stay well within it
    assert float((radius - RADIUS).abs().max()) < 0.011 and float((radius.mean() - RADIUS).abs()) < 0.003
    colour = sample_texture(mesh.texture, mesh.uvs)
    # A texel spans about 0.004 world units here (the sphere's 0.79 over ~70 % of 256² texels) where the colour
    # changes by at most GAIN/8 = 2 per unit, and storage rounds to 8 bits: 0.01 apart at most. Only lookups
    # at chart corners reach into the padding, which holds the nearest chart texel's colour (a few vertices).
    error = (colour - expected_colour(world)).abs().amax(1)
    assert float(error.median()) < 0.004 and float(error.quantile(0.99)) < 0.02, float(error.quantile(0.99))
    assert float(colour[:, 0].max() - colour[:, 0].min()) > 0.6  # the whole gradient, 0.12 → 0.88


def test_gaussians_keep_the_render_bake():
    """Only a representation with a colour field is sampled; Gaussians have none (their colours are
    composited along rays)."""
    from microdreamer.representations.gaussians import Gaussians

    gaussians = Gaussians(resolve("reference").gaussians, "cpu", torch.Generator().manual_seed(0))
    assert not gaussians.colour_field and ball_field().colour_field
    with pytest.raises(NotImplementedError, match="no colour field"):
        gaussians.colour(torch.zeros(1, 3))


def test_a_solid_field_keeps_its_open_hollows_and_fills_only_enclosed_ones():
    """A NeRF's grid (not a shell) loses the walls of closed bubbles but keeps the inside of a cup, which the
    shell treatment of a 3DGS grid closes over."""
    cup = sphere_grid(0.4, resolution=64, hole=True)  # a shell 0.15 thick, open at the top (field 0.2 there)
    assert np.linalg.norm(marching_cubes(cup, 0.5)[0], axis=1).min() > 0.3  # as a 3DGS shell: closed over
    cup.shell = False
    assert np.linalg.norm(marching_cubes(cup, 0.5)[0], axis=1).min() < 0.27  # solid: the cup's inner wall stays
    r = np.linalg.norm(np.stack(np.meshgrid(*[np.linspace(-0.5, 0.5, 64)] * 3, indexing="ij")), axis=0)
    bubble = DensityGrid(((r > 0.2) & (r < 0.4)).astype(np.float32), cup.origin, cup.spacing, shell=False)
    assert np.linalg.norm(marching_cubes(bubble, 0.5)[0], axis=1).min() > 0.38  # the closed bubble's wall is gone
