"""Texture stage: texel surface, bake, dilation, the differentiable texture sampler, SIR texture refinement."""

import dataclasses

import numpy as np
import pytest
import torch
import trimesh

from microdreamer.config import MeshConfig
from microdreamer.export.texture import (
    TextureSampler,
    bake,
    bake_cameras,
    dilate,
    refine_cameras,
    refine_texture,
    texel_surface,
)
from microdreamer.export.uv import UVMesh, unwrap
from microdreamer.render.mesh import rasterize_mesh
from microdreamer.sir.cameras import Cameras
from microdreamer.sir.engine import Reference
from microdreamer.teachers.reference import ReferenceTeacher

WHITE = torch.ones(3)


def flat_square() -> UVMesh:
    """The unit square in the z = 0 plane whose UVs are its x, y coordinates."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], np.float32)
    return UVMesh(np.c_[corners, np.zeros(4)].astype(np.float64), corners, np.array([[0, 1, 2], [0, 2, 3]]),
                  np.arange(4))


@pytest.fixture(scope="module")
def box() -> UVMesh:
    mesh = trimesh.creation.box(extents=(0.6, 0.5, 0.4))
    vertices, faces = trimesh.remesh.subdivide_to_size(mesh.vertices, mesh.faces, max_edge=0.1)
    return unwrap(np.asarray(vertices), np.asarray(faces), 64, padding=2)


def smooth_colours(points: torch.Tensor) -> torch.Tensor:
    """A smooth colour field on 3D points, in [0.1, 0.9]."""
    return 0.5 + 0.4 * torch.stack([torch.sin(6 * points[:, 0]), torch.cos(5 * points[:, 1]),
                                    torch.sin(4 * points[:, 2] + 1)], -1)


def painted(mesh: UVMesh, size: int) -> torch.Tensor:
    """A texture holding :func:`smooth_colours` of the surface point behind every texel, padded."""
    surface = texel_surface(mesh, size)
    texture = torch.zeros(size * size, 3)
    texture[surface.index] = smooth_colours(surface.position)
    return dilate(texture.reshape(size, size, 3), surface.covered)


def test_texel_surface_of_a_square_is_the_texel_centres():
    surface = texel_surface(flat_square(), 8)
    assert surface.covered.all()
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    expected = torch.stack([(cols + 0.5) / 8, 1 - (rows + 0.5) / 8, torch.zeros(8, 8)], -1).reshape(-1, 3)
    assert torch.allclose(surface.position, expected[surface.index], atol=1e-6)
    assert torch.allclose(surface.normal, torch.tensor([0.0, 0.0, 1.0]).expand(64, 3))


def test_dilation_fills_empty_texels_with_the_nearest_island_texel():
    texture = torch.zeros(6, 6, 3)
    covered = torch.zeros(6, 6, dtype=torch.bool)
    covered[1:3, 1:3] = True
    covered[4, 5] = True
    texture[covered] = torch.rand(int(covered.sum()), 3, generator=torch.Generator().manual_seed(0))
    out = dilate(texture, covered)
    assert torch.equal(out[covered], texture[covered])
    island = covered.nonzero().float()
    for r in range(6):
        for c in range(6):
            distance = (island - torch.tensor([r, c])).norm(dim=1)
            nearest = island[distance == distance.min()].long()
            assert any(torch.equal(out[r, c], texture[i, j]) for i, j in nearest.tolist())
    assert torch.equal(dilate(texture, torch.zeros(6, 6, dtype=torch.bool)), texture)


def test_sampler_matches_the_renderer_when_magnified():
    square = flat_square().textured()
    square.vertices = square.vertices - torch.tensor([0.5, 0.5, 0.0])  # centred, facing +z
    texture = torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(1))
    cams = Cameras.orbit([0.0, -25.0], [0.0, 30.0], 1.5, 48)
    sampler = TextureSampler(square, cams, 8, WHITE, backend="torch")
    reference = rasterize_mesh(square, cams, WHITE, "torch", texture=texture, supersample=2).rgb
    assert torch.allclose(sampler.render(texture), reference, atol=1e-5)


def test_sampler_filters_a_minified_checkerboard_to_its_mean():
    square = flat_square().textured()
    square.vertices = square.vertices - torch.tensor([0.5, 0.5, 0.0])
    checker = ((torch.arange(256)[:, None] + torch.arange(256)[None]) % 2).float()[..., None].expand(256, 256, 3)
    cams = Cameras.orbit([0.0], [0.0], 3.0, 16)  # about 8 pixels across 256 texels
    sampler = TextureSampler(square, cams, 256, WHITE, backend="torch", supersample=1)
    image = sampler.render(checker.contiguous())
    inside = sampler.interior(margin=1)[0, 0]
    assert inside.sum() > 4
    assert torch.allclose(image[0, :, inside], torch.tensor(0.5), atol=0.02)


def test_gradients_reach_exactly_the_texels_the_views_use(box):
    texture = torch.full((64, 64, 3), 0.5, requires_grad=True)
    cams = Cameras.orbit([0.0], [0.0], 2.0, 32)
    sampler = TextureSampler(box.textured(), cams, 64, WHITE, backend="torch")
    sampler.render(texture).sum().backward()
    used = texture.grad.abs().sum(-1) > 0
    assert used.any()
    surface = texel_surface(box, 64)
    grown = torch.nn.functional.max_pool2d(surface.covered[None].float(), 3, 1, 1)[0] > 0  # bilinear reach
    assert not (used & ~grown).any()  # nothing outside the charts' texels and their bilinear neighbours
    front = (surface.normal[:, 2] > 0.9)  # texels on the face towards the camera
    assert used.reshape(-1)[surface.index[front]].float().mean() > 0.9


def test_bake_recovers_a_texture_from_its_renders(box):
    truth = painted(box, 64)
    cams = bake_cameras(2.0, 80, 49.1)
    mesh = box.textured(truth)
    out = rasterize_mesh(mesh, cams, WHITE, supersample=2)
    depth = rasterize_mesh(mesh, cams, WHITE).depth  # the bake's visibility buffer
    surface = texel_surface(box, 64)
    baked = bake(surface, 64, out.rgb, depth, cams, depth_tolerance=0.01)
    error = (baked.reshape(-1, 3)[surface.index] - smooth_colours(surface.position)).abs().amax(-1)
    assert error.mean() < 0.01 and torch.quantile(error, 0.95) < 0.03  # silhouette edges blend background
    assert (baked.reshape(-1, 3).sum(-1) == 0).sum() == 64 * 64 - len(surface.index)  # only chart texels


def test_bake_lends_seen_colours_to_texels_no_view_sees(box):
    surface = texel_surface(box, 64)
    cams = Cameras.orbit([0.0], [0.0], 2.0, 64)  # sees only the +z face
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    depth = rasterize_mesh(box.textured(), cams, WHITE).depth
    baked = bake(surface, 64, images, depth, cams, depth_tolerance=0.01).reshape(-1, 3)[surface.index]
    back = surface.normal[:, 2] < -0.9  # faces away from the only camera
    assert (baked[back].sum(-1) > 0).all()
    seen = {tuple(c) for c in baked[surface.normal[:, 2] > -0.5].tolist()}
    assert all(tuple(c) in seen for c in baked[back].tolist())


def test_refine_cameras_spread_evenly_from_a_random_offset():
    a = refine_cameras(8, 2.0, 64, 49.1, torch.Generator().manual_seed(5))
    b = refine_cameras(8, 2.0, 64, 49.1, torch.Generator().manual_seed(5))
    assert torch.equal(a.azimuth, b.azimuth)
    assert -180 <= float(a.azimuth[0]) < -135
    assert torch.allclose(a.azimuth.diff(), torch.tensor(45.0))
    assert torch.equal(a.elevation, torch.zeros(8))


@pytest.mark.parametrize("with_reference", [False, True])
def test_texture_refinement_moves_the_texture_towards_the_teacher(box, with_reference):
    truth = painted(box, 64)
    teacher = ReferenceTeacher(box.textured(truth), resolution=64, shading="albedo")  # targets: the texture itself
    cfg = dataclasses.replace(MeshConfig(), texture=64, refine_steps=25, refine_views=4, refine_resolution=64,
                              refine_lr=0.1)
    start = torch.full((64, 64, 3), 0.5)
    surface = texel_surface(box, 64)
    reference = None
    if with_reference:
        camera = Cameras.orbit([0.0], [0.0], 2.0, 64)
        rgb, mask = teacher.front_image(camera)
        reference = Reference(rgb, mask, camera)
    refined, log = refine_texture(box.textured(), start, surface.covered, teacher, cfg, 2.0, 49.1, WHITE,
                                  torch.Generator().manual_seed(0), reference)
    assert log.evaluations == 10  # DDIM(50) from t = 181: 181, 161, ..., 1
    assert log.loss_last < 0.2 * log.loss_first
    held_out = Cameras.orbit([-20.0, 10.0], [10.0, 100.0], 2.0, 64)
    truth_images = rasterize_mesh(box.textured(truth), held_out, WHITE, supersample=2).rgb
    error_before = (rasterize_mesh(box.textured(start), held_out, WHITE, supersample=2).rgb - truth_images)
    error_after = (rasterize_mesh(box.textured(refined), held_out, WHITE, supersample=2).rgb - truth_images)
    assert error_after.square().mean() < 0.3 * error_before.square().mean()
    assert torch.equal(refined, dilate(refined, surface.covered))  # padded across chart borders again


def test_texture_refinement_at_the_shipped_settings_removes_most_of_a_baked_error(box):
    """The shipped lr (0.2), steps (30), views (8) and t (181): a bake 20 % too dark with texel noise must lose
    at least 3/4 of its held-out error. Adam moves a logit by at most lr per step, 6 in 30 steps, and these
    colours need 0.3 to 1.0: reachable, so a shortfall means the lr does not settle within the step count."""
    shipped = MeshConfig()
    truth = painted(box, 64)
    teacher = ReferenceTeacher(box.textured(truth), resolution=64, shading="albedo")
    surface = texel_surface(box, 64)
    noise = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0))
    start = dilate((0.8 * truth + 0.1 * noise).clamp(0, 1), surface.covered)
    cfg = dataclasses.replace(shipped, texture=64, refine_resolution=64)
    assert (cfg.refine_lr, cfg.refine_steps, cfg.refine_views, cfg.refine_t) == (0.2, 30, 8, 181)
    refined, log = refine_texture(box.textured(), start, surface.covered, teacher, cfg, 2.0, 49.1, WHITE,
                                  torch.Generator().manual_seed(0))
    held_out = Cameras.orbit([-20.0, 10.0], [10.0, 100.0], 2.0, 64)
    truth_images = rasterize_mesh(box.textured(truth), held_out, WHITE, supersample=2).rgb

    def error(texture):
        return float((rasterize_mesh(box.textured(texture), held_out, WHITE, supersample=2).rgb - truth_images)
                     .square().mean())

    assert error(refined) < 0.25 * error(start)
    assert log.loss_last < 0.25 * log.loss_first
