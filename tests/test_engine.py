"""The SIR loop against the reference (spec §6.2, §6.4, §6.6): which step counter values the representation
sees, so that the learning-rate decay and densification fire when the reference's do; the reference-view
loss terms."""

import pytest
import torch

from microdreamer.config import GaussianConfig, resolve
from microdreamer.render.types import RenderOutput
from microdreamer.representations.base import Representation
from microdreamer.representations.densify import DensifyStrategy
from microdreamer.sir.cameras import Cameras
from microdreamer.sir.engine import Reference, SIREngine
from microdreamer.sir.scheduler import scaled_linear_alphas_cumprod
from microdreamer.teachers.base import Teacher

RES = 16


class ConstantTeacher(Teacher):
    """Pixel space; predicts zero noise (x0 = x_t), so targets are cheap and deterministic."""

    resolution = RES

    @property
    def alphas_cumprod(self):
        return scaled_linear_alphas_cumprod()

    def prepare(self, condition, generator=None):
        pass

    def encode(self, images, generator=None):
        return images * 2 - 1

    def decode(self, latents):
        return ((latents + 1) / 2).clamp(0, 1)

    def _eps(self, latents, t, cameras, branch, guidance_scale):
        return torch.zeros_like(latents)

    def latent_shape(self, batch):
        return (batch, 3, RES, RES)


class Inert(Representation):
    """Nothing to finalize, save or mesh."""

    def finalize(self):
        pass

    def save(self, path):
        pass

    def density(self, points):
        return torch.zeros(len(points))

    def density_grid(self, resolution, threshold):
        raise NotImplementedError

    @property
    def num_primitives(self):
        return 1


class RecordingRepresentation(Inert):
    """One learnable colour per view; records the step counter values it is handed."""

    def __init__(self):
        self.colour = torch.full((3,), 0.5, requires_grad=True)
        self.steps: list[int] = []

    def render(self, cameras, background):
        b = len(cameras)
        rgb = self.colour.view(1, 3, 1, 1).expand(b, 3, cameras.height, cameras.width)
        ones = torch.ones(b, 1, cameras.height, cameras.width)
        return RenderOutput(rgb, ones, ones)

    def step(self, step, output):
        self.steps.append(step)
        self.colour.grad = None


def _run(preset: str, overrides: dict | None = None) -> list[int]:
    """The step counter values the engine hands a representation under ``preset`` (+ ``overrides``)."""
    cfg = resolve(preset, None, {"cameras": {"resolution": RES}, **(overrides or {})})
    rep = RecordingRepresentation()
    result = SIREngine(ConstantTeacher(), rep, cfg, torch.Generator().manual_seed(0), torch.device("cpu")).run()
    assert result.optimisation_steps == len(rep.steps)
    return rep.steps


def fired(steps: list[int], kind: type[DensifyStrategy] = DensifyStrategy) -> list[int]:
    """The steps of ``steps`` (in the order a representation is handed them) at which ``kind`` densifies."""
    strategy = kind.from_config(GaussianConfig())
    return [s for previous, s in zip([0, *steps], steps) if strategy.fires(s, previous)]


def test_step_counter_and_densification_follow_the_reference_for_stable_zero123():
    steps = _run("stable-zero123")
    # init iteration: counter 1 on the iteration, 2..16 on its 15 steps; then 16 per iteration
    assert steps[:15] == list(range(2, 17)) and steps[15:30] == list(range(18, 33))
    assert len(steps) == 15 + 20 * 15 and steps[-1] == 336
    assert fired(steps) == [100, 200, 300]  # spec §6.6


def test_imagedream_densifies_the_step_100_its_counter_skips_over_at_101():
    steps = _run("imagedream")
    assert steps[:50] == list(range(2, 52)) and 52 not in steps and 100 not in steps
    assert fired(steps) == [101, 200, 300]  # spec §6.6: 100 is an iteration increment, where the reference skips it


class FreeImages(Inert):
    """Every view's rgb and alpha are free leaves; records the cameras it renders and the loss's gradients."""

    def __init__(self, views: int, generator: torch.Generator):
        self.rgb = torch.rand(views, 3, RES, RES, generator=generator).requires_grad_()
        self.alpha = torch.rand(views, 1, RES, RES, generator=generator).requires_grad_()
        self.cameras: list = []
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []

    def render(self, cameras, background):
        assert len(cameras) == self.rgb.shape[0]
        self.cameras.append(cameras)
        return RenderOutput(self.rgb, self.alpha, self.alpha)

    def step(self, step, output):
        none = torch.zeros_like(self.alpha)  # no term used the alpha
        self.grads.append((self.rgb.grad.clone(), none if self.alpha.grad is None else self.alpha.grad.clone()))
        self.rgb.grad = self.alpha.grad = None


@pytest.mark.parametrize("weights", [(0.3, 0.01), (0.0, 0.01), (0.3, 0.0)])
def test_reference_view_terms_are_summed_l1_and_squared_mask_error_on_the_last_render(weights):
    """Spec §6.4: L = Σ|novel − target|/B + 0.3·Σ|ref − image| + 0.01·Σ(alpha_ref − mask)², the reference camera
    rendered last in the same batch. The gradient each term sends to the renders shows its form and weight."""
    views = 3
    g = torch.Generator().manual_seed(0)
    cfg = resolve("stable-zero123", None, {
        "cameras": {"resolution": RES, "views": views},
        "schedule": {"iterations": 1, "steps": 2, "init_steps": 1},
        "loss": {"reference_rgb": weights[0], "reference_mask": weights[1]},
    })
    camera = Cameras.orbit([-10.0], [0.0], 2.0, RES)
    reference = Reference(torch.rand(1, 3, RES, RES, generator=g), (torch.rand(1, 1, RES, RES, generator=g) > 0.5).float(),
                          camera)
    rep = FreeImages(views + 1, g)
    SIREngine(ConstantTeacher(), rep, cfg, torch.Generator().manual_seed(1), torch.device("cpu"), reference=reference).run()
    assert len(rep.grads) == 3
    for cams in rep.cameras:
        assert torch.equal(cams.c2w[-1], camera.c2w[0])  # the reference camera, last
    for rgb_grad, alpha_grad in rep.grads:
        novel = rgb_grad[:views]
        assert torch.all((novel.abs() == 1 / views) | (novel == 0)) and (novel != 0).float().mean() > 0.9
        assert torch.equal(alpha_grad[:views], torch.zeros_like(alpha_grad[:views]))  # no mask term on novel views
        expected_rgb = weights[0] * torch.sign(rep.rgb[-1:] - reference.rgb)
        expected_alpha = weights[1] * 2 * (rep.alpha[-1:] - reference.mask)
        torch.testing.assert_close(rgb_grad[-1:], expected_rgb.detach(), atol=1e-7, rtol=0)
        torch.testing.assert_close(alpha_grad[-1:], expected_alpha.detach(), atol=1e-7, rtol=1e-6)
