"""The LGM reconstructor: published state-dict layout, input tensor, splatter images → our Gaussians, loading."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from microdreamer.config import GaussianConfig
from microdreamer.errors import UserError
from microdreamer.io.ply import read_gaussian_ply, write_gaussian_ply
from microdreamer.reconstructors.lgm import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LGMReconstructor,
    input_cameras,
    lgm_frame,
    lgm_to_world,
    splatter_to_gaussians,
)
from microdreamer.reconstructors.lgm_unet import LGMConfig, LGMNetwork, MVAttention, ResnetBlock
from microdreamer.representations.densify import quaternion_to_matrix
from microdreamer.representations.gaussians import SH_C0, Gaussians
from microdreamer.representations.similarity import Similarity, matrix_to_quaternion, quaternion_multiply
from microdreamer.sir.cameras import Cameras, orbit_camera
from tiny_models import TINY_LGM, write_lgm

TINY = LGMConfig(**TINY_LGM)
F32_EPS = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------------------
# The published layout, written from geco spec §2.7 independently of the model code.

DOWN = (64, 128, 256, 512, 1024, 1024)
DOWN_ATTENTION = (False, False, False, True, True, True)
UP = (1024, 1024, 512, 256, 128)
UP_ATTENTION = (True, True, True, False, False)

#: parameters per key group, as listed in the spec
SPEC_GROUPS = {
    "unet.conv_in": 64 * 9 * 3 * 3 + 64,
    **{f"unet.down_blocks.{i}": n for i, n in
       enumerate((185_152, 673_408, 2_690_304, 12_854_784, 51_399_680, 46_155_776))},
    "unet.mid_block.nets": 37_761_024,
    "unet.mid_block.attns": 4_197_376,
    **{f"unet.up_blocks.{i}": n for i, n in
       enumerate((113_284_096, 108_040_192, 29_641_728, 6_626_560, 1_510_912))},
    "unet.norm_out": 2 * 128,
    "unet.conv_out": 14 * 128 * 3 * 3 + 14,
    "conv": 14 * 14 + 14,
}


def _res(p: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    keys = {
        f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,),
        f"{p}.conv1.weight": (cout, cin, 3, 3), f"{p}.conv1.bias": (cout,),
        f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
        f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,),
    }
    if cin != cout:
        keys |= {f"{p}.shortcut.weight": (cout, cin, 1, 1), f"{p}.shortcut.bias": (cout,)}
    return keys


def _attn(p: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.attn.qkv.weight": (3 * c, c),
            f"{p}.attn.proj.weight": (c, c), f"{p}.attn.proj.bias": (c,)}


def _conv3(p: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}.weight": (c, c, 3, 3), f"{p}.bias": (c,)}


def expected_big_layout() -> dict[str, tuple[int, ...]]:
    keys = {"unet.conv_in.weight": (64, 9, 3, 3), "unet.conv_in.bias": (64,)}
    cin = DOWN[0]
    for i, (c, attention) in enumerate(zip(DOWN, DOWN_ATTENTION)):
        for j in range(2):
            keys |= _res(f"unet.down_blocks.{i}.nets.{j}", cin if j == 0 else c, c)
            if attention:
                keys |= _attn(f"unet.down_blocks.{i}.attns.{j}", c)
        if i < len(DOWN) - 1:
            keys |= _conv3(f"unet.down_blocks.{i}.downsample", c)
        cin = c
    keys |= _res("unet.mid_block.nets.0", 1024, 1024) | _res("unet.mid_block.nets.1", 1024, 1024)
    keys |= _attn("unet.mid_block.attns.0", 1024)
    cin = DOWN[-1]
    for i, (c, attention) in enumerate(zip(UP, UP_ATTENTION)):
        for j in range(3):
            # layers 0 and 1 take a skip of the block's width, layer 2 the downsampled map of level -2-i
            skip = c if j < 2 else DOWN[max(-2 - i, -len(DOWN))]
            keys |= _res(f"unet.up_blocks.{i}.nets.{j}", (cin if j == 0 else c) + skip, c)
            if attention:
                keys |= _attn(f"unet.up_blocks.{i}.attns.{j}", c)
        if i < len(UP) - 1:
            keys |= _conv3(f"unet.up_blocks.{i}.upsample", c)
        cin = c
    keys |= {"unet.norm_out.weight": (128,), "unet.norm_out.bias": (128,),
             "unet.conv_out.weight": (14, 128, 3, 3), "unet.conv_out.bias": (14,),
             "conv.weight": (14, 14, 1, 1), "conv.bias": (14,)}
    return keys


def _meta_state(config: LGMConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        network = LGMNetwork(config)
    return {k: v.shape for k, v in network.state_dict().items()}


def test_expected_layout_reproduces_the_spec_counts():
    """The table above agrees with every number of the spec before it judges the model."""
    expected = expected_big_layout()
    assert len(expected) == 376
    assert sum(math.prod(s) for s in expected.values()) == 415_042_848
    for group, count in SPEC_GROUPS.items():
        assert sum(math.prod(s) for k, s in expected.items() if k.startswith(group + ".")) == count, group


def test_big_network_has_every_published_name_and_shape():
    state = _meta_state(LGMConfig())
    expected = expected_big_layout()
    assert sorted(set(expected) - set(state)) == [] and sorted(set(state) - set(expected)) == []
    assert {k: tuple(v) for k, v in state.items()} == expected
    assert len(state) == 376 and sum(math.prod(s) for s in state.values()) == 415_042_848
    assert LGMConfig().splat_size == 128


def test_small_network_size_matches_the_spec():
    state = _meta_state(LGMConfig.small())
    assert len(state) == 344 and sum(math.prod(s) for s in state.values()) == 412_958_240
    assert LGMConfig.small().splat_size == 64


def test_config_rejects_shapes_the_network_cannot_take():
    with pytest.raises(ValueError, match="one attention flag"):
        LGMConfig(up_attention=(True,))
    with pytest.raises(ValueError, match="multiples of 32"):
        LGMConfig(down_channels=(48, 128, 256, 512, 1024, 1024))
    with pytest.raises(ValueError, match="halvings"):
        LGMConfig(input_size=100)


# ---------------------------------------------------------------------------------------------------------
# Blocks

def test_mv_attention_attends_jointly_over_the_four_views(one_thread):
    torch.manual_seed(0)
    layer = MVAttention(32).eval()
    x = torch.randn(8, 32, 2, 3)  # two objects × four views
    out = layer(x)
    # by hand: GroupNorm, tokens of the 4 views in view-row-column order, 16 heads of 2 channels
    h = F.group_norm(x, 32, layer.norm.weight, layer.norm.bias, eps=1e-5)
    tokens = h.reshape(2, 4, 32, 6).permute(0, 1, 3, 2).reshape(2, 24, 32)
    q, k, v = (tokens @ layer.attn.qkv.weight.T).split(32, dim=-1)
    heads = [slice(2 * i, 2 * i + 2) for i in range(16)]
    mixed = torch.cat([torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(2), -1) @ v[..., s]
                       for s in heads], -1)
    proj = mixed @ layer.attn.proj.weight.T + layer.attn.proj.bias
    expected = (proj.reshape(2, 4, 6, 32).permute(0, 1, 3, 2).reshape(8, 32, 2, 3) + x) * math.sqrt(0.5)
    assert torch.allclose(out, expected, atol=1e-5)
    # a change in view 3 of object 0 reaches view 0 of object 0, not object 1
    y = x.clone()
    y[3] = torch.randn(32, 2, 3)
    changed = layer(y) - out
    assert changed[0].abs().max() > 1e-3 and changed[4:].abs().max() < 1e-6


def test_resnet_block_scales_the_residual_sum():
    torch.manual_seed(0)
    block = ResnetBlock(32, 64).eval()
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.fill_(0.25)
    expected = (F.conv2d(x, block.shortcut.weight, block.shortcut.bias) + 0.25) * math.sqrt(0.5)
    assert torch.allclose(block(x), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Input tensor (teachers spec §5)

def _hand_ray(azimuth: float, col: int, row: int, size: int = 256, fovy: float = 49.1, r: float = 1.5) -> list[float]:
    """Plücker (o×d, d) of LGM's elevation-0 camera at ``azimuth`` through pixel (col, row), by hand."""
    a = math.radians(azimuth)
    f = size / 2 / math.tan(math.radians(fovy) / 2)
    x, y = (col + 0.5 - size / 2) / f, -(row + 0.5 - size / 2) / f
    right, up, back = (math.cos(a), 0.0, -math.sin(a)), (0.0, 1.0, 0.0), (math.sin(a), 0.0, math.cos(a))
    d = [right[i] * x + up[i] * y - back[i] for i in range(3)]
    norm = math.sqrt(sum(c * c for c in d))
    d = [c / norm for c in d]
    o = [r * c for c in back]
    return [o[1] * d[2] - o[2] * d[1], o[2] * d[0] - o[0] * d[2], o[0] * d[1] - o[1] * d[0], *d]


