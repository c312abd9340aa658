"""GECO Stage I on tiny Zero123++ checkpoints: the v → x0 conversion, the one-step generator with the clean
condition latent, batched conditioning, the VSD gradient (Eq. 1) against a hand computation, and a student
that learns the generator's samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from microdreamer.distill.config import Stage1Config
from microdreamer.distill.data import ConditionSet
from microdreamer.distill.denoiser import Denoiser, condition_batch
from microdreamer.distill.diffusion import noised, predicted_noise, predicted_x0, timestep_range
from microdreamer.distill.onestep import OneStepGenerator
from microdreamer.distill.randomness import batch_items
from microdreamer.distill.stage1 import Stage1
from microdreamer.distill.vsd import generator_surrogate, vsd_direction, vsd_magnitude, vsd_weight
from microdreamer.errors import UserError
from microdreamer.generators.reference_attention import reference_call
from microdreamer.generators.zero123plus import Zero123PlusGenerator
from microdreamer.io.images import save_image
from tiny_models import build_tiny_zero123plus

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = torch.finfo(torch.float32).eps
VIEW = 8  # tiny views: the grid's latents are 12 × 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_zero123plus(tmp_path_factory.mktemp("zero123plus") / "model")


@pytest.fixture(scope="module")
def model(tiny_dir) -> Zero123PlusGenerator:
    return Zero123PlusGenerator.from_pretrained(tiny_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> ConditionSet:
    folder = tmp_path_factory.mktemp("conditions")
    g = np.random.default_rng(3)
    files = []
    for i in range(4):
        image = np.full((24, 24, 3), 127, np.uint8)
        image[6:18, 4 + i : 16 + i] = g.integers(0, 256, 3)
        save_image(folder / f"c{i}.png", image)
        files.append(f"c{i}.png")
    return ConditionSet(folder, files, 24)


def _config(data: ConditionSet, **changes) -> Stage1Config:
    return Stage1Config(data=str(data.root), view_size=VIEW, **changes)


# the parameterisation --------------------------------------------------------------------------------------


def test_v_prediction_to_x0_and_noise_by_hand():
    """ᾱ = 0.64: x_t = 1, v = 0.5 → x0 = 0.8·1 − 0.6·0.5 = 0.5 and ε = 0.6·1 + 0.8·0.5 = 1, which noise back to
    x_t = 0.8·0.5 + 0.6·1 = 1 and give v = 0.8·1 − 0.6·0.5 = 0.5."""
    alpha = torch.tensor([0.64]).view(1, 1, 1, 1)
    x_t, v = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.5)
    x0 = predicted_x0(v, x_t, alpha, "v_prediction")
    eps = predicted_noise(v, x_t, alpha, "v_prediction")
    # two float32 products and a difference of terms ≤ 1 (√0.64 and √0.36 themselves rounded once)
    assert abs(x0.item() - 0.5) <= 4 * EPS32 and abs(eps.item() - 1.0) <= 4 * EPS32
    assert abs(noised(x0, eps, alpha).item() - 1.0) <= 8 * EPS32
    # ε-prediction: the output is ε, and x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ = (1 − 0.6)/0.8 = 0.5
    assert predicted_noise(v, x_t, alpha, "epsilon") is v
    assert abs(predicted_x0(torch.ones(1, 1, 1, 1), x_t, alpha, "epsilon").item() - 0.5) <= 4 * EPS32


def test_timestep_range_of_the_paper():
    assert timestep_range(0.02, 0.98, 1000) == (20, 980)
    assert timestep_range(0.0, 1.0, 1000) == (0, 999)


def test_batches_cover_each_epoch_once_and_do_not_depend_on_the_split():
    first_epoch = [i for step in range(1, 4) for i in batch_items(7, step, 4, 12)]
    assert sorted(first_epoch) == list(range(12)) and first_epoch != list(range(12))
    assert batch_items(7, 4, 4, 12) != first_epoch[:4]  # the next epoch is ordered anew
    straddling = batch_items(7, 3, 5, 12)  # positions 10..14: the last two of epoch 0, the first three of epoch 1
    assert straddling[:2] == first_epoch[10:12]


# the one-step generator --------------------------------------------------------------------------------------


def _by_hand(unet, bank, sample, t, context, reference, t_ref):
    return reference_call(unet, bank, sample, torch.tensor([float(t)]), context, reference, torch.tensor([float(t_ref)]))


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_one_step_generator_is_x0_of_the_guided_v_with_the_clean_condition(model, data, guidance):
    """G(z) = √ᾱ*·x* − √(1−ᾱ*)·v with x* = √(1−ᾱ*)·z at t* = 999, v = v_u + s·(v_c − v_u), each half's write pass on
    its noise-free latent √ᾱ_0·latent at t = 0 (GECO's clean reference attention)."""
    g = torch.Generator().manual_seed(1)
    conditioning = condition_batch(model, [data.image(0)], [g])
    generator = OneStepGenerator(Denoiser.copy_of(model, trainable=False), 999, guidance)
    z = torch.randn(1, 4, 12, 8, generator=g)
    with torch.no_grad():
        x0 = generator(z, conditioning)
        a, a0 = float(model.alphas_cumprod[999]), float(model.alphas_cumprod[0])
        x = math.sqrt(1 - a) * z
        halves = [
            _by_hand(generator.unet, generator.bank, x, 999, conditioning.context[k : k + 1],
                     math.sqrt(a0) * conditioning.reference[k : k + 1], 0)
            for k in (0, 1)
        ]
    v = halves[1] if guidance == 1.0 else halves[0] + guidance * (halves[1] - halves[0])
    expected = math.sqrt(a) * x - math.sqrt(1 - a) * v
    # the batched call differs from the separate ones by float32 rounding in the UNet; |x0| ≲ |v| + |x|, and the
    # guidance scale amplifies the halves' rounding (≈ 2s + 1 times); 2⁹ ε per unit covers the UNet's depth
    scale = (2 * guidance + 1) * (halves[0].abs().max() + halves[1].abs().max()).item()
    torch.testing.assert_close(x0, expected, rtol=0, atol=512 * EPS32 * scale)


def test_the_clean_condition_changes_the_output_and_is_deterministic(model, data):
    """The one-step output depends on the condition (through reference attention), not on any reference noise."""
    generator = OneStepGenerator(Denoiser.copy_of(model, trainable=False))
    z = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        runs = [generator(z, condition_batch(model, [data.image(i)], [torch.Generator().manual_seed(5)]))
                for i in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - runs[2]).abs().max() > 1e-3


def test_batched_conditioning_equals_the_generators_own(model, data):
    """One image: exactly Zero123PlusGenerator.condition with the same generator; two: each its own draws."""
    single = model.condition(data.image(2), torch.Generator().manual_seed(4), guided=True)
    batched = condition_batch(model, [data.image(2)], [torch.Generator().manual_seed(4)])
    torch.testing.assert_close(batched.context, single.context, rtol=0, atol=0)
    torch.testing.assert_close(batched.reference, single.reference, rtol=4 * EPS32, atol=4 * EPS32)
    seeded = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    pair = condition_batch(model, [data.image(1), data.image(2)], seeded)
    assert pair.context.shape[0] == 4 and pair.reference.shape[0] == 4  # [uncond × 2 ; cond × 2]
    torch.testing.assert_close(pair.reference[3], single.reference[1], rtol=1e-5, atol=1e-5)  # batched VAE: rounding
    torch.testing.assert_close(pair.context[0], pair.context[1])  # both unconditional halves: the empty prompt


# VSD ---------------------------------------------------------------------------------------------------------


def test_surrogate_gradient_by_hand():
    """x0_b = θ·z_b with θ a scalar: d/dθ of the surrogate is mean_b Σ g_b·z_b, g = w(ε_t − ε_s)."""
    theta = torch.tensor(2.0, requires_grad=True)
    z = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    eps_t = torch.tensor([[0.5, 0.25], [1.0, -1.0]])
    eps_s = torch.tensor([[0.0, 0.75], [0.5, 1.0]])
    w = torch.tensor([[2.0], [0.5]])
    direction = vsd_direction(w, eps_t, eps_s)  # [[1, -1], [0.25, -1]]
    generator_surrogate(theta * z, direction).backward()
    # sample 0: 1·1 + (−1)(−2) = 3; sample 1: 0.25·0.5 + (−1)·4 = −3.875; mean −0.4375
    assert theta.grad.item() == -0.4375
    assert vsd_magnitude(direction).item() == 0.5 * (2.0 + 1.0625) / 2


def test_vsd_weights_by_hand():
    alpha = torch.tensor([0.64, 0.36]).view(2, 1, 1, 1)
    x0 = torch.zeros(2, 1, 2, 2)
    x0_teacher = torch.stack([torch.full((1, 2, 2), 0.5), torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])])
    # dmd: √((1−ᾱ)/ᾱ) / mean|x0 − x0_teacher| = 0.75 / 0.5 and (0.8/0.6) / 1
    torch.testing.assert_close(vsd_weight("dmd", alpha, x0, x0_teacher).flatten(), torch.tensor([1.5, 4 / 3]))
    torch.testing.assert_close(vsd_weight("sds", alpha, x0, x0_teacher).flatten(), torch.tensor([0.36, 0.64]))
    assert torch.equal(vsd_weight("constant", alpha, x0, x0_teacher).flatten(), torch.ones(2))
    with pytest.raises(ValueError, match="unknown VSD weighting 'x'"):
        vsd_weight("x", alpha, x0, x0_teacher)


