"""Zero123++ v1.1 as a multi-view generator, on a tiny checkpoint in the published layout: loading,
Euler-ancestral parity with diffusers, conditioning (ramp, reference attention, CFG), scaling, grid and poses."""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from microdreamer.errors import UserError
from microdreamer.generators.euler_ancestral import EulerAncestral, trailing_timesteps
from microdreamer.generators.reference_attention import (
    ReferenceAttnProcessor,
    ReferenceBank,
    install_reference_attention,
)
from microdreamer.generators.zero123plus import (
    GRAY,
    Zero123PlusGenerator,
    ramped_context,
    rematte_on_white,
    split_grid,
    zero123plus_cameras,
)
from microdreamer.io.images import image_grid
from microdreamer.teachers.loading import ALLOW_PATTERNS, build_model, missing_files
from tiny_models import ZERO123PLUS_SCHEDULER, build_tiny_zero123plus, tiny_ramp

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = torch.finfo(torch.float32).eps
VIEW = 8  # tiny view size: grid 24×16 pixels, latents 12×8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_zero123plus(tmp_path_factory.mktemp("zero123plus") / "model")


@pytest.fixture(scope="module")
def generator(tiny_dir) -> Zero123PlusGenerator:
    return Zero123PlusGenerator.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(5))


def _diffusers_scheduler(**changes):
    from diffusers import EulerAncestralDiscreteScheduler

    config = {**ZERO123PLUS_SCHEDULER, "timestep_spacing": "trailing", **changes}
    return EulerAncestralDiscreteScheduler.from_config(config)


# loading -----------------------------------------------------------------------------------------------


def test_loads_the_published_layout(tiny_dir, generator):
    from diffusers import EulerAncestralDiscreteScheduler
    from transformers import CLIPVisionModelWithProjection

    assert missing_files(tiny_dir) == []
    files = [p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file()]
    unfetched = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in ALLOW_PATTERNS)]
    assert unfetched == []  # a download fetches every file the layout needs
    assert generator.prediction == "v_prediction"
    reference = EulerAncestralDiscreteScheduler.from_config(ZERO123PLUS_SCHEDULER).alphas_cumprod
    assert torch.allclose(generator.alphas_cumprod.float(), reference, rtol=1000 * EPS32)  # linear betas, float32 there
    assert generator.ramp.tolist() == tiny_ramp(0)
    vision = CLIPVisionModelWithProjection.from_pretrained(str(tiny_dir / "vision_encoder")).eval()
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vision(pixels).image_embeds, generator.vision_encoder(pixels).image_embeds)


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def test_loading_is_strict(tiny_dir, tmp_path):
    root = _copy(tiny_dir, tmp_path)
    weights = root / "vision_encoder" / "model.safetensors"
    state = load_file(str(weights))
    del state["visual_projection.weight"]
    save_file(state, str(weights))
    with pytest.raises(UserError, match="missing keys 'visual_projection.weight'"):
        Zero123PlusGenerator.from_pretrained(root)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vision_encoder": ["transformers", "CLIPVisionModel"]}, "component 'vision_encoder' is CLIPVisionModel"),
        ({"ramping_coefficients": None}, "has no list of ramping_coefficients"),
        ({"ramping_coefficients": [0.5] * 76}, "76 ramping_coefficients, the text encoder 77 tokens"),
    ],
)
def test_wrong_model_index_is_refused(tiny_dir, tmp_path, change, message):
    root = _copy(tiny_dir, tmp_path)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, **change}))
    with pytest.raises(UserError, match=message):
        Zero123PlusGenerator.from_pretrained(root)


def test_offline_without_the_model_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="'sudo-ai/zero123plus-v1.1' is not in the Hugging Face cache") as info:
        Zero123PlusGenerator.from_pretrained(None, allow_download=False, cache_dir=tmp_path / "hub")
    assert "\n" not in str(info.value)


# Euler-ancestral against diffusers ------------------------------------------------------------------------


