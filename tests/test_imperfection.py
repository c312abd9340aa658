"""The imperfect stand-in teacher's defects: each present at large t2, absent as t2 → 0, bounded by its maximum
at the moderate level; the ramp; reproducibility."""

import dataclasses
import math

import pytest
import torch

from microdreamer.errors import UserError
from microdreamer.io.mesh import TexturedMesh
from microdreamer.render.mesh import rasterize_mesh
from microdreamer.sir.cameras import Cameras
from microdreamer.sir.scheduler import scaled_linear_alphas_cumprod
from microdreamer.teachers.imperfection import (
    LEVELS,
    Imperfection,
    ViewDraw,
    _blur,
    imperfect_images,
    imperfection_level,
    misregistered,
    ramp,
)

MODERATE = LEVELS["moderate"]
WHITE = torch.ones(3)
RES = 48
# float32 images in [0, 1], a few operations each: differences below this are rounding
EPS = 1e-5


def _card() -> TexturedMesh:
    """A two-sided square card facing +z, its texture a left half (0.6, 0.3, 0.2) and a right half (0.2, 0.4, 0.7)."""
    half = 0.35
    v = torch.tensor([[-half, -half, 0.0], [half, -half, 0.0], [half, half, 0.0], [-half, half, 0.0]])
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    texture = torch.empty(8, 8, 3)
    texture[:, :4], texture[:, 4:] = torch.tensor([0.6, 0.3, 0.2]), torch.tensor([0.2, 0.4, 0.7])
    return TexturedMesh(v, torch.tensor([[0, 1, 2], [0, 2, 3]]), uvs=uvs, texture=texture)


CARD = _card()
MIRRORED = dataclasses.replace(CARD, texture=CARD.texture.flip(1), cache={})


def _render(cameras: Cameras, mirrored: bool):
    return rasterize_mesh(MIRRORED if mirrored else CARD, cameras, WHITE)