def test_generator_gradient_is_eq1_on_tiny_models(model, data):
    """The gradient Stage I leaves on G's weights is mean_b w(t_b)(ε_teacher − ε_student)_b · ∂x0_b/∂θ with
    ε_teacher the guided (s = 4) and ε_student the unguided prediction at x_t = √ᾱ·x0 + √(1−ᾱ)·ε, each computed
    here by hand from plain UNet calls with the reference latents noised to t."""
    config = _config(data, batch_size=2, weighting="sds", lr_generator=0.0)
    stage = Stage1(model, config, data)
    with torch.no_grad():  # make the student differ from the teacher, as after some training
        for p in stage.student.unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    conditioning, draws = stage.batch(1)
    stage.generator_backward(conditioning, draws)
    params = [p for p in stage.generator.unet.parameters()]
    got = [p.grad.clone() for p in params]

    x0 = stage.generator(draws.noise, conditioning)
    rows = []
    for b in range(2):
        t = int(draws.t_generator[b])
        a = float(model.alphas_cumprod[t])
        x_t = math.sqrt(a) * x0[b : b + 1].detach() + math.sqrt(1 - a) * draws.eps_generator[b : b + 1]

        def eps(unet, bank, half):  # ε of one half (0 uncond, 1 cond) of sample b from its v-prediction
            k = half * 2 + b
            ref = math.sqrt(a) * conditioning.reference[k : k + 1] + math.sqrt(1 - a) * draws.reference_generator[k : k + 1]
            v = _by_hand(unet, bank, x_t, t, conditioning.context[k : k + 1], ref, t)
            return math.sqrt(1 - a) * x_t + math.sqrt(a) * v

        with torch.no_grad():
            uncond, cond = eps(stage.teacher.unet, stage.teacher.bank, 0), eps(stage.teacher.unet, stage.teacher.bank, 1)
            eps_teacher = uncond + 4.0 * (cond - uncond)
            eps_student = eps(stage.student.unet, stage.student.bank, 1)
        rows.append((1 - a) * (eps_teacher - eps_student) / 2)  # w = 1 − ᾱ (sds), mean over the batch of 2
    expected = torch.autograd.grad(x0, params, grad_outputs=torch.cat(rows))
    for p, a_grad, e_grad in zip(params, got, expected):
        # the same products summed in another grouping: rounding relative to the largest gradient entry,
        # times the guidance's amplification of the teacher's halves (2s + 1 = 9)
        torch.testing.assert_close(a_grad, e_grad, rtol=0, atol=9 * 256 * EPS32 * e_grad.abs().max().item() + 1e-30)
    assert max(e.abs().max().item() for e in expected) > 0