def test_trailing_timesteps_match_diffusers():
    scheduler = _diffusers_scheduler()
    for n in range(1, 201):
        scheduler.set_timesteps(n)
        theirs = scheduler.timesteps.tolist()
        ours = trailing_timesteps(n)
        assert len(ours) == n
        if len(theirs) == n + 1:  # a float residue adds t = −1 there (n = 61, 103, …); we keep n steps
            assert theirs[-1] == -1.0
            theirs = theirs[:n]
        assert theirs == ours, n
    assert trailing_timesteps(28)[:4] == [999, 963, 928, 892] and trailing_timesteps(4) == [999, 749, 499, 249]


@pytest.mark.parametrize("steps", [28, 75])
def test_sigmas_match_diffusers_within_its_float32_table(generator, steps):
    scheduler = _diffusers_scheduler()
    scheduler.set_timesteps(steps)
    schedule = EulerAncestral.trailing(generator.alphas_cumprod, steps, "v_prediction")
    theirs = scheduler.sigmas.double()
    assert schedule.sigmas[-1] == 0.0 and theirs[-1] == 0.0
    assert schedule.init_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-5)
    for i, t in enumerate(schedule.timesteps):
        # diffusers' ᾱ_t is a float32 product of t + 1 factors (relative error ≤ (t + 1)·eps); σ = sqrt((1 − ᾱ)/ᾱ)
        # magnifies it by 1 / (2(1 − ᾱ)); the float32 σ adds one more rounding
        a = float(generator.alphas_cumprod[t])
        bound = (t + 2) * EPS32 / (2 * (1 - a)) + EPS32
        assert abs(schedule.sigmas[i] / float(theirs[i]) - 1) <= bound, (t, schedule.sigmas[i], float(theirs[i]))


@pytest.mark.parametrize("prediction, steps", [("v_prediction", 28), ("v_prediction", 3), ("epsilon", 5)])
def test_euler_ancestral_steps_match_diffusers(prediction, steps):
    """Step by step on diffusers' own grid and sigmas, with the same generator: the same input scaling, noise
    injection and ancestral steps up to float32 rounding."""
    scheduler = _diffusers_scheduler(prediction_type=prediction)
    scheduler.set_timesteps(steps)
    schedule = EulerAncestral(
        tuple(int(t) for t in scheduler.timesteps), tuple(float(s) for s in scheduler.sigmas), prediction
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, generator=g) * float(scheduler.init_noise_sigma)
    ours_g, theirs_g = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for i, t in enumerate(scheduler.timesteps):
        sigma, sigma_up = schedule.sigmas[i], 0.0
        scaled = scheduler.scale_model_input(x, t)
        torch.testing.assert_close(schedule.scale_input(x, i), scaled, rtol=4 * EPS32, atol=0)
        output = torch.randn(x.shape, generator=g)
        noise_part = torch.randn(x.shape, generator=g)
        torch.testing.assert_close(
            schedule.add_noise(x, noise_part, i), scheduler.add_noise(x, noise_part, t.reshape(1)), rtol=0,
            atol=4 * EPS32 * (x.abs().max() + sigma * noise_part.abs().max()).item(),
        )
        ours = schedule.step(output, x, i, ours_g)
        theirs = scheduler.step(output, t, x, generator=theirs_g).prev_sample
        # ~10 float32 operations on terms no larger than |x| + (σ + 1)|output| + σ_up·|noise| (|noise| < 6)
        if i + 1 < len(schedule):
            s_next = schedule.sigmas[i + 1]
            sigma_up = math.sqrt(s_next**2 * (sigma**2 - s_next**2) / sigma**2)
        scale = x.abs().max() + (sigma + 1) * output.abs().max() + 6 * sigma_up
        torch.testing.assert_close(ours, theirs, rtol=0, atol=16 * EPS32 * scale.item())
        x = theirs
    assert torch.equal(torch.randn(3, generator=ours_g), torch.randn(3, generator=theirs_g))  # same draws


