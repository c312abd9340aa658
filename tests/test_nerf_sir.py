"""SIR on a NeRF: the NeRF presets against the paper's Table I, threestudio's camera ranges in our
convention, progressive resolution, pixel budgets, the network evaluations each preset makes, and an
end-to-end reconstruction with the reference teacher."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from microdreamer.config import ScheduleConfig, resolve
from microdreamer.evaluate import held_out_cameras, held_out_scores
from microdreamer.io.images import area_resize
from microdreamer.io.mesh import load_mesh
from microdreamer.metrics import psnr
from microdreamer.pipeline import ImageTo3D
from microdreamer.render.mesh import rasterize_mesh
from microdreamer.render.types import RenderOutput
from microdreamer.representations.nerf import NerfField
from microdreamer.sir.cameras import Cameras, camera_sampler
from microdreamer.sir.engine import Reference, SIREngine
from microdreamer.sir.schedule import SIRSchedule

from shared_assets import SHARED_ASSETS
from test_engine import ConstantTeacher, RecordingRepresentation

SPOT = SHARED_ASSETS / "spot" / "spot.obj"
PRESETS = ("mvdream-nerf", "stable-zero123-nerf", "imagedream-nerf")


def test_presets_carry_table_one_nerf_column():
    """Paper Table I, NeRF column (spec nerf §1.1), and the threestudio settings of spec nerf §1.2–1.7."""
    rows = {
        # cfg, t2 from → to, t1 rule, eta, N, views, init, K, I, ref rgb / mask, resolutions
        "mvdream-nerf": (7.5, 0.8, 0.5, "square", 0.0, 50, 4, 50, 50, 15, 0.0, 0.0, (64, 128)),
        "stable-zero123-nerf": (3.0, 0.8, 0.2, "ratio", 0.5, 20, 4, 15, 30, 15, 0.1, 0.001, (64, 128, 256)),
        "imagedream-nerf": (3.0, 0.8, 0.6, "square", 1.0, 10, 4, 50, 30, 15, 0.0, 0.0, (64, 128)),
    }
    for name, row in rows.items():
        cfg = resolve(name)
        s, c, w = cfg.schedule, cfg.cameras, cfg.loss
        got = (cfg.guidance.scale, s.t_start, s.t_end, s.t1, cfg.guidance.eta, s.denoise_steps, c.views,
               s.init_steps, s.iterations, s.steps, w.reference_rgb, w.reference_mask, c.resolutions)
        assert got == row, name
        assert cfg.representation == "nerf" and s.kind == "linear" and c.sampler == "ranges"
        assert len(c.milestones) == len(c.resolutions) - 1
    sz = resolve("stable-zero123-nerf")
    assert sz.schedule.inverse_ratio == 0.6
    assert (sz.nerf.radius, sz.nerf.density_hidden_layers, sz.nerf.optimizer, sz.nerf.background) == (2.0, 2, "adam", "white")
    mv = resolve("mvdream-nerf")
    assert (mv.nerf.radius, mv.nerf.optimizer, mv.nerf.background, mv.nerf.weight_decay) == (1.0, "adamw", "envmap", 0.01)
    assert resolve("imagedream-nerf").nerf.background == "white"
    ref = resolve("reference-nerf")
    assert ref.teacher.name == "reference" and ref.nerf.ray_budget > 0
    assert (ref.schedule, ref.cameras, ref.loss) == (sz.schedule, sz.cameras, sz.loss)


def test_stable_zero123_elevation_range_puts_cameras_above():
    """threestudio's [−10°, 80°] (z up, positive = above) is our [−80°, 10°] (y up, negative = above)."""
    cfg = resolve("stable-zero123-nerf").cameras
    assert tuple(cfg.elevation_range) == (-80.0, 10.0)
    sampler = camera_sampler(cfg)
    g = torch.Generator().manual_seed(0)
    cams = Cameras.cat([sampler.sample(g) for _ in range(150)])
    el, y = cams.elevation, cams.centers()[:, 1]
    assert -80.0 <= float(el.min()) < -75.0 and 5.0 < float(el.max()) <= 10.0
    assert torch.equal(y > 0, el < 0)  # negative elevation: camera above the object (y up)
    assert float((y > 0).float().mean()) > 0.75  # most of threestudio's range looks from above
    torch.testing.assert_close(cams.radius, torch.full_like(cams.radius, 3.8))
    assert cams.fovy == 20.0
    # per-view elevations (single-image data module), azimuths 90° apart from a random offset
    batch = sampler.sample(g)
    assert len(set(batch.elevation.tolist())) == 4
    steps = torch.diff(batch.azimuth)
    torch.testing.assert_close(steps, torch.full_like(steps, 90.0))