@pytest.fixture(scope="module")
def big_meta() -> LGMReconstructor:
    with torch.device("meta"):
        return LGMReconstructor(LGMNetwork(LGMConfig()))


def test_input_tensor_golden(big_meta):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 256, 256, generator=g)
    images[:, :, :8] = 1.0  # a white band
    for v in range(4):
        images[v, :, 200, 100] = torch.tensor([0.1 * v, 0.5, 0.9])  # marks the view order
    x = big_meta.prepare(images)
    assert x.shape == (1, 4, 9, 256, 256) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    white = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x[0, :, :3, 3, 17], torch.tensor(white).expand(4, 3), atol=4 * F32_EPS)
    assert abs(white[0] - 2.2489083) < 1e-6
    for v in range(4):
        marked = (torch.tensor([0.1 * v, 0.5, 0.9]) - mean) / std
        assert torch.allclose(x[0, v, :3, 200, 100], marked, atol=4 * F32_EPS * 3)
    assert torch.allclose(x[0, :, :3], (images - mean[:, None, None]) / std[:, None, None], atol=1e-5)
    for v, azimuth in enumerate((0.0, 90.0, 180.0, 270.0)):
        for col, row in ((0, 0), (255, 0), (0, 255), (128, 37), (127, 128)):
            expected = torch.tensor(_hand_ray(azimuth, col, row))
            # orbit matrices are float32 (relative error ~1e-7 on values up to 1.5)
            assert torch.allclose(x[0, v, 3:, row, col], expected, atol=1e-6), (v, col, row)