def test_v_prediction_recovers_x0_exactly():
    """With v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 at the network input z = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε, the step's x0 is x0."""
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    schedule = EulerAncestral.trailing(alphas, 4, "v_prediction")
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    for i, t in enumerate(schedule.timesteps):
        a = float(alphas[t])
        x = schedule.add_noise(x0, eps, i)
        v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0
        assert torch.allclose(schedule.predicted_x0(v, x, i), x0, atol=1e-12)
        assert torch.allclose(schedule.scale_input(x, i), math.sqrt(a) * x0 + math.sqrt(1 - a) * eps, atol=1e-12)


# conditioning ---------------------------------------------------------------------------------------------


def test_ramped_context_by_hand():
    text = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    embeds = torch.tensor([[10.0, -1.0]])
    ramp = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    expected = torch.tensor([[[1.0, 2.0], [8.0, 3.5], [25.0, 4.0]]])
    assert torch.equal(ramped_context(text, embeds, ramp), expected)


def test_condition_follows_the_published_pipeline(tiny_dir, generator, image):
    """cond context = empty-prompt states + ramp ⊗ CLIP image embedding; uncond = the plain empty-prompt states;
    references = raw VAE samples of the (x − 0.5)/0.8 image and of an all-zero one, drawn in that order."""
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from microdreamer.teachers.sd_parts import clip_pixel_values

    conditioning = generator.condition(image, torch.Generator().manual_seed(4), guided=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(tiny_dir / "text_encoder")).eval()
    ids = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty = text_encoder(ids).last_hidden_state
    vision = CLIPVisionModelWithProjection.from_pretrained(str(tiny_dir / "vision_encoder")).eval()
    clip = CLIPImageProcessor.from_pretrained(str(tiny_dir / "feature_extractor_clip"))
    embeds = vision(clip_pixel_values(clip, image)).image_embeds
    ramp = torch.tensor(tiny_ramp(0))
    with torch.no_grad():
        assert conditioning.context.shape == (2, 77, 32)
        torch.testing.assert_close(conditioning.context[0], empty[0])
        torch.testing.assert_close(conditioning.context[1], empty[0] + ramp[:, None] * embeds[0])
        vae_processor = CLIPImageProcessor.from_pretrained(str(tiny_dir / "feature_extractor_vae"))
        for value, normalised in ((GRAY, (127 / 255 - 0.5) / 0.8), (1.0, 0.625)):  # (x − 0.5)/0.8 = [−1, 1]·0.625
            flat = clip_pixel_values(vae_processor, torch.full((1, 3, 24, 24), value))
            assert flat.shape == (1, 3, 16, 16) and torch.allclose(flat, torch.tensor(normalised), atol=1e-6)
        pixels = clip_pixel_values(vae_processor, image)
        g = torch.Generator().manual_seed(4)
        cond = generator.vae.encode(pixels).latent_dist
        cond = cond.mean + cond.std * torch.randn(cond.mean.shape, generator=g)
        negative = generator.vae.encode(torch.zeros_like(pixels)).latent_dist
        negative = negative.mean + negative.std * torch.randn(negative.mean.shape, generator=g)
    torch.testing.assert_close(conditioning.reference, torch.cat([negative, cond]))
    single = generator.condition(image, torch.Generator().manual_seed(4), guided=False)
    torch.testing.assert_close(single.context, conditioning.context[1:])
    torch.testing.assert_close(single.reference, cond)


def test_reference_processor_attends_to_recorded_keys_and_values():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    bank = ReferenceBank()
    attn.set_processor(ReferenceAttnProcessor("layer", bank, AttnProcessor2_0()))
    x, ref = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        with bank.writing():
            written = attn(ref)
        plain = attn(ref)
        assert torch.equal(bank.tokens["layer"], ref) and torch.allclose(written, plain)  # writing attends as usual
        with bank.reading():
            read = attn(x)
        assert bank.tokens == {} and bank.mode == "off"
        # by hand: queries from x, keys and values from [x ; ref], per head
        both = torch.cat([x, ref], dim=1)
        heads = lambda t: t.view(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(both)), heads(attn.to_v(both))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        expected = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(read, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="no reference tokens recorded for layer"), bank.reading():
        attn(x)


