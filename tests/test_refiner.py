"""The refiner with tiny pixel-space teachers: closed forms, call counts, diffusers parity, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from microdreamer.config import ScheduleConfig
from microdreamer.sir.cameras import Cameras
from microdreamer.sir.refiner import hybrid_forward, init_sample, refine, sample
from microdreamer.sir.schedule import SIRSchedule
from microdreamer.sir.scheduler import scaled_linear_alphas_cumprod
from microdreamer.teachers.base import Condition, Teacher
from tolerances import assert_within, rounding_bound

RES = 16
N = 20


class PixelTeacher(Teacher):
    """Pixel space (z = 2x − 1); ``eps_fn(z, t)`` gives the noise; every call is logged."""

    resolution = RES

    def __init__(self, eps_fn, alphas: torch.Tensor | None = None) -> None:
        super().__init__()
        self.eps_fn = eps_fn
        self._alphas = scaled_linear_alphas_cumprod() if alphas is None else alphas
        self.calls: list[tuple[int, str]] = []
        self.encoded_sizes: list[tuple[int, int]] = []

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas

    def prepare(self, condition: Condition, generator=None) -> None:
        pass

    def encode(self, images, generator=None):
        self.encoded_sizes.append(tuple(images.shape[-2:]))
        return F.interpolate(images, size=(RES, RES), mode="bilinear", align_corners=False) * 2 - 1

    def decode(self, latents):
        return ((latents + 1) / 2).clamp(0, 1)

    def _eps(self, latents, t, cameras, branch, guidance_scale):
        self.calls.append((t, branch))
        return self.eps_fn(latents, t)

    def latent_shape(self, batch):
        return (batch, 3, RES, RES)


def _ideal_teacher(z_ref: torch.Tensor) -> PixelTeacher:
    """The exact noise of a model whose data distribution is the single point z_ref."""
    alphas = scaled_linear_alphas_cumprod()

    def eps(z, t):
        a = float(alphas[t])
        return (z - math.sqrt(a) * z_ref) / math.sqrt(1 - a)

    return PixelTeacher(eps, alphas)


def _cameras(b: int) -> Cameras:
    return Cameras.orbit(torch.zeros(b), torch.arange(b) * 360.0 / b - 180, 2.0, RES)


def _images(b: int, seed: int, size: int = RES) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


PLAN = SIRSchedule.from_config(ScheduleConfig()).iteration(0)  # image_sai k = 0: t2 901, t1 501


def _trajectory_bound(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Rounding of the noise → invert → sample path of PLAN: every DDIM step rounds its √ᾱ, √(1−ᾱ)
    coefficients and two products and a sum (4 roundings) of terms that 1/√ᾱ(t2) bounds relative to the
    result."""
    steps = 1 + len(PLAN.inversion) + len(PLAN.sampling)
    magnitude = values.abs().max().item() / math.sqrt(float(scaled_linear_alphas_cumprod()[PLAN.t2]))
    return rounding_bound(magnitude, ops=4 * steps, dtype=dtype)


def test_refine_with_ideal_teacher_closed_form():
    """eps stays constant along the deterministic path, so the target is exactly
    decode(sqrt(ᾱ0) z_ref + sqrt(1 − ᾱ0) e) with e the noise seen at t1."""
    x_ref, images = _images(2, 0), _images(2, 1)
    z_ref, z0 = x_ref * 2 - 1, images * 2 - 1
    teacher = _ideal_teacher(z_ref)
    out = refine(teacher, images, _cameras(2), PLAN.t1, PLAN.t2, N, 0.0, 3.0, torch.Generator().manual_seed(5))

    a = teacher.alphas_cumprod
    n = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5))
    a1 = float(a[PLAN.t1])
    e = n + math.sqrt(a1 / (1 - a1)) * (z0 - z_ref)
    expected = ((math.sqrt(a[0]) * z_ref + math.sqrt(1 - a[0]) * e + 1) / 2).clamp(0, 1)
    assert_within(out, expected, _trajectory_bound(2 * expected - 1), "refined images")
    assert (out - x_ref).abs().mean() < 0.03 < (images - x_ref).abs().mean()


def test_call_counts_and_branches_follow_the_schedule():
    teacher = _ideal_teacher(_images(3, 0) * 2 - 1)
    for k in (0, 10, 19):
        plan = SIRSchedule.from_config(ScheduleConfig()).iteration(k)
        teacher.calls.clear()
        before = teacher.evaluations.as_dict()
        refine(teacher, _images(3, k), _cameras(3), plan.t1, plan.t2, N, 0.5, 3.0, torch.Generator().manual_seed(0))
        after = teacher.evaluations.as_dict()
        assert after["single_branch"] - before["single_branch"] == plan.uncond_passes
        assert after["guided"] - before["guided"] == plan.guided_passes
        expected = [(s, "uncond") for s, _ in plan.inversion] + [(t, "guided") for t in plan.sampling]
        assert teacher.calls == expected


