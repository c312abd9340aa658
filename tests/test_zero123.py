"""The Zero123 teachers on tiny checkpoints in the real layout: camera embedding, conditioning, CFG, loading."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from microdreamer.errors import UserError
from microdreamer.sir.cameras import Cameras
from microdreamer.sir.refiner import init_sample, refine
from microdreamer.teachers.base import Condition, guide
from microdreamer.teachers.sd_parts import clip_pixel_values
from microdreamer.teachers.zero123 import Zero123Teacher, camera_embedding
from tiny_models import CLIP_MEAN, CLIP_STD, TINY_CLIP_IMAGE, build_tiny_zero123, save_diffusers, tiny_unet
from tolerances import assert_within, guidance_gain, network_bound, printed, rounding_bound

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 16  # the tiny teacher's image size (latents 8×8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_zero123(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def reference_image() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, RES, RES, generator=g)


@pytest.fixture()
def teacher(tiny_dir, reference_image) -> Zero123Teacher:
    teacher = Zero123Teacher.from_pretrained(tiny_dir, variant="stable", device="cpu")
    teacher.prepare(Condition(image=reference_image, elevation=-10.0))
    return teacher


def _cameras(elevation, azimuth) -> Cameras:
    return Cameras.orbit(elevation, azimuth, 2.0, RES)


def _latents(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class _UNetInputs:
    """Records the UNet's batch (sample, timestep, encoder_hidden_states) on every forward."""

    def __init__(self, unet) -> None:
        self.calls: list[dict] = []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        sample, timestep = args[:2]
        self.calls.append({"sample": sample.clone(), "t": timestep, "context": kwargs["encoder_hidden_states"].clone()})


def test_camera_embedding_matches_the_spec_test_vector():
    stable = camera_embedding(torch.tensor([-30.0]), torch.tensor([90.0]), "stable")
    assert stable.dtype == torch.float64
    spec = torch.tensor([[-0.5235988, 1.0, 6.123234e-17, 1.5707963]], dtype=torch.float64)
    assert torch.allclose(stable, spec, atol=printed(7), rtol=0)
    xl = camera_embedding(torch.tensor([-30.0]), torch.tensor([90.0]), "xl")
    assert torch.allclose(xl, torch.tensor([[-0.5235988, 1.0, 0.0, 0.0]], dtype=torch.float64), atol=1e-12)
    # Stable Zero123's 4th entry is the reference view's polar angle; Zero123-XL's is Δradius = 0
    above = camera_embedding(torch.tensor([0.0, 10.0]), torch.tensor([180.0, -90.0]), "stable", reference_elevation=-20.0)
    assert torch.allclose(above[:, 3], torch.full((2,), math.radians(70.0), dtype=torch.float64))
    assert torch.allclose(above[:, :3], torch.tensor([[0.0, 0.0, -1.0], [math.radians(10), -1.0, 0.0]], dtype=torch.float64), atol=1e-12)
    with pytest.raises(UserError, match="unknown Zero123 variant 'plus'"):
        camera_embedding(torch.zeros(1), torch.zeros(1), "plus")