def _cameras(n: int = 16, spread: float = 60.0) -> Cameras:
    """``n`` views within ``spread`` degrees of the front (azimuth 0), at a few elevations."""
    az = torch.linspace(-spread, spread, n)
    el = torch.tensor([-15.0, 0.0, 10.0, 5.0]).repeat(n // 4 + 1)[:n]
    return Cameras.orbit(el, az, 2.0, RES)


def _only(**maxima) -> Imperfection:
    return dataclasses.replace(Imperfection(), **maxima)


def _defective(level: Imperfection, amplitude: float, cameras: Cameras | None = None, seed: int = 0) -> torch.Tensor:
    return imperfect_images(_render, cameras or _cameras(), amplitude, level, seed, 0.0, WHITE)


def test_the_moderate_level_is_the_one_the_issue_fixes():
    assert MODERATE == Imperfection(exposure=0.10, colour_shift=0.03, rotation_degrees=2.0, translation=0.02,
                                    blur_pixels=1.0, far_side_degrees=90.0, blob_rate=0.25)
    assert MODERATE.active and not LEVELS["none"].active
    with pytest.raises(UserError, match="unknown imperfection level 'heavy'"):
        imperfection_level("heavy")


def test_ramp_is_zero_at_zero_one_from_the_schedule_start_and_grows_with_t2():
    alphas = scaled_linear_alphas_cumprod()
    values = [ramp(t, 900, alphas) for t in range(0, 1000, 50)]
    assert values[0] == 0.0 and ramp(900, 900, alphas) == 1.0 and ramp(951, 900, alphas) == 1.0
    assert all(b > a for a, b in zip(values, values[1:]) if a < 1)
    # the share of the signal the noise removed: 1 − sqrt(ᾱ_t/ᾱ_0), relative to t = 900
    a0 = float(alphas[0])
    expected = (1 - math.sqrt(float(alphas[501]) / a0)) / (1 - math.sqrt(float(alphas[900]) / a0))
    assert ramp(501, 900, alphas) == pytest.approx(expected, rel=1e-12)
    assert ramp(1, 900, alphas) < 1e-3


def test_without_amplitude_every_defect_is_absent():
    cams = _cameras(8, spread=170.0)  # far-side views included
    clean = _render(cams, False).rgb
    assert torch.equal(_defective(MODERATE, 0.0, cams), clean.clamp(0, 1))


def _object(cams: Cameras) -> torch.Tensor:
    """Pixels fully on the card in every view, away from the texture's seam: [B,1,H,W]."""
    out = _render(cams, False)
    inside = out.alpha == 1
    return inside & (torch.nn.functional.max_pool2d(1 - inside.float(), 5, 1, 2) == 0)


def test_exposure_scales_the_object_by_at_most_ten_percent():
    cams = _cameras()
    clean = _render(cams, False)
    inside = _object(cams)
    for amplitude in (1.0, 0.5):
        ratio = _defective(_only(exposure=0.10), amplitude, cams) / clean.rgb
        gains = []
        for view in range(len(cams)):
            values = ratio[view][inside[view].expand(3, -1, -1)]
            assert float(values.max() - values.min()) < 1e-4  # one gain per view
            gains.append(float(values.mean()) - 1)
        assert max(abs(g) for g in gains) <= 0.10 * amplitude + EPS
        assert max(abs(g) for g in gains) > 0.05 * amplitude  # present
    background = clean.alpha == 0
    assert torch.equal(_defective(_only(exposure=0.10), 1.0, cams)[background.expand(-1, 3, -1, -1)], torch.ones(
        int(background.sum()) * 3))


def test_colour_shift_adds_at_most_three_hundredths_per_channel():
    cams = _cameras()
    clean = _render(cams, False).rgb
    inside = _object(cams).expand(-1, 3, -1, -1)
    shift = (_defective(_only(colour_shift=0.03), 1.0, cams) - clean)[inside]
    assert float(shift.abs().max()) <= 0.03 + EPS and float(shift.abs().max()) > 0.015
    half = (_defective(_only(colour_shift=0.03), 0.5, cams) - clean)[inside]
    torch.testing.assert_close(half, shift / 2, atol=2 * EPS, rtol=0)


def _angle_degrees(rotation: torch.Tensor) -> torch.Tensor:
    cos = ((rotation.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


def test_pose_misregistration_turns_at_most_two_degrees_and_moves_at_most_two_percent():
    cams = _cameras(32)
    draws = [ViewDraw.draw(7, c2w) for c2w in cams.c2w]
    for amplitude in (1.0, 0.25):
        moved = misregistered(cams, draws, amplitude, MODERATE)
        turn = moved.c2w[:, :3, :3].double() @ cams.c2w[:, :3, :3].double().transpose(1, 2)
        angle = _angle_degrees(turn)
        assert float(angle.max()) <= 2.0 * amplitude + 0.01 and float(angle.max()) > 1.0 * amplitude
        position = cams.c2w[:, :3, 3].double()
        offset = moved.c2w[:, :3, 3].double() - (turn @ position[..., None])[..., 0]
        share = offset.norm(dim=-1) / position.norm(dim=-1)
        assert float(share.max()) <= 0.02 * amplitude + 1e-6 and float(share.max()) > 0.01 * amplitude
    assert torch.allclose(misregistered(cams, draws, 0.0, MODERATE).c2w, cams.c2w)
    # the defective view is the render from the misregistered camera
    level = _only(rotation_degrees=2.0, translation=0.02)
    expected = _render(misregistered(cams, draws, 1.0, level), False).rgb
    assert torch.equal(_defective(level, 1.0, cams, seed=7), expected)
    assert float((expected - _render(cams, False).rgb).abs().mean()) > 1e-3


def test_blur_is_gaussian_with_at_most_one_pixel_at_256():
    dot = torch.zeros(1, 1, 21, 21)
    dot[..., 10, 10] = 1.0
    for sigma in (0.6, 1.0):
        spread = _blur(dot, sigma)[0, 0]
        x = torch.arange(21.0) - 10
        assert float(spread.sum()) == pytest.approx(1.0, abs=1e-6)
        measured = math.sqrt(float((spread.sum(0) * x**2).sum()))  # second moment along one axis
        assert measured == pytest.approx(sigma, rel=0.02)
    cams = Cameras.orbit([0.0, 10.0], [0.0, 30.0], 2.0, 256)
    clean = _render(cams, False).rgb
    blurred = imperfect_images(_render, cams, 1.0, _only(blur_pixels=1.0), 0, 0.0, WHITE)
    torch.testing.assert_close(blurred, _blur(clean, 1.0).clamp(0, 1))  # σ = 1 px at 256² and full amplitude
    at_48 = _defective(_only(blur_pixels=1.0), 0.5)
    torch.testing.assert_close(at_48, _blur(_render(_cameras(), False).rgb, 0.5 * RES / 256).clamp(0, 1))


def test_far_side_views_see_the_mirrored_texture_near_views_the_true_one():
    cams = Cameras.orbit([0.0, 0.0, 0.0, 0.0], [30.0, -85.0, 95.0, 180.0], 2.0, RES)
    level = _only(far_side_degrees=90.0)
    clean, wrong = _render(cams, False).rgb, _render(cams, True).rgb
    for amplitude in (1.0, 0.5):
        out = _defective(level, amplitude, cams)
        assert torch.equal(out[:2], clean[:2])  # within 90° of the reference view
        torch.testing.assert_close(out[2:], (1 - amplitude) * clean[2:] + amplitude * wrong[2:], atol=EPS, rtol=0)
    assert float((wrong[3] - clean[3]).abs().max()) > 0.3  # the mirrored texture is another picture


def test_an_extra_blob_appears_in_about_one_view_in_four_and_stays_small():
    cams = _cameras(64, spread=80.0)
    clean = _render(cams, False).rgb
    level = _only(blob_rate=0.25)
    out = _defective(level, 1.0, cams, seed=3)
    changed = (out - clean).abs().amax(1) > EPS  # [B,H,W]
    with_blob = changed.flatten(1).any(1)
    draws = [ViewDraw.draw(3, c2w) for c2w in cams.c2w]
    assert with_blob.tolist() == [d.blob < 0.25 for d in draws]
    assert 6 <= int(with_blob.sum()) <= 26  # binomial(64, 1/4): mean 16, sd 3.5
    reach = level.blob_radius * RES + 1  # disc radius plus its one-pixel soft edge
    for view in with_blob.nonzero()[:, 0]:
        rows, cols = changed[view].nonzero().T.float()
        assert float(rows.max() - rows.min()) <= 2 * reach and float(cols.max() - cols.min()) <= 2 * reach
    faint = _defective(level, 0.2, cams, seed=3)
    assert torch.equal((faint - clean).abs().amax(1) > EPS, changed)
    assert float((faint - clean).abs().max()) <= 0.2 + EPS  # opacity = amplitude


def test_defects_are_a_pure_function_of_the_seed_and_the_camera():
    cams = _cameras(8, spread=170.0)
    a, b = _defective(MODERATE, 0.8, cams, seed=5), _defective(MODERATE, 0.8, cams, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, _defective(MODERATE, 0.8, cams, seed=6))
    # a view's defects do not depend on which other views share its batch
    torch.testing.assert_close(_defective(MODERATE, 0.8, cams[2:4], seed=5), a[2:4], atol=EPS, rtol=0)