def test_matches_manual_diffusers_loop():
    """Noise to t1, invert to t2, sample to 0 (eta 0) with a teacher that ignores its input."""
    diffusers = pytest.importorskip("diffusers")
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    sampler, inverter = diffusers.DDIMScheduler(**config), diffusers.DDIMInverseScheduler(**config)
    sampler.set_timesteps(N)
    inverter.set_timesteps(N)
    grid = torch.linspace(-1, 1, 2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8)

    def eps_fn(z, t):
        return torch.sin(3 * grid + t / 97.0).to(z.dtype)

    teacher = PixelTeacher(eps_fn, sampler.alphas_cumprod.double())
    z0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    cams = _cameras(2)
    z = hybrid_forward(teacher, z0, PLAN.t1, PLAN.t2, cams, N, torch.Generator().manual_seed(9))
    ours = sample(teacher, z, PLAN.t2, cams, N, 0.0, 3.0, torch.Generator().manual_seed(10))

    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ref = sampler.add_noise(z0, noise, torch.tensor([PLAN.t1]))
    timesteps = inverter.timesteps.tolist()
    for source, target in zip(timesteps[:-1], timesteps[1:]):
        if PLAN.t1 < target <= PLAN.t2:
            ref = inverter.step(eps_fn(ref, source), target, ref).prev_sample
    # float64 samples, but diffusers computes its coefficients from float32 ᾱ in float32
    assert_within(z, ref, _trajectory_bound(ref), "after inversion")
    for t in sampler.timesteps.tolist():
        if t <= PLAN.t2:
            ref = sampler.step(eps_fn(ref, t), t, ref, eta=0.0).prev_sample
    assert_within(ours, ref, _trajectory_bound(ref), "after sampling")


def test_same_generator_same_result():
    teacher = _ideal_teacher(_images(2, 4) * 2 - 1)
    images, cams = _images(2, 5), _cameras(2)

    def run(seed):
        return refine(teacher, images, cams, PLAN.t1, PLAN.t2, N, 0.5, 3.0, torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_teacher_resizes_and_targets_come_back_at_render_size():
    x_ref = _images(2, 6)
    teacher = _ideal_teacher(x_ref * 2 - 1)
    images = F.interpolate(_images(2, 7), size=(24, 24), mode="bilinear", align_corners=False)
    out = refine(teacher, images, _cameras(2), PLAN.t1, PLAN.t2, N, 0.0, 3.0, torch.Generator().manual_seed(0))
    # renders reach the teacher unresized (it resizes its own way); targets come back at the render size
    assert teacher.encoded_sizes == [(24, 24)] and out.shape == (2, 3, 24, 24)
    back = F.interpolate(x_ref, size=(24, 24), mode="bilinear", align_corners=False)
    assert (out - back).abs().mean() < 0.03


def test_init_sample_from_pure_noise():
    x_ref = _images(3, 8)
    teacher = _ideal_teacher(x_ref * 2 - 1)
    out = init_sample(teacher, _cameras(3), N, 0.5, 3.0, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, RES, RES)
    assert teacher.calls == [(t, "guided") for t in range(951, 0, -50)]
    assert (out - x_ref).abs().mean() < 0.03
    again = init_sample(teacher, _cameras(3), N, 0.5, 3.0, torch.Generator().manual_seed(0), out_size=(32, 32))
    assert again.shape == (3, 3, 32, 32)
    torch.testing.assert_close(again, F.interpolate(out, size=(32, 32), mode="bilinear", align_corners=False))


def test_pure_noising_when_t1_equals_t2():
    teacher = _ideal_teacher(_images(1, 0) * 2 - 1)
    refine(teacher, _images(1, 1), _cameras(1), 401, 401, N, 0.0, 3.0, torch.Generator().manual_seed(0))
    assert teacher.evaluations.single == 0 and teacher.evaluations.guided == 9


def test_rejects_timesteps_off_the_grid():
    teacher = _ideal_teacher(_images(1, 0) * 2 - 1)
    args = (_cameras(1), N, 0.0, 3.0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="t2"):
        refine(teacher, _images(1, 1), args[0], 501, 900, *args[1:])
    with pytest.raises(ValueError, match="t1"):
        refine(teacher, _images(1, 1), args[0], 500, 901, *args[1:])
    with pytest.raises(ValueError, match="exceed"):
        refine(teacher, _images(1, 1), args[0], 551, 501, *args[1:])