def test_multiview_ranges_share_elevation_and_scale_distance_with_fov():
    sampler = camera_sampler(resolve("mvdream-nerf").cameras)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        cams = sampler.sample(g)
        assert len(set(cams.elevation.tolist())) == 1 and -30.0 <= float(cams.elevation[0]) <= 0.0
        assert 15.0 <= cams.fovy <= 60.0
        half_frame = cams.radius * math.tan(math.radians(cams.fovy) / 2)  # relative distance 0.8..1.0
        assert bool(((half_frame >= 0.8 - 1e-5) & (half_frame <= 1.0 + 1e-5)).all())


def test_half_the_batches_draw_elevations_uniformly_on_the_sphere():
    """Uniform in degrees over [−90, 90] gives E|sin el| = 2/π, uniform on the sphere ½: the mixture 0.568."""
    cfg = resolve("mvdream-nerf").cameras
    cfg.elevation_range = (-90.0, 90.0)
    sampler = camera_sampler(cfg)
    g = torch.Generator().manual_seed(2)
    el = torch.stack([sampler.sample(g).elevation[0] for _ in range(2000)])
    mean = float(torch.sin(torch.deg2rad(el)).abs().mean())
    # standard error of the mean: about 0.3 / sqrt(2000) = 0.007
    assert abs(mean - (1 / math.pi + 0.25)) < 0.02  # ½·2/π + ½·½; the pure rules are 0.07 away


class FlatRepresentation(RecordingRepresentation):
    """One learnable colour; records the render sizes and pixel subsets it is asked for."""

    def __init__(self, pixel_budget: int = 0):
        super().__init__()
        self.pixel_budget = pixel_budget
        self.sizes: list[tuple[int, int]] = []
        self.pixels: list[torch.Tensor] = []

    def _out(self, b, h, w):
        rgb = self.colour.view(1, 3, 1, 1).expand(b, 3, h, w)
        return RenderOutput(rgb, torch.full((b, 1, h, w), 0.5), torch.ones(b, 1, h, w))

    def render(self, cameras, background):
        self.sizes.append((cameras.height, cameras.width))
        return self._out(len(cameras), cameras.height, cameras.width)

    def render_pixels(self, cameras, background, pixels):
        self.pixels.append(pixels)
        return self._out(len(cameras), 1, pixels.shape[1])


def _continuous_estimate(s: ScheduleConfig) -> float:
    """Spec nerf §1.1's estimate: N (init) + K·N·mean(t2) sampling + K·N·mean(t2 − t1) inversion, t2/T
    linear from t_start to t_end, t1 = 0.6·t2 or t2²/T (means over the continuous range)."""
    a, b = s.t_end, s.t_start
    mean_t2 = (a + b) / 2
    mean_t1 = s.inverse_ratio * mean_t2 if s.t1 == "ratio" else (b**3 - a**3) / (3 * (b - a))
    return s.denoise_steps * (1 + s.iterations * (mean_t2 + mean_t2 - mean_t1))


@pytest.mark.parametrize("preset,paper", [("mvdream-nerf", 2220), ("stable-zero123-nerf", 440),
                                          ("imagedream-nerf", 280)])