def test_write_pass_records_every_self_attention_input(tiny_dir):
    unet = build_model(tiny_dir, "unet", device="cpu", dtype=torch.float32)
    inputs: dict[str, torch.Tensor] = {}
    names = [n for n, m in unet.named_modules() if n.endswith(".attn1")]
    record = lambda n: lambda module, args: inputs.__setitem__(n, args[0])  # noqa: E731
    hooks = [unet.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    bank = install_reference_attention(unet)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = unet(sample, 500, encoder_hidden_states=context).sample
        with bank.writing():
            written = unet(sample, 500, encoder_hidden_states=context).sample
    for hook in hooks:
        hook.remove()
    assert len(names) == 4 and sorted(bank.tokens) == sorted(names)  # 1 down, 1 mid and 2 up transformer blocks
    assert all(torch.equal(bank.tokens[n], inputs[n]) for n in names)
    assert torch.equal(written, plain)
    kinds = {n: type(p).__name__ for n, p in unet.attn_processors.items()}
    assert {k for n, k in kinds.items() if ".attn2." in n} == {"AttnProcessor2_0"}  # cross-attention untouched


class _UNetCalls:
    """Records every UNet call's sample, timestep, context and output."""

    def __init__(self, unet) -> None:
        self.calls: list[dict] = []
        self.handles = [
            unet.register_forward_pre_hook(self.before, with_kwargs=True),
            unet.register_forward_hook(self.after),
        ]

    def before(self, module, args, kwargs):
        context = kwargs["encoder_hidden_states"]
        self.calls.append({"sample": args[0].clone(), "t": args[1].clone(), "context": context.clone()})

    def after(self, module, args, output):
        self.calls[-1]["output"] = output.sample.clone()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_each_step_runs_the_noised_condition_latent_then_the_sample(generator, image):
    """Step 0 of a seeded run: the write pass sees (reference + σ₀·n)/sqrt(σ₀² + 1) with the run's next draw n,
    the read pass the scaled starting noise, both at t = 999 with the [uncond ; cond] context; the guided output
    is uncond + s·(cond − uncond) of the read pass."""
    calls = _UNetCalls(generator.unet)
    try:
        generator.generate(image, torch.Generator().manual_seed(9), steps=2, guidance_scale=3.0, view_size=VIEW)
    finally:
        calls.remove()
    assert len(calls.calls) == 4  # (write, read) per step
    g = torch.Generator().manual_seed(9)
    conditioning = generator.condition(image, g, guided=True)
    schedule = EulerAncestral.trailing(generator.alphas_cumprod, 2, "v_prediction")
    sigma = schedule.sigmas[0]
    start = torch.randn(1, 4, 12, 8, generator=g) * sigma
    noise = torch.randn(conditioning.reference.shape, generator=g)
    write, read = calls.calls[0], calls.calls[1]
    torch.testing.assert_close(write["sample"], (conditioning.reference + sigma * noise) / math.sqrt(sigma**2 + 1))
    torch.testing.assert_close(read["sample"], start.expand(2, -1, -1, -1) / math.sqrt(sigma**2 + 1))
    assert write["t"].tolist() == read["t"].tolist() == [999.0, 999.0]
    assert calls.calls[2]["t"].tolist() == [499.0, 499.0]
    assert torch.equal(write["context"], conditioning.context) and torch.equal(read["context"], conditioning.context)
    # the guided v of step 0, through the ancestral step, gives step 1's sample
    uncond, cond = read["output"].chunk(2)
    guided = uncond + 3.0 * (cond - uncond)
    g_step = torch.Generator().manual_seed(9)
    generator.condition(image, g_step, guided=True)
    torch.randn(1, 4, 12, 8, generator=g_step)  # the starting noise
    torch.randn(conditioning.reference.shape, generator=g_step)  # step 0's reference noise
    expected = schedule.step(guided, start, 0, g_step)
    torch.testing.assert_close(calls.calls[3]["sample"][:1], expected / math.sqrt(schedule.sigmas[1] ** 2 + 1))


def test_reference_attention_carries_the_condition_latent(tiny_dir, image):
    """With the image embedding's ramp zeroed, two condition images still give different outputs, and only
    through reference attention: with it removed they give the same."""
    generator = Zero123PlusGenerator.from_pretrained(tiny_dir)
    generator.ramp.zero_()
    other = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(6))
    schedule = EulerAncestral.trailing(generator.alphas_cumprod, 4, "v_prediction")
    latents = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(1))

    def output(img):
        g = torch.Generator().manual_seed(2)
        conditioning = generator.condition(img, g, guided=False)
        return generator.model_output(latents, 1, schedule, conditioning, g, 1.0)

    first, second = output(image), output(other)
    assert (first - second).abs().max() > 1e-3
    for name, module in generator.unet.named_modules():
        if name.endswith(".attn1"):
            module.set_processor(module.processor.inner)
    first, second = output(image), output(other)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_without_guidance_only_the_conditional_half_runs(generator, image):
    calls = _UNetCalls(generator.unet)
    try:
        generator.generate(image, torch.Generator().manual_seed(0), steps=1, guidance_scale=1.0, view_size=VIEW)
    finally:
        calls.remove()
    assert [c["sample"].shape[0] for c in calls.calls] == [1, 1]
    conditioning = generator.condition(image, torch.Generator().manual_seed(0), guided=False)
    assert torch.equal(calls.calls[1]["context"], conditioning.context)


