import math

import pytest
import torch

from microdreamer.sir.cameras import Cameras, CameraSampler, orbit_camera, turntable


def test_orbit_camera_matches_spec_examples():
    c2w = orbit_camera(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 90.0]), torch.tensor(3.0))
    front = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 3], [0, 0, 0, 1]], dtype=torch.float32)
    side = torch.tensor([[0, 0, 1, 3], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    assert torch.allclose(c2w[0], front, atol=1e-6)
    assert torch.allclose(c2w[1], side, atol=1e-6)


def test_negative_elevation_is_above_and_camera_looks_at_origin():
    c2w = orbit_camera(torch.tensor([-30.0]), torch.tensor([40.0]), torch.tensor(2.0))[0]
    pos = c2w[:3, 3]
    assert pos[1] > 0 and math.isclose(float(pos.norm()), 2.0, rel_tol=1e-6)
    look = -c2w[:3, 2]  # OpenGL cameras look along -z
    assert torch.allclose(look, -pos / pos.norm(), atol=1e-6)
    assert torch.allclose(c2w[:3, :3].T @ c2w[:3, :3], torch.eye(3), atol=1e-6)


def test_viewmats_project_origin_to_image_centre():
    cams = Cameras.orbit([-10.0, 20.0], [30.0, 200.0], 2.0, (64, 48))
    p = cams.viewmats() @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert torch.allclose(p[:, 2], torch.tensor([2.0, 2.0]), atol=1e-5)  # +z in front (OpenCV)
    uv = (cams.intrinsics() @ p[:, :3, None])[..., 0]
    assert torch.allclose(uv[:, :2] / uv[:, 2:], torch.tensor([[32.0, 24.0]] * 2), atol=1e-4)


def test_sampler_spreads_azimuths_evenly_and_respects_the_elevation_range():
    sampler = CameraSampler(views=6, elevation=0.0, min_ver=-30, max_ver=30)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        cams = sampler.sample(g)
        az = cams.azimuth
        assert -180 <= az[0] < -120
        assert torch.equal(az.diff(), torch.full((5,), 60.0))
        assert bool((cams.elevation >= -30).all() and (cams.elevation < 30).all())


def test_sampler_clips_absolute_elevation_and_is_reproducible():
    sampler = CameraSampler(views=4, elevation=-70.0, min_ver=-30, max_ver=30)
    a = sampler.sample(torch.Generator().manual_seed(0))
    b = sampler.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a.c2w, b.c2w)
    assert bool((a.elevation >= -80).all())


@pytest.mark.parametrize("n", [8, 16])
def test_turntable(n):
    cams = turntable(n, 0.0, 2.0, 32, offset=-180.0)
    assert len(cams) == n and float(cams.azimuth[0]) == -180.0
    assert torch.allclose(cams.centers().norm(dim=-1), torch.full((n,), 2.0))


def test_cat_and_index():
    a, b = turntable(3, 0.0, 2.0, 32), Cameras.orbit([5.0], [7.0], 2.0, 32)
    both = Cameras.cat([a, b])
    assert len(both) == 4 and torch.equal(both[-1].c2w, b.c2w) and torch.equal(both[1].c2w, a[1].c2w)