def test_each_nerf_preset_makes_the_network_evaluations_its_schedule_implies(preset, paper):
    cfg = resolve(preset, None, {"cameras": {"resolutions": [16] * len(resolve(preset).cameras.resolutions)}})
    teacher = ConstantTeacher()
    rep = FlatRepresentation()
    result = SIREngine(teacher, rep, cfg, torch.Generator().manual_seed(0), torch.device("cpu")).run()
    schedule = SIRSchedule.from_config(cfg.schedule)
    s = cfg.schedule
    assert teacher.evaluations.total == schedule.guided_passes + schedule.uncond_passes  # exact
    assert teacher.evaluations.guided == schedule.guided_passes
    assert result.optimisation_steps == s.init_steps + s.iterations * s.steps
    estimate = _continuous_estimate(s)
    assert estimate == pytest.approx(paper, rel=0.02)  # spec nerf §1.1's figures come from this estimate
    # The DDIM grid ends at t = 1 (one more sampling step than t2·N) and t1 is snapped down onto the
    # inversion grid (up to one more inversion step): the exact count exceeds the estimate by 0..2 per iteration.
    assert estimate <= teacher.evaluations.total <= estimate + 2 * s.iterations
    if preset != "imagedream-nerf":  # N = 10: the per-iteration excess is a large share (325 vs 280, +16 %)
        assert teacher.evaluations.total == pytest.approx(paper, rel=0.10)


def test_each_iteration_tells_the_teacher_the_backdrop_its_renders_are_composited_over():
    """A representation that draws its background per iteration (a NeRF's environment map or random colour)
    announces it; the engine hands it to the teacher before the targets, and clears it after the run."""
    cfg = resolve("mvdream-nerf", None, {"schedule": {"iterations": 3, "steps": 1, "init_steps": 1},
                                         "cameras": {"resolutions": [16], "milestones": []}})

    class Backdrops(FlatRepresentation):
        def __init__(self):
            super().__init__()
            self.drawn = []

        def new_iteration(self, cameras, background):
            self.drawn.append(torch.full((len(cameras), 3, cameras.height, cameras.width), len(self.drawn) / 10))
            return self.drawn[-1]

    class Told(ConstantTeacher):
        def __init__(self):
            super().__init__()
            self.told = []

        def set_backdrop(self, backdrop):
            self.told.append(backdrop)

    rep, teacher = Backdrops(), Told()
    SIREngine(teacher, rep, cfg, torch.Generator().manual_seed(0), torch.device("cpu")).run()
    assert len(rep.drawn) == 4 and len(teacher.told) == 5  # init + 3 iterations, then the clearing None
    assert all(told is drawn for told, drawn in zip(teacher.told, rep.drawn)) and teacher.told[4] is None


def test_progressive_resolution_follows_the_milestones():
    cfg = resolve("stable-zero123-nerf", None, {"schedule": {"iterations": 6, "steps": 2, "init_steps": 2},
                                                "cameras": {"resolutions": [16, 24, 32], "milestones": [2, 5]}})
    rep = FlatRepresentation()
    SIREngine(ConstantTeacher(), rep, cfg, torch.Generator().manual_seed(0), torch.device("cpu")).run()
    assert [h for h, _ in rep.sizes[::2]] == [16, 16, 24, 24, 24, 32, 32]  # 2 steps per iteration