# output -----------------------------------------------------------------------------------------------------


def test_decode_undoes_the_v11_latent_and_image_scaling(generator):
    latents = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image = generator.vae.decode((latents / 0.75 + 0.22) / 0.18215).sample * 1.6  # spec §4.4
    torch.testing.assert_close(generator.decode(latents), ((image + 1) / 2).clamp(0, 1))


def test_generate_is_deterministic_with_a_seed(generator, image):
    def run(seed: int):
        return generator.generate(image, torch.Generator().manual_seed(seed), steps=3, view_size=VIEW)

    first, again, other = run(1), run(1), run(2)
    assert first.grid.shape == (1, 3, 24, 16) and first.views.shape == (6, 3, VIEW, VIEW)
    assert first.latents.shape == (1, 4, 12, 8)
    assert torch.equal(first.grid, again.grid) and torch.equal(first.latents, again.latents)
    assert (first.grid - other.grid).abs().max() > 1e-3
    assert torch.equal(first.views, split_grid(first.grid))
    assert len(first.cameras) == 6 and first.cameras.width == VIEW
    with pytest.raises(UserError, match="view size must be a positive multiple of 2, got 7"):
        generator.generate(image, torch.Generator(), view_size=7)
    with pytest.raises(UserError, match="steps must lie in 1..1000, got 0"):
        generator.generate(image, torch.Generator(), steps=0, view_size=VIEW)
    with pytest.raises(UserError, match=r"one RGB image \[1,3,H,W\], got \[1, 4, 24, 24\]"):
        generator.generate(torch.rand(1, 4, 24, 24), torch.Generator(), view_size=VIEW)


def test_grid_splits_row_major():
    size = 4
    grid = torch.zeros(1, 3, 3 * size, 2 * size)
    for k in range(6):
        row, col = divmod(k, 2)
        cell = k / 10 + torch.rand(3, size, size) / 20
        grid[:, :, row * size : (row + 1) * size, col * size : (col + 1) * size] = cell
    views = split_grid(grid)
    assert views.shape == (6, 3, size, size)
    assert [round(float(v.min()) * 10) for v in views] == [0, 1, 2, 3, 4, 5]
    assert np.array_equal(image_grid(views, cols=2), image_grid(grid, cols=1))  # tiling back gives the grid
    with pytest.raises(ValueError, match="3×2 grid of square views cannot be 12×10"):
        split_grid(torch.zeros(1, 3, 12, 10))


