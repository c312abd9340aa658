"""Mesh rendering: analytic coverage and depth, brute-force ray casting, cpu vs torch, texturing and gradients,
per-pixel normals and the key light."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shared_assets import SHARED_ASSETS

from microdreamer.errors import UserError
from microdreamer.io.mesh import TexturedMesh, load_mesh
from microdreamer.render._build import ExtensionUnavailable, load_extension
from microdreamer.render.mesh import (
    KeyLight,
    rasterize_mesh,
    resolve_mesh_backend,
    sample_texture,
    shading_light,
)
from microdreamer.sir.cameras import Cameras
from tolerances import EPS32, assert_within, rounding_bound

SPOT = SHARED_ASSETS / "spot" / "spot.obj"
WHITE = torch.ones(3)


def _cpu_available() -> bool:
    try:
        load_extension("mesh")
    except ExtensionUnavailable:
        return False
    return True


BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_available(), reason="no C++ compiler"))]


def _square(half: float, z: float = 0.0, **kwargs) -> TexturedMesh:
    """Axis-aligned square facing +z with corners (±half, ±half, z), UVs spanning [0,1]²."""
    v = torch.tensor([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]])
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    return TexturedMesh(v, torch.tensor([[0, 1, 2], [0, 2, 3]]), uvs=uvs, **kwargs)


def _front(size: int, radius: float = 2.0) -> Cameras:
    return Cameras.orbit([0.0], [0.0], radius, size)


def _half_for_edge(cams: Cameras, edge_px: float, radius: float = 2.0) -> float:
    """World half-size of a square at the origin whose edges project to pixel coordinate ``edge_px``."""
    fx, _ = cams.focal
    return (cams.width / 2 - edge_px) / fx * radius


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_covers_exactly_the_expected_pixels_at_its_distance(backend):
    cams = _front(32)
    mesh = _square(_half_for_edge(cams, 8.0), vertex_colors=torch.full((4, 3), 0.25))
    out = rasterize_mesh(mesh, cams, WHITE, backend=backend)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[8:24, 8:24] = True
    assert torch.equal(out.extras["face_id"][0] >= 0, expected)
    assert torch.equal(out.alpha[0, 0], expected.float())
    assert torch.allclose(out.depth[0, 0][expected], torch.tensor(2.0), atol=1e-5)
    assert torch.all(out.depth[0, 0][~expected] == 0)
    assert torch.allclose(out.rgb[0, :, expected], torch.tensor(0.25), atol=1e-6)
    assert torch.all(out.rgb[0, :, ~expected] == 1)  # background


@pytest.mark.parametrize("backend", BACKENDS)
def test_supersampling_gives_fractional_coverage_at_half_pixel_edges(backend):
    cams = _front(32)
    mesh = _square(_half_for_edge(cams, 8.5), vertex_colors=torch.zeros(4, 3))
    out = rasterize_mesh(mesh, cams, WHITE, backend=backend, supersample=2)
    alpha = out.alpha[0, 0]
    assert torch.all(alpha[9:23, 9:23] == 1) and alpha[8, 15] == 0.5 and alpha[15, 23] == 0.5
    assert alpha[8, 8] == 0.25 and alpha[7, 15] == 0 and alpha[:, :8].sum() == 0
    assert torch.allclose(out.rgb[0, :, 8, 15], torch.tensor(0.5))  # half black, half white background
    assert out.extras["face_id"].shape == (1, 64, 64)  # extras stay on the sample grid


def _ray_cast(verts_cam: np.ndarray, faces: np.ndarray, cams: Cameras) -> tuple[np.ndarray, ...]:
    """Float64 Möller–Trumbore brute force: nearest hit per pixel (face, b0, b1, depth, ambiguous)."""
    fx, fy = cams.focal
    h, w = cams.height, cams.width
    ys, xs = np.mgrid[0:h, 0:w]
    d = np.stack([(xs + 0.5 - w / 2) / fx, (ys + 0.5 - h / 2) / fy, np.ones_like(xs, float)], -1)
    best = np.full((h, w), np.inf)
    face = np.full((h, w), -1)
    bary = np.zeros((h, w, 2))
    ambiguous = np.zeros((h, w), bool)
    for f, (i, j, k) in enumerate(faces):
        p0, p1, p2 = verts_cam[i], verts_cam[j], verts_cam[k]
        e1, e2 = p1 - p0, p2 - p0
        pvec = np.cross(d, e2)
        det = pvec @ e1
        tvec = -p0
        u = (pvec @ tvec) / det
        qvec = np.cross(tvec, e1)
        v = (d @ qvec) / det
        t = (qvec @ e2) / det
        inside = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > cams.near)
        ambiguous |= (np.minimum(np.minimum(np.abs(u), np.abs(v)), np.abs(1 - u - v)) < 1e-4) & (t > cams.near)
        nearer = inside & (t < best)
        best = np.where(nearer, t, best)
        face = np.where(nearer, f, face)
        bary = np.where(nearer[..., None], np.stack([1 - u - v, u], -1), bary)
    return face, bary, np.where(face >= 0, best, 0.0), ambiguous


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_brute_force_ray_casting_including_near_plane_crossings(backend):
    verts = torch.tensor([
        [-0.6, -0.5, 0.2], [0.6, -0.4, -0.3], [0.0, 0.6, 0.1],  # two triangles that cut through each other
        [-0.5, 0.4, -0.2], [0.5, 0.5, 0.4], [0.1, -0.6, 0.0],
        [-0.3, 0.0, 1.9], [0.3, -0.2, 0.5], [0.0, 0.3, 2.6],  # reaches behind the azimuth-0 camera
    ])
    faces = torch.arange(9).reshape(3, 3)
    mesh = TexturedMesh(verts, faces, vertex_colors=torch.rand(9, 3, generator=torch.Generator().manual_seed(3)))
    cams = Cameras.orbit([0.0, -25.0], [0.0, 70.0], 2.0, 40)
    out = rasterize_mesh(mesh, cams, WHITE, backend=backend)
    viewmats = cams.viewmats().double()
    for view in range(len(cams)):
        cam_verts = (verts.double() @ viewmats[view, :3, :3].T + viewmats[view, :3, 3]).numpy()
        face, bary, depth, ambiguous = _ray_cast(cam_verts, faces.numpy(), cams[view])
        got = out.extras["face_id"][view].numpy()
        clear = ~ambiguous
        assert (face >= 0).sum() > 100 and np.array_equal(got[clear], face[clear])
        hit = clear & (face >= 0)
        np.testing.assert_allclose(out.extras["bary"][view].numpy()[hit], bary[hit], atol=2e-5)
        np.testing.assert_allclose(out.depth[view, 0].numpy()[hit], depth[hit], rtol=1e-5)
    assert (out.extras["face_id"] == 2).any()  # the near-plane-crossing triangle is drawn


def test_cpu_and_torch_backends_agree_on_a_real_mesh():
    if not _cpu_available() or not SPOT.exists():
        pytest.skip("needs the C++ kernel and the spot asset")
    mesh = load_mesh(SPOT)
    cams = Cameras.orbit([0.0, -30.0, 20.0], [0.0, 100.0, 230.0], 2.0, 64)
    a = rasterize_mesh(mesh, cams, WHITE, backend="cpu")
    b = rasterize_mesh(mesh, cams, WHITE, backend="torch")
    same = a.extras["face_id"] == b.extras["face_id"]
    assert same.float().mean() >= 0.999 and (a.extras["face_id"] >= 0).float().mean() > 0.1
    assert (a.rgb - b.rgb).abs().mean() < 1e-4 and (a.rgb - b.rgb).abs().max() < 0.05
    assert torch.allclose(a.depth, b.depth, atol=1e-3)
    assert resolve_mesh_backend("auto", "cpu") == "cpu"
    # normals and lit colours agree where the faces do (barycentrics differ by float rounding only)
    assert torch.allclose(a.extras["normal"][same], b.extras["normal"][same], atol=1e-4)
    lit_a = rasterize_mesh(mesh, cams, WHITE, backend="cpu", light=KeyLight())
    lit_b = rasterize_mesh(mesh, cams, WHITE, backend="torch", light=KeyLight())
    assert (lit_a.rgb - lit_b.rgb).abs().mean() < 1e-4 and (lit_a.rgb - lit_b.rgb).abs().max() < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_perspective_correct_texture_lookup_on_a_tilted_square(backend):
    """A square turned 60° about y: its u must be read at the ray hit, not interpolated in screen space."""
    size, tilt = 48, math.radians(60)
    cams = _front(size)
    ramp = ((torch.arange(256) + 0.5) / 256).expand(4, 256)[..., None].expand(4, 256, 3).contiguous()  # value = u
    mesh = _square(0.5, texture=ramp)
    turn = torch.tensor([[math.cos(tilt), 0, math.sin(tilt)], [0, 1, 0], [-math.sin(tilt), 0, math.cos(tilt)]])
    mesh.vertices = mesh.vertices @ turn.T
    out = rasterize_mesh(mesh, cams, WHITE, backend=backend)
    # the point s along the square's x axis is at camera x = s cos, depth 2 + s sin; the ray x/z = r hits
    # s = 2r / (cos − r sin), and u = s + 1/2
    fx, _ = cams.focal
    r = (torch.arange(size) + 0.5 - size / 2) / fx
    expected = 2 * r / (math.cos(tilt) - r * math.sin(tilt)) + 0.5
    row = size // 2
    inside = (out.extras["face_id"][0, row] >= 0) & (expected > 0.01) & (expected < 0.99)
    assert inside.sum() > 10
    assert torch.allclose(out.rgb[0, 0, row][inside], expected[inside], atol=2e-3)
    screen_linear = torch.linspace(float(expected[inside][0]), float(expected[inside][-1]), int(inside.sum()))
    assert (screen_linear - expected[inside]).abs().max() > 0.02  # the check can tell the difference


def test_texture_gradient_matches_finite_differences():
    cams = _front(16)
    g = torch.Generator().manual_seed(0)
    mesh = _square(0.5, texture=torch.zeros(4, 4, 3))
    texture = torch.rand(4, 4, 3, generator=g, dtype=torch.float32).requires_grad_()
    weights = torch.rand(1, 3, 16, 16, generator=g)
    loss = (rasterize_mesh(mesh, cams, WHITE, texture=texture).rgb * weights).sum()
    loss.backward()
    assert texture.grad.abs().sum() > 0
    with torch.no_grad():
        for index in [(0, 0, 0), (1, 2, 1), (3, 3, 2), (2, 1, 0)]:
            bumped = texture.detach().clone()
            bumped[index] += 0.1
            up = (rasterize_mesh(mesh, cams, WHITE, texture=bumped).rgb * weights).sum()
            assert float((up - loss) / 0.1) == pytest.approx(float(texture.grad[index]), rel=1e-3, abs=1e-3)
    # the override replaces mesh.texture entirely
    reference = rasterize_mesh(_square(0.5, texture=texture.detach()), cams, WHITE).rgb
    assert torch.allclose(rasterize_mesh(mesh, cams, WHITE, texture=texture.detach()).rgb, reference)


def test_vertex_colours_interpolate_with_the_barycentrics():
    verts = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.4, 0.2], [0.0, 0.5, -0.3]])
    mesh = TexturedMesh(verts, torch.tensor([[0, 1, 2]]), vertex_colors=torch.eye(3))
    out = rasterize_mesh(mesh, _front(24), WHITE, backend="torch")
    covered = out.extras["face_id"][0] >= 0
    b = out.extras["bary"][0][covered]
    expected = torch.cat([b, 1 - b.sum(-1, keepdim=True)], -1)
    assert covered.sum() > 50 and torch.allclose(out.rgb[0].permute(1, 2, 0)[covered], expected, atol=1e-6)


def test_minified_checkerboard_is_filtered_to_its_mean():
    board = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()[..., None].expand(64, 64, 3)
    cams = _front(16)
    edge = 0.37  # the square spans 15.26 pixels: about 4.2 texels per pixel, not aligned with the texel grid
    mesh = _square(_half_for_edge(cams, edge), texture=board.contiguous())
    rgb = rasterize_mesh(mesh, cams, WHITE).rgb[0]
    assert torch.allclose(rgb[:, 1:-1, 1:-1], torch.tensor(0.5), atol=1e-4)
    # the same pixel centres looked up without mip levels alias badly
    u = (torch.arange(1, 15) + 0.5 - edge) / (16 - 2 * edge)
    uv = torch.stack(torch.meshgrid(u, 1 - u, indexing="xy"), -1)
    assert sample_texture(board, uv).std() > 0.1


def test_sample_texture_levels_match_box_filtered_references():
    g = torch.Generator().manual_seed(2)
    texture = torch.rand(32, 32, 3, generator=g)
    uv = torch.rand(50, 2, generator=g) * 0.8 + 0.1
    bilinear = sample_texture(texture, uv)
    assert torch.allclose(sample_texture(texture, uv, torch.ones(50)), bilinear)
    level1 = F.avg_pool2d(texture.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)
    level2 = F.avg_pool2d(texture.permute(2, 0, 1)[None], 4)[0].permute(1, 2, 0)
    assert torch.allclose(sample_texture(texture, uv, torch.full((50,), 2.0)), sample_texture(level1, uv), atol=1e-6)
    blend = 0.5 * sample_texture(level1, uv) + 0.5 * sample_texture(level2, uv)
    assert torch.allclose(sample_texture(texture, uv, torch.full((50,), 2**1.5)), blend, atol=1e-6)
    # V runs upwards: uv (0, 1) is the top-left texel of the image
    assert torch.allclose(sample_texture(texture, torch.tensor([[0.0, 1.0]])), texture[0, 0])
    # uv + 1 in [1, 2) rounds by ≤ EPS32/2, 16·EPS32 of a texel at 32 texels per unit, and neighbouring
    # texels differ by ≤ 1; both bilinear lookups round their 4-term sums
    shifted = 16 * EPS32 + 2 * rounding_bound(1.0, n=4, ops=2)
    assert_within(sample_texture(texture, uv + 1, wrap=True), bilinear, shifted, "wrapped lookup")


def test_backend_names():
    with pytest.raises(UserError, match="unknown mesh backend"):
        resolve_mesh_backend("opengl", "cpu")
    assert resolve_mesh_backend("torch", "cpu") == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvdiffrast_agrees_with_cpu():
    pytest.importorskip("nvdiffrast")
    if not SPOT.exists() or not _cpu_available():
        pytest.skip("needs the spot asset and the C++ kernel")
    mesh = load_mesh(SPOT)
    cams = Cameras.orbit([0.0, -30.0], [0.0, 120.0], 2.0, 128)
    a = rasterize_mesh(mesh, cams, WHITE, backend="cpu")
    b = rasterize_mesh(mesh.to("cuda"), cams, WHITE.cuda(), backend="nvdiffrast")
    assert (a.extras["face_id"] == b.extras["face_id"].cpu()).float().mean() >= 0.999
    assert (a.rgb - b.rgb.cpu()).abs().mean() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_view_that_sees_nothing_is_background(backend):
    mesh = _square(0.5, z=5.0, texture=torch.rand(8, 8, 3))  # behind the azimuth-0 camera at z = 2
    out = rasterize_mesh(mesh, _front(16), torch.tensor([0.2, 0.4, 0.6]), backend=backend, supersample=2)
    assert torch.all(out.alpha == 0) and torch.all(out.depth == 0)
    assert torch.allclose(out.rgb, torch.tensor([0.2, 0.4, 0.6])[None, :, None, None].expand(1, 3, 16, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_normals_face_the_camera_and_the_key_light_is_fixed_to_the_object(backend):
    """A white square in the plane z = 0, normal +z, seen from the front and from behind."""
    mesh = _square(0.5)
    cams = Cameras.orbit([0.0, -30.0, 0.0], [0.0, 40.0, 180.0], 2.0, 16)
    out = rasterize_mesh(mesh, cams, WHITE, backend=backend, light=KeyLight())
    normal, covered = out.extras["normal"], out.extras["face_id"] >= 0
    assert covered[2].sum() > 20 and torch.all(normal[~covered] == 0)
    assert torch.allclose(normal[:2][covered[:2]], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(normal[2][covered[2]], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)  # its back
    light = KeyLight()
    front = light.ambient + light.key / math.sqrt(3)  # n · l with l = (−1, 1, 1)/√3
    inside = out.alpha[:, 0] == 1
    assert torch.allclose(out.rgb[:2].permute(0, 2, 3, 1)[inside[:2]], torch.tensor(front), atol=1e-6)
    assert torch.allclose(out.rgb[2].permute(1, 2, 0)[inside[2]], torch.tensor(light.ambient), atol=1e-6)
    assert shading_light("albedo") is None and shading_light("lit") == light
    with pytest.raises(UserError, match="unknown shading 'flat'"):
        shading_light("flat")


def test_smooth_normals_follow_a_sphere_and_keep_a_cube_s_edges():
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    mesh = TexturedMesh(torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces))
    cams = Cameras.orbit([0.0, -40.0], [0.0, 130.0], 2.0, 48)
    out = rasterize_mesh(mesh, cams, WHITE)
    covered = out.extras["face_id"] >= 0
    fx, _ = cams.focal
    ys, xs = torch.meshgrid(torch.arange(48) + 0.5 - 24, torch.arange(48) + 0.5 - 24, indexing="ij")
    ray_cam = torch.stack([xs / fx, ys / fx, torch.ones_like(xs)], -1)  # OpenCV camera space, depth 1
    viewmats = cams.viewmats()
    for view in range(2):
        rot, t = viewmats[view, :3, :3], viewmats[view, :3, 3]
        hit = (ray_cam * out.depth[view, 0][..., None] - t) @ rot  # world points
        radial = torch.nn.functional.normalize(hit[covered[view]], dim=-1)
        cos = (out.extras["normal"][view][covered[view]] * radial).sum(-1)
        # the icosphere's faces span about 7.5°: flat normals would be off by up to half that, the
        # interpolated ones by much less
        assert float(cos.mean()) > 0.9999 and float(cos.min()) > 0.999
    cube = trimesh.creation.box(extents=(0.6, 0.6, 0.6))  # 90° edges: no averaging across them
    mesh = TexturedMesh(torch.tensor(cube.vertices, dtype=torch.float32), torch.tensor(cube.faces))
    out = rasterize_mesh(mesh, Cameras.orbit([-35.0], [45.0], 2.0, 32), WHITE)
    normals = out.extras["normal"][0][out.extras["face_id"][0] >= 0]
    axis_aligned = (normals.abs().amax(-1) - 1).abs() < 1e-6
    assert bool(axis_aligned.all()) and len({tuple(n.round().tolist()) for n in normals}) == 3