def test_student_learns_the_generators_samples(model, data):
    """With the generator held (lr 0), ten steps of the student (lr 3e-3) lower its denoising loss on held-out
    generated samples (8 batches of steps the training does not reach, each at its own timesteps)."""
    stage = Stage1(model, _config(data, batch_size=2, lr_generator=0.0, lr_student=3e-3), data)
    held_out = []
    for step in range(1000, 1008):
        conditioning, draws = stage.batch(step)
        with torch.no_grad():
            held_out.append((conditioning, draws, stage.generator(draws.noise, conditioning)))

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(np.mean([stage.student_objective(*batch).item() for batch in held_out]))

    before = held_out_loss()
    for step in range(1, 11):
        stage.train_step(step)
    after = held_out_loss()
    assert after < 0.9 * before, (before, after)


def test_bad_settings_are_one_line():
    with pytest.raises(UserError, match="--steps must be at least 1, got 0"):
        Stage1Config(data="d", steps=0).validate()
    with pytest.raises(UserError, match=r"0 <= t-min < t-max <= 1, got 0.5..0.2"):
        Stage1Config(data="d", t_min=0.5, t_max=0.2).validate()
    with pytest.raises(UserError, match="unknown --weighting 'vsd'"):
        Stage1Config(data="d", weighting="vsd").validate()
    with pytest.raises(UserError, match="--guidance-student must be at least 1"):
        Stage1Config(data="d", guidance_student=0.5).validate()