def test_view_poses_in_our_convention():
    """v1.1 views: azimuth 30 + 60k relative to the input, 30° above / 20° below (Zero123++ counts up as
    positive). Cross-check against a z-up world with positive elevation above and azimuth from +x towards +y
    (InstantMesh's convention for the same views), mapped to ours (y up) by x→z, y→x, z→y."""
    cameras = zero123plus_cameras(reference_azimuth=0.0, radius=2.0, fovy=30.0, resolution=64)
    assert cameras.elevation.tolist() == [-30.0, 20.0, -30.0, 20.0, -30.0, 20.0]
    assert cameras.azimuth.tolist() == [30.0, 90.0, 150.0, 210.0, 270.0, 330.0]
    az = np.deg2rad([30, 90, 150, 210, 270, 330])
    el = np.deg2rad([30, -20, 30, -20, 30, -20])
    z_up = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1) * 2.0
    ours = z_up[:, [1, 2, 0]]
    assert np.allclose(cameras.centers().numpy(), ours, atol=1e-5)
    assert (cameras.centers()[0::2, 1] > 0).all() and (cameras.centers()[1::2, 1] < 0).all()  # y up: above, below
    forward = cameras.c2w[:, :3, 2]  # OpenGL cameras look along −z: the third column points away from the origin
    assert torch.allclose(forward, cameras.centers() / 2.0, atol=1e-6)
    turned = zero123plus_cameras(reference_azimuth=90.0)
    assert turned.azimuth.tolist() == [120.0, 180.0, 240.0, 300.0, 360.0, 420.0]
    assert (turned.fovy, turned.width, float(turned.radius[0])) == (30.0, 320, 4.0)


def test_rematte_turns_the_gray_background_white():
    size = 32
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    coverage = ((8.0 - ((yy - 16) ** 2 + (xx - 16) ** 2).sqrt()) + 0.5).clamp(0, 1)  # a disc with a 1-pixel soft rim
    red = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    view = (coverage * red + (1 - coverage) * GRAY)[None]
    view = torch.round(view * 255) / 255  # an 8-bit image, as the generator's views end up
    white = rematte_on_white(view)[0]
    expected = coverage * red + (1 - coverage) * 1.0
    assert torch.allclose(white[:, coverage == 0], torch.ones(1), atol=1 / 255)
    assert torch.allclose(white[:, coverage == 1], view[0][:, coverage == 1])  # the object is untouched
    rim = (coverage > 0) & (coverage < 1)
    assert rim.any() and (white[:, rim] - expected[:, rim]).abs().max() < 0.05  # coverage estimated from 8 bits


# registry and catalog ---------------------------------------------------------------------------------------


def test_zero123plus_is_refused_as_an_sir_teacher(capsys):
    from microdreamer.cli import main
    from microdreamer.teachers.registry import TEACHERS, teacher_entry

    with pytest.raises(UserError, match="fixed-view multi-view generator, not an SIR teacher") as info:
        teacher_entry("zero123plus")
    assert "\n" not in str(info.value) and "--method lgm" in str(info.value)
    assert "zero123plus" not in TEACHERS
    assert main(["image2gs", "--teacher", "zero123plus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an SIR teacher" in err


def test_catalog_knows_zero123plus():
    from microdreamer.teachers.catalog import find_entry

    entry = find_entry("zero123plus")
    assert entry.repo_id == "sudo-ai/zero123plus-v1.1"
    assert not entry.commercial_use and "CC-BY-NC 4.0" in entry.license
    # fp16 bytes of the UNet, VAE, text and vision encoders (spec §4.1 parameter counts)
    assert entry.approx_size_gb == pytest.approx(2 * (865.9 + 83.65 + 340.4 + 632.1) / 1000, abs=0.05)