def test_rays_are_unit_directions_and_plucker_moments(big_meta):
    rays = big_meta.prepare(torch.ones(4, 3, 256, 256))[0, :, 3:]
    moment, d = rays[:, :3], rays[:, 3:]
    assert torch.allclose(d.norm(dim=1), torch.ones(4, 256, 256), atol=1e-6)
    assert (moment * d).sum(1).abs().max() < 1e-6  # o×d ⊥ d
    # |o×d| is the ray's distance from the origin: for the four centre pixels, half a pixel off the
    # axis in x and y, r·t/√(1+t²) with t = √½ / f
    t = math.sqrt(0.5) / (128 / math.tan(math.radians(49.1) / 2))
    centre = moment[:, :, 127:129, 127:129].norm(dim=1)
    assert torch.allclose(centre, torch.full_like(centre, 1.5 * t / math.sqrt(1 + t * t)), atol=1e-7)


def test_views_of_another_size_are_resized_bilinearly(big_meta):
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x = big_meta.prepare(images)
    up = F.interpolate(images, size=(256, 256), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(x[0, :, :3], (up - mean) / std, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[4, 3, H, W\]"):
        big_meta.prepare(torch.rand(3, 3, 64, 64))


@pytest.mark.parametrize("elevation", [0.0, -30.0, 20.0])
def test_input_cameras_put_view_0_at_the_fixed_pose(elevation):
    c2w = input_cameras(LGMConfig(), elevation)
    front = torch.eye(4, dtype=torch.float64)
    front[2, 3] = 1.5
    assert torch.allclose(c2w[0], front, atol=1e-6)
    orbit = orbit_camera([elevation] * 4, [0.0, 90.0, 180.0, 270.0], 1.5).double()
    # one rigid motion for all views: relative poses are those of the orbit
    for v in range(1, 4):
        assert torch.allclose(torch.linalg.inv(c2w[0]) @ c2w[v], torch.linalg.inv(orbit[0]) @ orbit[v], atol=1e-6)


def _generator_cameras(resolution: int = 256) -> Cameras:
    """Four of Zero123++'s fixed views: 30° above / 20° below by turns, radius 4, fovy 30."""
    from microdreamer.generators.zero123plus import zero123plus_cameras

    return zero123plus_cameras(radius=4.0, fovy=30.0, resolution=resolution)[[0, 1, 3, 4]]


def test_lgm_frame_of_any_four_cameras_is_one_similarity():
    cams = _generator_cameras()
    lgm, to_world = lgm_frame(cams.c2w, 1.5)
    front = torch.eye(4, dtype=torch.float64)
    front[2, 3] = 1.5
    assert torch.allclose(lgm[0], front, atol=1e-6)
    assert torch.allclose(lgm[:, :3, 3].norm(dim=-1), torch.full((4,), 1.5, dtype=torch.float64), atol=1e-6)
    world = cams.c2w.double()
    for v in range(1, 4):  # relative rotations kept: one rigid motion (and a scale) for all views
        assert torch.allclose(lgm[0, :3, :3].T @ lgm[v, :3, :3], world[0, :3, :3].T @ world[v, :3, :3], atol=1e-6)
    assert to_world.scale == pytest.approx(4.0 / 1.5)
    assert torch.allclose(to_world.points(lgm[:, :3, 3].float()), cams.c2w[:, :3, 3], atol=1e-5)
    assert torch.allclose(to_world.rotation @ lgm[:, :3, :3].float(), cams.c2w[:, :3, :3], atol=1e-5)
    moved = cams.c2w.clone()
    moved[2, :3, 3] *= 1.1
    with pytest.raises(ValueError, match="one distance from the origin"):
        lgm_frame(moved)


def test_views_at_other_cameras_get_their_true_rays(big_meta):
    """View 0 is normalised to LGM's front pose; its rays are then those of that pose at the views' fovy."""
    x = big_meta.prepare(torch.ones(4, 3, 256, 256), _generator_cameras())
    for col, row in ((0, 0), (255, 0), (128, 37), (127, 128)):
        expected = torch.tensor(_hand_ray(0.0, col, row, fovy=30.0))
        assert torch.allclose(x[0, 0, 3:, row, col], expected, atol=1e-6), (col, row)
    assert not torch.allclose(x[0, 1, 3:], big_meta.prepare(torch.ones(4, 3, 256, 256))[0, 1, 3:], atol=1e-2)


# ---------------------------------------------------------------------------------------------------------
# Splatter images → Gaussians

def _splats(values: dict[tuple[int, int, int], list[float]], size: int = 2, background: float = -20.0) -> torch.Tensor:
    """Raw splatter images [4, 14, size, size]; (view, row, col) → 14 raw values, elsewhere opacity ``background``."""
    splats = torch.zeros(4, 14, size, size)
    splats[:, 3] = background
    splats[:, 7] = 1.0
    for (v, row, col), raw in values.items():
        splats[v, :, row, col] = torch.tensor(raw)
    return splats


def test_splatter_activations_follow_lgm():
    raw_a = [0.3, -0.2, 2.5, 0.7, -1.0, 0.0, 3.0, 2.0, 0.0, 0.0, 0.0, -0.5, 0.0, 1.5]
    raw_b = [-4.0, 0.9, -0.1, 1.2, -200.0, 0.5, 30.0, 0.0, 3.0, 4.0, 0.0, 2.0, -2.0, 0.1]
    g = splatter_to_gaussians(_splats({(1, 0, 1): raw_a, (3, 1, 0): raw_b}))
    assert g.num_points == 2  # the others are below the 0.005 opacity LGM saves
    for i, raw in enumerate((raw_a, raw_b)):  # order: view, row, column
        assert g.means[i].tolist() == pytest.approx([max(-1.0, min(1.0, r)) for r in raw[0:3]])
        assert torch.sigmoid(g.opacity[i]).item() == pytest.approx(1 / (1 + math.exp(-raw[3])), rel=1e-6)
        for k in range(3):
            expected = math.log(0.1) + (raw[4 + k] if raw[4 + k] < -50 else math.log(math.log1p(math.exp(raw[4 + k]))))
            assert g.scale[i, k].item() == pytest.approx(expected, rel=1e-6)
        rgb = [0.5 * math.tanh(r) + 0.5 for r in raw[11:14]]
        assert (SH_C0 * g.f_dc[i] + 0.5).tolist() == pytest.approx(rgb, abs=1e-6)
    assert torch.isfinite(g.scale).all()
    # each quaternion normalised over its own four values, whatever the others' magnitudes
    assert g.rotation.tolist() == [pytest.approx([1.0, 0, 0, 0]), pytest.approx([0, 0.6, 0.8, 0])]
    assert g.f_rest.shape == (2, 0, 3)
    # all 4·2·2 Gaussians without the opacity cut, ordered view, row, column
    numbered = _splats({})
    numbered[:, 0] = torch.arange(16.0).reshape(4, 2, 2) / 16
    assert splatter_to_gaussians(numbered, min_opacity=0.0).means[:, 0].tolist() == [i / 16 for i in range(16)]


@pytest.mark.parametrize("elevation", [0.0, -30.0])
def test_lgm_frame_maps_lgm_cameras_onto_ours(elevation):
    to_world = lgm_to_world(LGMConfig(), elevation, radius=2.0)
    if elevation == 0.0:
        assert to_world.scale == pytest.approx(4 / 3)
        assert torch.allclose(to_world.rotation, torch.eye(3)) and to_world.translation.abs().max() < 1e-6
    lgm = input_cameras(LGMConfig(), elevation).float()
    ours = Cameras.orbit([elevation] * 4, [0.0, 90.0, 180.0, 270.0], 2.0, 64).c2w
    assert torch.allclose(to_world.points(lgm[:, :3, 3]), ours[:, :3, 3], atol=1e-5)
    assert torch.allclose(to_world.rotation @ lgm[:, :3, :3], ours[:, :3, :3], atol=1e-5)


def test_similarity_composes_rotations_and_scales_covariances():
    g = torch.Generator().manual_seed(3)
    rotations = [torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0] for _ in range(4)]
    rotations = [r * torch.linalg.det(r) for r in rotations]  # proper
    rotations += [torch.diag(torch.tensor(d, dtype=torch.float64)) for d in ((1, -1, -1), (-1, 1, -1), (-1, -1, 1))]
    for r in rotations:  # every branch of the conversion, including the 180° turns
        assert torch.allclose(quaternion_to_matrix(matrix_to_quaternion(r)[None])[0], r, atol=1e-12)
    splats = _splats({(0, 0, 0): [0.1, 0.2, 0.3, 0.0, -1.0, 0.0, 1.0, 0.3, -0.4, 0.5, 0.2, 0.0, 0.0, 0.0]})
    gaussians = splatter_to_gaussians(splats)
    sim = Similarity(1.7, rotations[0].float(), torch.tensor([0.5, -1.0, 2.0]))
    moved = sim.apply(gaussians)
    assert torch.allclose(moved.means, 1.7 * gaussians.means @ rotations[0].float().T + sim.translation, atol=1e-6)

    def covariance(p):
        rot = quaternion_to_matrix(p.rotation.double())
        return rot @ torch.diag_embed(p.scale.double().exp() ** 2) @ rot.transpose(1, 2)

    r = rotations[0]
    assert torch.allclose(covariance(moved), 1.7**2 * r @ covariance(gaussians) @ r.T, atol=1e-7)
    assert torch.equal(moved.opacity, gaussians.opacity) and torch.equal(moved.f_dc, gaussians.f_dc)
    q = quaternion_multiply(matrix_to_quaternion(r), gaussians.rotation.double())
    assert torch.allclose(q.norm(dim=-1), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="proper rotation"):
        Similarity(1.0, -torch.eye(3), torch.zeros(3))


def _project(c2w: torch.Tensor, point: list[float], size: int, fovy: float = 49.1) -> tuple[float, float]:
    """Pixel-index coordinates (column, row) of a world point seen by an OpenGL camera, by hand."""
    rel = [point[i] - float(c2w[i, 3]) for i in range(3)]
    x, y, z = ([sum(rel[i] * float(c2w[i, k]) for i in range(3)) for k in range(3)])
    f = size / 2 / math.tan(math.radians(fovy) / 2)
    return size / 2 + f * x / -z - 0.5, size / 2 - f * y / -z - 0.5


def _centroid(alpha: torch.Tensor) -> tuple[float, float]:
    rows, cols = torch.meshgrid(torch.arange(alpha.shape[0]), torch.arange(alpha.shape[1]), indexing="ij")
    total = alpha.sum()
    return float((alpha * cols).sum() / total), float((alpha * rows).sum() / total)


@pytest.mark.parametrize("elevation", [0.0, -30.0])
def test_reconstructed_gaussian_renders_where_lgm_saw_it(elevation, tmp_path):
    """A Gaussian at a known point of LGM's frame lands at the transformed point, renders (after a PLY
    round trip) at the pixel LGM's camera projects it to, and our cameras at radius 2 see the same
    images as LGM's cameras at radius 1.5."""
    point = [0.3, -0.2, 0.1]
    scale_raw = math.log(math.expm1(0.25))  # 0.1·softplus = 0.025
    raw = [*point, 0.0, scale_raw, scale_raw, scale_raw, 1.0, 0.0, 0.0, 0.0, 20.0, 20.0, 20.0]
    lgm_frame = splatter_to_gaussians(_splats({(2, 1, 0): raw}))
    to_world = lgm_to_world(LGMConfig(), elevation, radius=2.0)
    world = to_world.apply(lgm_frame)
    assert torch.allclose(world.means[0], to_world.points(torch.tensor(point)), atol=1e-6)
    if elevation == 0.0:
        assert world.means[0].tolist() == pytest.approx([4 / 3 * c for c in point], abs=1e-6)
        assert world.scale[0].exp().tolist() == pytest.approx([0.025 * 4 / 3] * 3, rel=1e-5)
    write_gaussian_ply(tmp_path / "lgm.ply", world)
    cfg = dataclasses.replace(GaussianConfig(), backend="torch")
    ours = Gaussians(cfg, "cpu", torch.Generator().manual_seed(0), init=read_gaussian_ply(tmp_path / "lgm.ply"))
    size, background = 64, torch.zeros(3)
    cams = Cameras.orbit([elevation] * 4, [0.0, 90.0, 180.0, 270.0], 2.0, size)
    with torch.no_grad():
        seen = ours.render(cams, background)
    lgm_c2w = input_cameras(LGMConfig(), elevation).float()
    lgm_cams = dataclasses.replace(cams, c2w=lgm_c2w)
    with torch.no_grad():
        lgm_seen = Gaussians(cfg, "cpu", torch.Generator().manual_seed(0), init=lgm_frame).render(lgm_cams, background)
    for v in range(4):
        col, row = _project(lgm_c2w[v], point, size)
        got = _centroid(seen.alpha[v, 0])
        # the splat is symmetric about the projected mean; its truncation at alpha 1/255 (3.1 σ) moves
        # the centroid by far less than 0.05 px
        assert got == pytest.approx((col, row), abs=0.05), (v, got, (col, row))
    assert (seen.alpha - lgm_seen.alpha).abs().max() < 1e-5
    assert (seen.rgb - lgm_seen.rgb).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Checkpoints in the published layout

@pytest.fixture(scope="module")
def tiny_network() -> LGMNetwork:
    torch.manual_seed(0)
    return LGMNetwork(TINY).eval()


@pytest.fixture(scope="module")
def tiny_folder(tiny_network, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lgm")
    write_lgm(folder, tiny_network)
    return folder


def test_tiny_checkpoint_loads_strictly_and_predicts_splatter_images(tiny_network, tiny_folder, one_thread):
    model = LGMReconstructor.from_pretrained(tiny_folder, config=TINY, allow_download=False)
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")  # fp16 file, fp32 on the CPU
    reference = {k: v.half().float() for k, v in tiny_network.state_dict().items()}
    loaded = model.network.state_dict()
    assert set(loaded) == set(reference) and all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert all(not p.requires_grad for p in model.network.parameters())

    images = torch.rand(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = model.prepare(images)
    splats = model.splatter_images(inputs)
    assert splats.shape == (2, 4, 14, TINY.splat_size, TINY.splat_size) == (2, 4, 14, 16, 16)
    rounded = LGMNetwork(TINY).eval()
    rounded.load_state_dict(reference)
    with torch.no_grad():
        assert torch.equal(splats, rounded(inputs))
    # each object on its own gives the same splatter images as in the batch
    assert torch.allclose(model.splatter_images(inputs[1:]), splats[1:], atol=1e-5)

    objects = model.reconstruct(images, min_opacity=0.0)
    assert len(objects) == 2 and objects[0].num_points == 4 * 16 * 16
    direct = lgm_to_world(TINY).apply(splatter_to_gaussians(splats[1], min_opacity=0.0))
    assert torch.equal(objects[1].means, direct.means) and torch.equal(objects[1].rotation, direct.rotation)
    # the file itself can be passed too
    assert LGMReconstructor.from_pretrained(tiny_folder / "model_fp16_fixrot.safetensors", config=TINY).dtype == torch.float32


def test_pre_fix_and_pickle_checkpoints_are_refused(tiny_network, tmp_path):
    write_lgm(tmp_path, tiny_network, filename="model_fp16.safetensors")
    for source, kwargs in ((tmp_path, {"filename": "model_fp16.safetensors"}),
                           (tmp_path / "model_fp16.safetensors", {}),
                           ("ashawkey/LGM", {"filename": "model.safetensors"})):
        with pytest.raises(UserError, match="before its rotation fix.*model_fp16_fixrot.safetensors") as info:
            LGMReconstructor.from_pretrained(source, config=TINY, allow_download=False, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="only .safetensors weights"):
        LGMReconstructor.from_pretrained(tmp_path, filename="model.pth", config=TINY)


def test_missing_or_mismatched_weights_are_user_errors(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="has no model_fp16_fixrot.safetensors"):
        LGMReconstructor.from_pretrained(tmp_path, config=TINY)
    with pytest.raises(UserError, match="model folder not found.*holding model_fp16_fixrot"):
        LGMReconstructor.from_pretrained(tmp_path / "absent", config=TINY)
    other = dataclasses.replace(TINY, up_channels=(64, 64))
    with pytest.raises(UserError, match="does not match LGMNetwork|has shape"):
        LGMReconstructor.from_pretrained(tiny_folder, config=other)
    with pytest.raises(UserError, match="not in the Hugging Face cache.*--model") as info:
        LGMReconstructor.from_pretrained("nobody/no-lgm", config=TINY, allow_download=False, cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_cached_hub_snapshot_loads_offline(tiny_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from test_loading import _fake_cache

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = tmp_path / "hub"
    _fake_cache(hub, tiny_folder, "ashawkey/LGM")
    model = LGMReconstructor.from_pretrained(config=TINY, allow_download=False, cache_dir=hub)
    assert model.network.config == TINY
    with pytest.raises(UserError, match=r"incomplete in the Hugging Face cache \(missing model_fixrot.safetensors\)"):
        LGMReconstructor.from_pretrained(filename="model_fixrot.safetensors", config=TINY, allow_download=False,
                                         cache_dir=hub)