def test_reference_view_is_area_averaged_to_the_render_size():
    cfg = resolve("stable-zero123-nerf", None, {"schedule": {"iterations": 2, "steps": 1, "init_steps": 1},
                                                "cameras": {"resolution": 40, "resolutions": [16, 40],
                                                            "milestones": [1]}})
    g = torch.Generator().manual_seed(3)
    rgb, mask = torch.rand(1, 3, 40, 40, generator=g), torch.rand(1, 1, 40, 40, generator=g)
    reference = Reference(rgb, mask, camera_sampler(cfg.cameras).reference())
    engine = SIREngine(ConstantTeacher(), FlatRepresentation(), cfg, g, torch.device("cpu"), reference=reference)
    small_rgb, small_mask = engine._reference_at(16)  # a factor of 2.5: exact pixel areas
    expected = area_resize(rgb[0].permute(1, 2, 0).numpy().astype(np.float64), 16, 16)
    np.testing.assert_allclose(small_rgb[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert small_mask.shape == (1, 1, 16, 16) and engine._reference_at(40)[0] is rgb


def test_pixel_budget_draws_subsets_and_scales_the_loss_to_whole_images():
    cfg = resolve("stable-zero123-nerf", None, {"schedule": {"iterations": 1, "steps": 3, "init_steps": 2},
                                                "cameras": {"resolutions": [16, 16], "milestones": [1]}})
    g = torch.Generator().manual_seed(4)
    reference = Reference(torch.full((1, 3, 256, 256), 0.75), torch.ones(1, 1, 256, 256),
                          camera_sampler(cfg.cameras).reference())
    rep = FlatRepresentation(pixel_budget=5 * 100)
    engine = SIREngine(ConstantTeacher(), rep, cfg, g, torch.device("cpu"), reference=reference)
    result = engine.run()
    assert len(rep.pixels) == 5 and all(p.shape == (5, 100) for p in rep.pixels)
    assert all(len(set(row.tolist())) == 100 and int(row.max()) < 256 for p in rep.pixels for row in p)
    assert not torch.equal(rep.pixels[0], rep.pixels[1])
    # whole renders only for the teacher's targets (regular iterations), none for the init from noise
    assert rep.sizes == [(16, 16)]
    # a flat render against flat targets: the subset loss equals the whole-image loss exactly
    target = torch.full((4, 3, 16, 16), 0.6)
    flat = rep._out(5, 16, 16)
    whole = engine._loss(flat, flat.rgb[:4], target)
    part = rep._out(5, 1, 100)
    subset = engine._loss(part, part.rgb[:4], target, rep.pixels[0]).detach()
    assert float(subset) == pytest.approx(float(whole.detach()), rel=1e-6)
    assert result.optimisation_steps == 5


@pytest.mark.slow
def test_tiny_nerf_fitted_with_the_reference_teacher_beats_a_psnr_floor(tmp_path, one_thread):
    """Spot, 8-level 2^14 hash grid, 32² renders, 8 iterations (about 30 s of one core), through the pipeline:
    the saved NeRF loads back and scores well above an empty white image on the held-out views (64²)."""
    overrides = {
        "teacher": {"model": str(SPOT)},
        "schedule": {"iterations": 8},
        "cameras": {"resolution": 32, "resolutions": [], "milestones": []},
        "nerf": {"hash_levels": 8, "hash_log2_size": 14, "ray_budget": 0},
    }
    cfg = resolve("reference-nerf", None, overrides)
    report = ImageTo3D(cfg, torch.device("cpu")).run(None, tmp_path, overwrite=True)
    assert Path(report.outputs["nerf"]).name == "spot.safetensors" and report.primitives > 0
    field = NerfField.load(Path(report.outputs["nerf"]), "cpu")
    mesh = load_mesh(SPOT)
    scores = held_out_scores(field.render, mesh, torch.device("cpu"), 2.0, 64, (1.0, 1.0, 1.0))
    nerf_psnr = sum(v.psnr for v in scores) / len(scores)
    # The floor: an empty (white) render scores the baseline below; this run measured 28.6 dB (4 iterations:
    # 24.4 dB), so 26 dB fails a run that learns clearly less while leaving room for other float orders.
    gt = rasterize_mesh(mesh, held_out_cameras(2.0, 64), torch.ones(3), supersample=2).rgb.clamp(0, 1)
    white = float(psnr(torch.ones_like(gt), gt).mean())
    assert nerf_psnr > white + 6 and nerf_psnr > 26.0, (nerf_psnr, white)  # white: 18.9 dB