def test_loads_in_fp32_on_cpu_with_the_checkpoint_schedule(tiny_dir):
    teacher = Zero123Teacher.from_pretrained(tiny_dir, device="cpu")
    for module in (teacher.unet, teacher.vae, teacher.image_encoder, teacher.camera_projection):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert teacher.resolution == RES and teacher.latent_shape(3) == (3, 4, 8, 8)
    assert teacher.alphas_cumprod[0].item() == pytest.approx(0.999150, abs=printed(6))
    assert teacher.alphas_cumprod[951].item() == pytest.approx(0.008155, abs=printed(6))
    saved = load_file(str(tiny_dir / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(teacher.camera_projection.proj.weight, saved["proj.weight"])
    bf16 = Zero123Teacher.from_pretrained(tiny_dir, device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.image_encoder.visual_projection.weight.dtype == torch.bfloat16


def test_prepare_needs_an_image(tiny_dir):
    teacher = Zero123Teacher.from_pretrained(tiny_dir, device="cpu")
    with pytest.raises(UserError, match="conditioned on an image"):
        teacher.prepare(Condition(prompt="a cat"))
    with pytest.raises(RuntimeError, match="prepare"):
        teacher.predict_noise(_latents(1), 1, _cameras([0.0], [0.0]), "cond")


def test_clip_branch_matches_a_plain_pil_reference(teacher, reference_image):
    """uint8 PIL → bicubic resize to 224-style size → centre crop → CLIP mean/std → image_embeds (not normalised)."""
    pixels = (reference_image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    resized = Image.fromarray(pixels).resize((TINY_CLIP_IMAGE, TINY_CLIP_IMAGE), Image.BICUBIC)
    x = (np.asarray(resized, dtype=np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    expected_values = torch.from_numpy(x).permute(2, 0, 1)[None]  # float64
    pixel_values = clip_pixel_values(teacher.image_processor, reference_image)
    # the processor rescales and normalises in float32: 3 roundings of values up to max|expected|
    assert_within(pixel_values, expected_values, rounding_bound(np.abs(x).max(), ops=3), "CLIP pixel values")
    expected = teacher.image_encoder(pixel_values).image_embeds
    assert torch.equal(teacher._image_embeds, expected)
    assert not torch.allclose(expected.norm(dim=-1), torch.ones(1), atol=1e-3)


def test_reference_latent_is_the_unscaled_posterior(tiny_dir, reference_image):
    mean = Zero123Teacher.from_pretrained(tiny_dir, device="cpu")
    mean.prepare(Condition(image=reference_image))
    posterior = mean.vae.encode(reference_image * 2 - 1).latent_dist
    assert torch.equal(mean._image_latent, posterior.mean)

    draws = []
    for _ in range(2):
        sampled = Zero123Teacher.from_pretrained(tiny_dir, device="cpu")
        sampled.prepare(Condition(image=reference_image), torch.Generator().manual_seed(7))
        draws.append(sampled._image_latent)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(draws[0], posterior.mean + posterior.std * noise)
    assert torch.equal(draws[0], draws[1])


def test_context_uses_views_relative_to_the_reference(teacher):
    cameras = _cameras([20.0, -10.0], [90.0, -45.0])  # reference at elevation -10, azimuth 0
    t = camera_embedding(torch.tensor([30.0, 0.0]), torch.tensor([90.0, -45.0]), "stable", -10.0).float()
    embeds = teacher._image_embeds.expand(2, -1)
    expected = teacher.camera_projection.proj(torch.cat([embeds, t], -1))[:, None]
    assert torch.equal(teacher.context(cameras), expected)
    assert teacher.context(cameras).shape == (2, 1, 32)


def test_guided_batch_is_cond_then_uncond_and_single_branches_run_b_samples(teacher):
    b, t, scale = 3, 501, 3.0
    cameras = _cameras([0.0, 15.0, -20.0], [30.0, 150.0, -90.0])
    z = _latents(b)
    hook = _UNetInputs(teacher.unet)
    guided = teacher.predict_noise(z, t, cameras, "guided", scale)
    cond = teacher.predict_noise(z, t, cameras, "cond")
    uncond = teacher.predict_noise(z, t, cameras, "uncond")
    hook.handle.remove()

    first, second, third = hook.calls
    assert [c["sample"].shape[0] for c in hook.calls] == [2 * b, b, b]
    assert first["sample"].shape[1] == 8 and torch.all(first["t"] == t)
    image_latent = teacher._image_latent.expand(b, -1, -1, -1)
    assert torch.equal(first["sample"][:, :4], torch.cat([z, z]))
    assert torch.equal(first["sample"][:b, 4:], image_latent)  # cond half first ...
    assert torch.count_nonzero(first["sample"][b:, 4:]) == 0  # ... uncond half: zero concat latent
    assert torch.equal(first["context"][:b], teacher.context(cameras))
    assert torch.count_nonzero(first["context"][b:]) == 0  # zero *projected* embedding
    assert torch.equal(second["sample"], first["sample"][:b]) and torch.equal(third["sample"], first["sample"][b:])
    assert torch.count_nonzero(third["context"]) == 0

    assert guided.shape == cond.shape == uncond.shape == (b, 4, 8, 8)
    # a batch of 2b and two of b may take different kernels: each is within its rounding bound, amplified by guidance
    bound = network_bound(max(cond.abs().max().item(), uncond.abs().max().item()), teacher.unet)
    assert_within(guided, guide(uncond, cond, scale), 2 * guidance_gain(scale) * bound, "guided batch vs branches")
    assert (cond - uncond).abs().max() > 100 * bound
    assert teacher.evaluations.as_dict() == {"total": 3, "guided": 1, "single_branch": 2, "view_evaluations": 4 * b}


def test_only_the_conditional_branch_depends_on_the_view(teacher):
    z = _latents(1)
    a, b = _cameras([0.0], [0.0]), _cameras([-30.0], [120.0])
    assert torch.equal(teacher.predict_noise(z, 301, a, "uncond"), teacher.predict_noise(z, 301, b, "uncond"))
    assert not torch.allclose(teacher.predict_noise(z, 301, a, "cond"), teacher.predict_noise(z, 301, b, "cond"), atol=1e-4)


def test_encode_and_decode(teacher):
    images = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    z = teacher.encode(images)
    expected = teacher.vae.encode(images * 2 - 1).latent_dist.mean * 0.18215
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    assert torch.equal(z, expected)
    larger = F.interpolate(images, (24, 24), mode="bilinear", align_corners=False)
    resized = F.interpolate(larger, (RES, RES), mode="bicubic", align_corners=False)
    assert torch.equal(teacher.encode(larger), teacher.encode(resized))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(teacher.encode(images, g1), teacher.encode(images, g2))
    assert not torch.allclose(teacher.encode(images, torch.Generator().manual_seed(6)), z, atol=1e-4)
    decoded = teacher.decode(z)
    y = teacher.vae.decode(z / 0.18215).sample
    assert decoded.shape == (2, 3, RES, RES)
    assert torch.equal(decoded, ((y + 1) / 2).clamp(0, 1))
    assert decoded.min() >= 0 and decoded.max() <= 1


def test_loading_errors_reach_the_user(tiny_dir, tmp_path):
    broken = Path(shutil.copytree(tiny_dir, tmp_path / "missing"))
    path = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    weights.pop("conv_in.weight")
    weights["conv_in.scale"] = torch.ones(1)
    save_file(weights, str(path))
    with pytest.raises(UserError, match=r"missing keys 'conv_in\.weight'; unexpected keys 'conv_in\.scale'") as info:
        Zero123Teacher.from_pretrained(broken, device="cpu")
    assert str(path) in str(info.value)

    pickled = Path(shutil.copytree(tiny_dir, tmp_path / "pickled"))
    (pickled / "vae" / "diffusion_pytorch_model.safetensors").rename(pickled / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match=r"diffusion_pytorch_model\.bin: only \.safetensors"):
        Zero123Teacher.from_pretrained(pickled, device="cpu")

    four = Path(shutil.copytree(tiny_dir, tmp_path / "four"))
    shutil.rmtree(four / "unet")
    save_diffusers(four, "unet", tiny_unet(in_channels=4))
    with pytest.raises(UserError, match="not a Zero123 UNet: it takes 4 channels"):
        Zero123Teacher.from_pretrained(four, device="cpu")

    with pytest.raises(UserError, match="unknown Zero123 variant"):
        Zero123Teacher.from_pretrained(tiny_dir, variant="plus")


def test_unknown_hub_id_offline_is_a_user_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="--model"):
        Zero123Teacher.from_pretrained("nobody/zero123-nothing", cache_dir=tmp_path)


def test_one_sir_iteration_with_the_tiny_teacher(tiny_dir, reference_image):
    """Init targets from noise, then one refinement (N 10, t2 401, t1 201) and I L1 steps on a pixel 'model'."""

    def run(seed: int):
        g = torch.Generator().manual_seed(seed)
        teacher = Zero123Teacher.from_pretrained(tiny_dir, device="cpu")
        teacher.prepare(Condition(image=reference_image), g)
        cameras = _cameras([0.0, -15.0], [0.0, 180.0])
        init = init_sample(teacher, cameras, 10, 0.5, 3.0, g, out_size=(RES, RES))
        counts = dict(teacher.evaluations.as_dict())
        images = torch.nn.Parameter(torch.full((2, 3, RES, RES), 0.5))
        target = refine(teacher, images.detach(), cameras, 201, 401, 10, 0.5, 3.0, g)
        optimiser = torch.optim.Adam([images], lr=0.05)
        losses = []
        for _ in range(5):
            loss = (images - target).abs().sum() / images.shape[0]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        return init, target, counts, teacher.evaluations.as_dict(), losses

    init, target, init_counts, counts, losses = run(0)
    assert init.shape == target.shape == (2, 3, RES, RES)
    assert 0 <= target.min() and target.max() <= 1 and torch.isfinite(init).all()
    assert init_counts == {"total": 10, "guided": 10, "single_branch": 0, "view_evaluations": 40}
    # inversion 201→401 takes 2 unconditional passes, sampling 401→1 five guided passes
    assert counts == {"total": 17, "guided": 15, "single_branch": 2, "view_evaluations": 64}
    assert losses[-1] < losses[0]
    again = run(0)
    assert torch.equal(again[0], init) and torch.equal(again[1], target)
    assert not torch.equal(run(1)[1], target)
