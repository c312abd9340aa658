"""MVDream / ImageDream teachers on tiny checkpoints in the real layout: text and image conditioning, the
CFG batch, camera input, the ImageDream reference frame, loading errors, presets and a SIR run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from safetensors.torch import load_file, save_file

from microdreamer.config import resolve
from microdreamer.errors import UserError
from microdreamer.representations.gaussians import Gaussians
from microdreamer.sir.cameras import Cameras
from microdreamer.sir.engine import SIREngine
from microdreamer.sir.schedule import SIRSchedule
from microdreamer.teachers.base import Condition, guide
from microdreamer.teachers.mv_cameras import mvdream_camera
from microdreamer.teachers.mvdream import ImageDreamTeacher, MVDreamTeacher
from microdreamer.teachers.registry import TEACHERS, teacher_entry
from microdreamer.teachers.sd_parts import clip_pixel_values
from microdreamer.wording import shorten
from tiny_models import CLIP_MEAN, CLIP_STD, TINY_CLIP_IMAGE, build_tiny_mvdream, build_tiny_zero123
from tolerances import assert_within, guidance_gain, network_bound, printed, rounding_bound

RES = 16  # the tiny teachers' image size (latents 8×8)
NEGATIVE = "blurry, lowres"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mv_dir(tmp_path_factory) -> Path:
    return build_tiny_mvdream(tmp_path_factory.mktemp("mv") / "model")


@pytest.fixture(scope="module")
def id_dir(tmp_path_factory) -> Path:
    return build_tiny_mvdream(tmp_path_factory.mktemp("id") / "model", image_prompt=True)


@pytest.fixture(scope="module")
def reference_image() -> torch.Tensor:
    return torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(3))


@pytest.fixture()
def mvdream(mv_dir) -> MVDreamTeacher:
    teacher = MVDreamTeacher.from_pretrained(mv_dir, device="cpu")
    teacher.prepare(Condition(prompt="a cat", negative_prompt=NEGATIVE))
    return teacher


@pytest.fixture()
def imagedream(id_dir, reference_image) -> ImageDreamTeacher:
    teacher = ImageDreamTeacher.from_pretrained(id_dir, device="cpu")
    teacher.prepare(Condition(image=reference_image, prompt="a cat", negative_prompt=NEGATIVE))
    return teacher


def _cameras(azimuth, elevation=0.0, radius=2.5) -> Cameras:
    az = torch.as_tensor(azimuth, dtype=torch.float32)
    return Cameras.orbit(torch.full_like(az, elevation), az, radius, RES)


def _latents(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class _UNetCalls:
    """Records the keyword inputs of every multi-view UNet forward, and its output."""

    def __init__(self, unet) -> None:
        self.calls: list[dict] = []
        self.outputs: list[torch.Tensor] = []
        self.handles = [
            unet.register_forward_pre_hook(lambda m, a, kw: self.calls.append(dict(kw)), with_kwargs=True),
            unet.register_forward_hook(lambda m, a, out: self.outputs.append(out)),
        ]

    def __enter__(self) -> "_UNetCalls":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _eps_bound(teacher, eps: torch.Tensor, scale: float = 1.0) -> float:
    """Two float32 evaluations of the teacher's noise (any batch composition or order) differ by at most
    the sum of their rounding bounds, amplified by guidance."""
    return 2 * guidance_gain(scale) * network_bound(eps.abs().max().item(), teacher.unet)


def _token_ids(model_dir: Path, words: list[str]) -> torch.Tensor:
    """[bos, word tokens…, eos, pad "!"…] of length 77, looked up in vocab.json by hand."""
    vocab = json.loads((model_dir / "tokenizer" / "vocab.json").read_text())
    ids = [vocab["<|startoftext|>"], *(vocab[w] for w in words), vocab["<|endoftext|>"]]
    return torch.tensor([ids + [vocab["!"]] * (77 - len(ids))])


# ---------------------------------------------------------------------------------------------------------
# Loading and text conditioning


def test_loads_the_real_layout_with_the_checkpoint_schedule(mvdream, imagedream):
    for teacher in (mvdream, imagedream):
        assert teacher.resolution == RES and teacher.latent_shape(4) == (4, 4, 8, 8)
        assert teacher.reference_azimuth == 90.0  # the models' front view (spec §2.7)
        assert teacher.dtype == torch.float32 and not any(p.requires_grad for p in teacher.unet.parameters())
        np.testing.assert_allclose(teacher.alphas_cumprod[[0, 501, 999]].numpy(), [0.999150, 0.274999, 0.004660], atol=printed(6))
    assert imagedream.frames_per_object == 5 and mvdream.frames_per_object == 4


def test_text_tokens_are_the_last_hidden_state_of_the_padded_prompt(mvdream, mv_dir):
    ids = _token_ids(mv_dir, ["a</w>", "cat</w>"])
    expected = mvdream.text_encoder(ids).last_hidden_state
    assert expected.shape == (1, 77, 32)
    torch.testing.assert_close(mvdream.encode_text("a cat"), expected, atol=0, rtol=0)
    torch.testing.assert_close(mvdream.encode_text("  A   CAT "), expected, atol=0, rtol=0)  # normalised like CLIP
    # prepare() embeds the prompt and the negative prompt (empty when none)
    assert torch.equal(mvdream._text["cond"], expected)
    assert torch.equal(mvdream._text["uncond"], mvdream.encode_text(NEGATIVE))
    mvdream.prepare(Condition(prompt="a cat"))
    empty = mvdream.text_encoder(_token_ids(mv_dir, [])).last_hidden_state
    assert torch.equal(mvdream._text["uncond"], empty)


def test_quotes_unicode_and_long_prompts_embed(mvdream):
    prompts = ['a "quoted" cat\'s hat', "猫のぬいぐるみ, über-cute 🐱", "a cat " * 60]
    tokens = [mvdream.encode_text(p) for p in prompts]
    assert all(t.shape == (1, 77, 32) and torch.isfinite(t).all() for t in tokens)
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3
    ids = mvdream.tokenizer(prompts[2], padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == mvdream.tokenizer.eos_token_id  # truncated, still closed


def test_the_prompt_reader_knows_what_the_encoder_cuts_before_the_weights_load(mvdream, mv_dir, tmp_path):
    tokenizer = mvdream.tokenizer
    reader = MVDreamTeacher.prompt_reader(mv_dir)
    assert reader.length == 77
    # one word of k letters is k tokens in the tiny byte vocabulary: 75 of them fill the encoder with start
    # and end; 76 are one too many
    assert len(tokenizer("x" * 75).input_ids) == 77 and reader.cut("x" * 75) is None
    assert reader.cut("a cat") is None
    for prompt in ("x" * 76, "a cat " * 60):
        read = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids  # as encode_text
        assert reader.cut(prompt) == tokenizer.decode(read[1:-1])
    assert MVDreamTeacher.prompt_reader(tmp_path / "no-model") is None  # loading the teacher says why
    without_weights = tmp_path / "tokenizer-only"
    for part in ("model_index.json", "tokenizer", "text_encoder/config.json"):
        source, target = mv_dir / part, without_weights / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    assert MVDreamTeacher.prompt_reader(without_weights).cut("x" * 76) == "x" * 75


def test_a_long_prompt_is_named_as_cut_before_the_teacher_loads(tmp_path, capsys, monkeypatch, mv_dir):
    from microdreamer import pipeline
    from microdreamer.cli import main
    from microdreamer.errors import UserError

    def stop(*args, **kwargs):
        raise UserError("the teacher would load now")

    monkeypatch.setattr(pipeline.ImageTo3D, "__init__", stop)
    prompt = "a small red cat sitting on a wooden table next to a cup of coffee and old books on a grey rainy afternoon"
    out = tmp_path / "out"
    assert main(["text2gs", prompt, "--model", str(mv_dir), "--out", str(out), "--device", "cpu"]) == 2
    warning, *progress, error = capsys.readouterr().err.splitlines()
    head = f"warning: prompt '{shorten(prompt, 50)}' is longer than the 77 tokens mvdream reads: it is cut after '…"
    assert warning.startswith(head) and warning.endswith("'")
    tail = warning[len(head):-1]  # the last words read: the tiny vocabulary's tokens are mostly single letters
    assert 10 < len(tail) and 0 < prompt.index(tail) < len(prompt) - len(tail) - 5
    assert error == "error: the teacher would load now"
    assert progress == ["a_small_red_cat_sitting_on…to_a_cup_of_c: loading the teacher"]  # the stem, shortened
    assert main(["text2gs", prompt, "--model", str(mv_dir), "--out", str(out), "--device", "cpu", "-q"]) == 2
    assert capsys.readouterr().err == "error: the teacher would load now\n"  # --quiet: errors only


@pytest.mark.parametrize("prompt", [None, "", "   \n\t"])
def test_mvdream_needs_a_prompt(mv_dir, prompt):
    teacher = MVDreamTeacher.from_pretrained(mv_dir, device="cpu")
    with pytest.raises(UserError, match="empty prompt"):
        teacher.prepare(Condition(prompt=prompt))
    with pytest.raises(RuntimeError, match="prepare"):
        teacher.predict_noise(_latents(4), 501, _cameras([0, 90, 180, 270]))


# ---------------------------------------------------------------------------------------------------------
# The MVDream batch


def test_guided_batch_is_uncond_then_cond_with_cameras_per_view(mvdream):
    cameras = _cameras([0.0, 90.0, 180.0, 270.0], elevation=-15.0)
    x = _latents(4)
    with _UNetCalls(mvdream.unet) as rec:
        guided = mvdream.predict_noise(x, 501, cameras, "guided", 7.5)
    (call,) = rec.calls
    assert call["num_frames"] == 4 and call["x"].shape == (8, 4, 8, 8)
    assert torch.equal(call["x"], torch.cat([x, x])) and torch.equal(call["timesteps"], torch.full((8,), 501))
    assert torch.equal(call["context"][:4], mvdream.encode_text(NEGATIVE).expand(4, -1, -1))
    assert torch.equal(call["context"][4:], mvdream.encode_text("a cat").expand(4, -1, -1))
    assert torch.equal(call["camera"], mvdream_camera(cameras).repeat(2, 1))
    eps = rec.outputs[0]
    assert torch.equal(guided, guide(eps[:4], eps[4:], 7.5))
    # single branches run one object of 4 views and agree with the halves of the guided batch up to
    # rounding: a batch of 8 and one of 4 may take different BLAS/convolution kernels (AVX-512 does)
    uncond = mvdream.predict_noise(x, 501, cameras, "uncond")
    cond = mvdream.predict_noise(x, 501, cameras, "cond")
    assert_within(guided, guide(uncond, cond, 7.5), _eps_bound(mvdream, eps, 7.5), "guided batch vs branches")
    assert (cond - uncond).abs().max() > 100 * _eps_bound(mvdream, eps)  # the branches do differ
    assert mvdream.evaluations.as_dict() == {"total": 3, "guided": 1, "single_branch": 2, "view_evaluations": 16}


def test_camera_input_follows_the_spec_worked_examples(mvdream):
    with _UNetCalls(mvdream.unet) as rec:
        mvdream.predict_noise(_latents(4), 301, _cameras([0.0, 90.0, 180.0, 270.0]), "cond")
    camera = rec.calls[0]["camera"].reshape(4, 4, 4)
    # spec §2.7: el 0 az 0 and el 0 az 90 at any radius, after the Blender conversion and normalisation
    torch.testing.assert_close(camera[0], torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, -1], [0, 1, 0, 0], [0, 0, 0, 1]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(camera[1], torch.tensor([[0.0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]), atol=1e-6, rtol=0)


def test_permuting_views_permutes_the_noise_and_views_see_each_other(mvdream):
    cameras, x = _cameras([10.0, 100.0, 190.0, 280.0], elevation=-5.0), _latents(4, seed=1)
    eps = mvdream.predict_noise(x, 401, cameras, "guided", 7.5)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = mvdream.predict_noise(x[perm], 401, cameras[perm], "guided", 7.5)
    assert_within(permuted, eps[perm], _eps_bound(mvdream, eps, 7.5), "permuted views")

    changed = x.clone()
    changed[0] += 1.0
    diff = (mvdream.predict_noise(changed, 401, cameras, "guided", 7.5) - eps).abs().flatten(1).amax(1)
    assert (diff[1:] > 1e-4).all()  # joint attention across the 4 views

    moved = mvdream.predict_noise(x, 401, _cameras([10.0, 100.0, 190.0, 250.0], elevation=-5.0), "cond")
    assert (moved - mvdream.predict_noise(x, 401, cameras, "cond")).abs().max() > 1e-4  # cameras matter


def test_eight_views_are_two_independent_objects(mvdream):
    cameras = _cameras([0.0, 90.0, 180.0, 270.0, 45.0, 135.0, 225.0, 315.0])
    x = _latents(8, seed=2)
    both = mvdream.predict_noise(x, 601, cameras, "guided", 7.5)
    first = mvdream.predict_noise(x[:4], 601, cameras[:4], "guided", 7.5)
    assert_within(both[:4], first, _eps_bound(mvdream, both, 7.5), "first object of two vs alone")


def test_views_come_in_groups_of_four(mvdream, mv_dir):
    with pytest.raises(UserError, match="groups of 4"):
        mvdream.predict_noise(_latents(6), 501, _cameras([0, 60, 120, 180, 240, 300]), "guided", 7.5)
    cfg = resolve("mvdream", overrides={"teacher": {"model": str(mv_dir)}, "cameras": {"views": 6}})
    with pytest.raises(UserError, match="multiple of 4"):
        teacher_entry("mvdream").build(cfg, torch.device("cpu"), False)


def test_encode_decode_and_sampling_from_noise(mvdream):
    images = torch.rand(4, 3, 2 * RES, 2 * RES, generator=torch.Generator().manual_seed(4))
    z = mvdream.encode(images)  # bilinear to the teacher's resolution, posterior mean × 0.18215
    small = torch.nn.functional.interpolate(images, (RES, RES), mode="bilinear", align_corners=False)
    expected = mvdream.vae.encode(small * 2 - 1).latent_dist.mean * 0.18215
    assert torch.equal(z, expected)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(mvdream.encode(images, g1), mvdream.encode(images, g2)) and not torch.equal(mvdream.encode(images, g1), z)
    out = mvdream.decode(z)
    assert out.shape == (4, 3, RES, RES) and 0 <= out.min() and out.max() <= 1


# ---------------------------------------------------------------------------------------------------------
# ImageDream


def test_image_features_are_clip_penultimate_hidden_states(imagedream, reference_image):
    pixels = (reference_image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    resized = np.asarray(Image.fromarray(pixels).resize((TINY_CLIP_IMAGE, TINY_CLIP_IMAGE), Image.BICUBIC))
    normalised = (resized / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    expected = torch.from_numpy(normalised).permute(2, 0, 1)[None]  # float64
    values = clip_pixel_values(imagedream.image_processor, reference_image)
    # the processor rescales and normalises in float32: 3 roundings of values up to max|expected|
    assert_within(values, expected, rounding_bound(expected.abs().max().item(), ops=3), "CLIP pixel values")
    out = imagedream.image_encoder(values, output_hidden_states=True)
    features = imagedream._image_features
    assert features.shape == (1, 17, 32)  # 16 patches + CLS at the tiny size; 257 × 1280 for ViT-H/14
    assert torch.equal(features, out.hidden_states[-2])
    assert (features - out.last_hidden_state).abs().max() > 1e-2


def test_reference_frame_is_injected_and_dropped(imagedream, reference_image):
    cameras, x = _cameras([-80.0, 10.0, 100.0, 190.0], elevation=-3.0), _latents(4, seed=5)
    with _UNetCalls(imagedream.unet) as rec:
        guided = imagedream.predict_noise(x, 501, cameras, "guided", 2.0)
    (call,) = rec.calls
    assert call["num_frames"] == 5 and call["x"].shape == (10, 4, 8, 8) and guided.shape == (4, 4, 8, 8)
    views = call["x"].reshape(2, 5, 4, 8, 8)
    assert torch.equal(views[:, :4], x.expand(2, -1, -1, -1, -1)) and (views[:, 4] == 0).all()
    camera = call["camera"].reshape(2, 5, 16)
    assert torch.equal(camera[:, :4], mvdream_camera(cameras).expand(2, -1, -1)) and (camera[:, 4] == 0).all()
    # [uncond ; cond]: zero image features and zero reference latent, then the real ones (latent scaled)
    assert (call["ip"][:5] == 0).all() and (call["ip_img"][0] == 0).all()
    assert torch.equal(call["ip"][5:], imagedream._image_features.expand(5, -1, -1))
    assert torch.equal(call["ip_img"][1:], imagedream.encode(reference_image))
    assert torch.equal(call["context"][:5], imagedream.encode_text(NEGATIVE).expand(5, -1, -1))
    assert torch.equal(call["context"][5:], imagedream.encode_text("a cat").expand(5, -1, -1))
    eps = rec.outputs[0].reshape(2, 5, 4, 8, 8)
    assert torch.equal(guided, guide(eps[0, :4], eps[1, :4], 2.0))  # frame 5 dropped


def test_imagedream_reference_image_and_prompt_reach_the_noise(id_dir, reference_image):
    teacher = ImageDreamTeacher.from_pretrained(id_dir, device="cpu")
    cameras, x = _cameras([0.0, 90.0, 180.0, 270.0]), _latents(4, seed=6)

    def eps(image, prompt):
        teacher.prepare(Condition(image=image, prompt=prompt))
        return teacher.predict_noise(x, 401, cameras, "cond")

    base = eps(reference_image, None)  # the prompt is optional: the image carries the content
    assert torch.equal(teacher._text["cond"], teacher.encode_text(""))
    assert (eps(reference_image, "a red cat") - base).abs().max() > 1e-4
    assert (eps(1 - reference_image, None) - base).abs().max() > 1e-4
    assert torch.equal(eps(reference_image, None), base)
    teacher.prepare(Condition(image=reference_image), torch.Generator().manual_seed(0))  # a posterior sample
    assert not torch.equal(teacher._image_latent, teacher.encode(reference_image))


def test_imagedream_needs_an_image(id_dir):
    teacher = ImageDreamTeacher.from_pretrained(id_dir, device="cpu")
    with pytest.raises(UserError, match="conditioned on an image"):
        teacher.prepare(Condition(prompt="a cat"))
    with pytest.raises(UserError, match=r"\[1,3,H,W\]"):
        teacher.prepare(Condition(image=torch.rand(2, 3, RES, RES)))


# ---------------------------------------------------------------------------------------------------------
# Loading errors


def test_wrong_models_are_named(mv_dir, id_dir, tmp_path):
    with pytest.raises(UserError, match="image_encoder"):
        ImageDreamTeacher.from_pretrained(mv_dir, device="cpu")
    with pytest.raises(UserError, match="use --teacher imagedream"):
        MVDreamTeacher.from_pretrained(id_dir, device="cpu")
    with pytest.raises(UserError, match="'unet' is UNet2DConditionModel"):
        MVDreamTeacher.from_pretrained(build_tiny_zero123(tmp_path / "zero123"), device="cpu")


def test_checkpoints_load_strictly_from_safetensors_only(mv_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(mv_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "camera_embed.0.bias"}, weights)
    with pytest.raises(UserError, match=r"missing keys 'camera_embed\.0\.bias'"):
        MVDreamTeacher.from_pretrained(broken, device="cpu")
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UserError, match=r"only has diffusion_pytorch_model\.bin: only \.safetensors weights"):
        MVDreamTeacher.from_pretrained(broken, device="cpu")
    shutil.rmtree(broken / "text_encoder")
    shutil.copytree(mv_dir / "unet", broken / "unet", dirs_exist_ok=True)
    with pytest.raises(UserError, match="text_encoder"):
        MVDreamTeacher.from_pretrained(broken, device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Registry, presets and a SIR run


def test_registry_entries():
    assert (TEACHERS["mvdream"].inputs, TEACHERS["mvdream"].preset) == ("text", "mvdream")
    assert (TEACHERS["imagedream"].inputs, TEACHERS["imagedream"].preset) == ("image+text", "imagedream")


def test_mvdream_preset_is_table_one():
    cfg = resolve("mvdream")
    s, g, c = cfg.schedule, cfg.guidance, cfg.cameras
    assert (cfg.teacher.name, g.scale, g.eta, s.denoise_steps, s.init_steps, s.iterations, s.steps, c.views) == (
        "mvdream", 7.5, 0.0, 50, 50, 50, 15, 4)
    assert (s.t_start, s.t_end, s.t1, c.resolution) == (0.8, 0.5, "square", 256)
    assert g.negative_prompt.startswith("ugly, bad anatomy, blurry") and g.negative_prompt.endswith("bad proportions")
    plans = SIRSchedule.from_config(s).plans
    # t2 from 0.8T (index 9 after the float quirk: 801) to 0.5T; t1 = t2²/T snapped down to the inversion grid
    assert (plans[0].t2, plans[0].t1) == (801, 641) and (plans[-1].t2, plans[-1].t1) == (501, 241)
    assert all(p.t1 <= p.t2 * p.t2 / 1000 < p.t1 + 20 for p in plans)


def test_imagedream_preset_is_the_reference_run():
    cfg = resolve("imagedream")
    s, g, c, w = cfg.schedule, cfg.guidance, cfg.cameras, cfg.loss
    assert (cfg.teacher.name, g.scale, g.eta, s.denoise_steps, s.init_steps, s.iterations, s.steps) == (
        "imagedream", 2.0, 1.0, 10, 50, 30, 15)
    assert (c.views, c.min_ver, c.max_ver, c.radius, w.reference_rgb, w.reference_mask) == (4, -5.0, 0.0, 2.5, 0.0, 0.0)
    plans = SIRSchedule.from_config(s).plans
    table = {0: (801, 401), 1: (701, 401), 7: (701, 401), 8: (601, 301), 15: (601, 301), 16: (501, 301),
             22: (501, 301), 23: (401, 201), 29: (401, 201)}  # spec §6.3
    assert {k: (plans[k].t2, plans[k].t1) for k in table} == table


def test_text_to_gaussians_sir_run_with_the_tiny_mvdream(mv_dir):
    cfg = resolve("mvdream", overrides={
        "teacher": {"model": str(mv_dir)},
        "schedule": {"iterations": 2, "steps": 2, "init_steps": 2, "denoise_steps": 10},
        "cameras": {"resolution": 32},
        "gaussians": {"num_points": 200, "backend": "torch"},
    })

    def run(seed: int):
        teacher = teacher_entry("mvdream").build(cfg, torch.device("cpu"), False)
        teacher.prepare(Condition(prompt="a corgi", negative_prompt=cfg.guidance.negative_prompt))
        g = torch.Generator().manual_seed(seed)
        gaussians = Gaussians(cfg.gaussians, torch.device("cpu"), g)
        result = SIREngine(teacher, gaussians, cfg, g, torch.device("cpu"), reference=None).run()
        return result, gaussians, teacher.evaluations.as_dict()

    result, gaussians, counts = run(0)
    schedule = SIRSchedule.from_config(cfg.schedule)
    assert [log.t2 for log in result.iterations] == [None] + [p.t2 for p in schedule.plans]
    assert counts["guided"] == schedule.guided_passes and counts["single_branch"] == schedule.uncond_passes
    assert counts["view_evaluations"] == 4 * (2 * schedule.guided_passes + schedule.uncond_passes)
    assert result.optimisation_steps == 6 and all(np.isfinite(log.loss) for log in result.iterations)
    again, gaussians_again, _ = run(0)
    assert [log.loss for log in again.iterations] == [log.loss for log in result.iterations]
    assert torch.equal(gaussians_again.means, gaussians.means)


# ---------------------------------------------------------------------------------------------------------
# The command line: text2gs, text2mesh and image2gs --prompt with the tiny models


@pytest.fixture()
def tiny_run_config(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.toml"
    f.write_text(
        "[schedule]\niterations = 2\nsteps = 2\ninit_steps = 2\ndenoise_steps = 10\n"
        "[cameras]\nresolution = 32\n[gaussians]\nnum_points = 200\nbackend = \"torch\"\n"
    )
    return f


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.mark.parametrize("prompt, stem", [
    ("a corgi", "a_corgi"),
    ('A "quoted" cat\'s hat / ../etc', "a_quoted_cat_s_hat_etc"),
    ("猫のぬいぐるみ, über-cute 🐱", "猫のぬいぐるみ_über_cute"),
    ("नमस्ते दुनिया", "नमस्ते_दुनिया"),  # combining vowel signs stay inside their words
    ("!!!", "prompt"),
    ("word " * 40, ("word_" * 12)[:60].strip("_")),
])
def test_prompt_stems_are_safe_file_names(prompt, stem):
    from microdreamer.pipeline import prompt_stem

    assert prompt_stem(prompt) == stem and len(stem) <= 60 and "/" not in stem and not stem.startswith(".")


def test_prompt_jobs_flag_empty_and_colliding_prompts():
    from microdreamer.pipeline import prompt_jobs

    jobs = prompt_jobs(["a cat", "A CAT!", " \t"])
    assert [(j.stem, j.input) for j in jobs] == [("a_cat", "a cat"), ("a_cat", "A CAT!"), ("prompt", " \t")]
    assert jobs[0].problem is None and "same outputs" in jobs[1].problem and "empty prompt" in jobs[2].problem


def test_text2gs_writes_loadable_prompt_named_outputs(tmp_path, capsys, mv_dir, tiny_run_config):
    from microdreamer.cli import main
    from microdreamer.config import GaussianConfig

    prompt = 'a "corgi" / 猫'

    def argv(out: Path) -> list[str]:
        return ["text2gs", prompt, "--model", str(mv_dir), "--config", str(tiny_run_config), "--out", str(out),
                "--device", "cpu", "--seed", "2", "-q"]

    out = tmp_path / "out"
    assert main(argv(out)) == 0
    stem = "a_corgi_猫"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.json", f"{stem}.ply", f"{stem}_views.png"]
    gaussians = Gaussians.load(out / f"{stem}.ply", GaussianConfig(), torch.device("cpu"))
    report = json.loads((out / f"{stem}.json").read_text())
    assert report["prompt"] == prompt and report["input"] is None and report["primitives"] == gaussians.num_primitives
    assert report["config"]["teacher"]["name"] == "mvdream" and report["config"]["guidance"]["scale"] == 7.5
    assert report["config"]["guidance"]["negative_prompt"].startswith("ugly, bad anatomy")
    schedule = SIRSchedule.from_config(resolve("mvdream", tiny_run_config).schedule)
    assert report["evaluations"]["guided"] == schedule.guided_passes
    assert report["evaluations"]["single_branch"] == schedule.uncond_passes

    ply = (out / f"{stem}.ply").read_bytes()
    assert main(argv(out)) == 2 and "already exists" in _error_line(capsys)  # never overwrites silently
    again = tmp_path / "again"
    assert main(argv(again)) == 0
    assert (again / f"{stem}.ply").read_bytes() == ply  # same seed, same result


@pytest.fixture()
def tiny_mesh_config(tmp_path: Path, tiny_run_config: Path) -> Path:
    f = tmp_path / "tiny_mesh.toml"
    f.write_text(tiny_run_config.read_text() + (
        "[mesh]\nresolution = 32\nfaces = 500\ntexture = 64\nbake_resolution = 32\nrefine_views = 4\n"
        "refine_resolution = 32\n"
    ))
    return f


def test_text2mesh_writes_the_gaussians_and_a_baked_glb(tmp_path, mv_dir, tiny_mesh_config):
    from microdreamer.cli import main

    out = tmp_path / "out"
    assert main(["text2mesh", "a corgi", "--model", str(mv_dir), "--config", str(tiny_mesh_config), "--out", str(out),
                 "--device", "cpu", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a_corgi.glb", "a_corgi.json", "a_corgi.ply", "a_corgi_mesh.json", "a_corgi_views.png"]
    mesh = trimesh.load(out / "a_corgi.glb", force="mesh", process=False)
    assert 0 < len(mesh.faces) <= 500
    assert np.asarray(mesh.visual.material.baseColorTexture).shape[:2] == (64, 64)
    assert (mesh.vertices.max(0) - mesh.vertices.min(0)).max() == pytest.approx(1.0, abs=1e-4)
    report = json.loads((out / "a_corgi.json").read_text())
    assert report["prompt"] == "a corgi" and report["config"]["teacher"]["name"] == "mvdream"
    assert report["config"]["mesh"]["refine_steps"] == 0  # the mvdream preset bakes only, as the reference
    mesh_report = json.loads((out / "a_corgi_mesh.json").read_text())
    assert mesh_report["refine"] is None and mesh_report["faces"] == len(mesh.faces)


def test_text2mesh_batch_refines_the_texture_with_the_prompt(tmp_path, mv_dir, tiny_mesh_config):
    from microdreamer.cli import main

    out = tmp_path / "out"
    assert main(["text2mesh", "a corgi", "a red cat", "--model", str(mv_dir), "--config", str(tiny_mesh_config),
                 "--out", str(out), "--device", "cpu", "--refine-steps", "2", "--format", "obj", "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "text2mesh" and manifest["counts"]["done"] == 2
    for stem in ("a_corgi", "a_red_cat"):
        mesh = trimesh.load(out / f"{stem}.obj", force="mesh", process=False)
        assert 0 < len(mesh.faces) <= 500 and (out / f"{stem}_albedo.png").is_file()
        refine = json.loads((out / f"{stem}_mesh.json").read_text())["refine"]
        assert refine["steps"] == 2 and refine["evaluations"] == 10  # DDIM from t=181 on the 50-step grid
        assert json.loads((out / f"{stem}.json").read_text())["config"]["mesh"]["refine_steps"] == 2


def test_text2mesh_batch_stopped_in_a_mesh_stage_resumes_there(tmp_path, capsys, monkeypatch, mv_dir,
                                                              tiny_mesh_config):
    from microdreamer import pipeline
    from microdreamer.cli import main

    def argv(out: Path, *prompts: str) -> list[str]:
        return ["text2mesh", *prompts, "--model", str(mv_dir), "--config", str(tiny_mesh_config), "--out", str(out),
                "--device", "cpu", "--refine-steps", "2", "-q"]

    whole = tmp_path / "whole"
    assert main(argv(whole, "a corgi")) == 0
    out = tmp_path / "out"
    make_mesh, calls = pipeline.make_mesh, []

    def interrupt_the_second(*args, **kwargs):
        calls.append(args[1])  # the stem
        if len(calls) == 2:
            raise KeyboardInterrupt
        return make_mesh(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "make_mesh", interrupt_the_second)
        assert main(argv(out, "a red cat", "a corgi")) == 130
    assert calls == ["a_red_cat", "a_corgi"] and not (out / "a_corgi.glb").exists()
    first = {e["stem"]: e for e in json.loads((out / "manifest.json").read_text())["entries"]}
    assert [first[s]["status"] for s in ("a_red_cat", "a_corgi")] == ["done", "interrupted"]
    capsys.readouterr()
    assert main(argv(out, "a red cat", "a corgi") + ["--skip-existing", "--json"]) == 0
    entries = {e["stem"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    cat, corgi = entries["a_red_cat"], entries["a_corgi"]
    assert cat["status"] == "skipped" and cat["timings"] == first["a_red_cat"]["timings"]
    assert corgi["status"] == "done" and corgi["note"].startswith("mesh stage only")
    # conditioned on the prompt as in the run: the mesh an uninterrupted run makes
    assert (out / "a_corgi.glb").read_bytes() == (whole / "a_corgi.glb").read_bytes()
    assert json.loads((out / "a_corgi_mesh.json").read_text())["refine"]["steps"] == 2


@pytest.mark.parametrize("args, message", [
    (["text2gs", ""], "empty prompt"),
    (["text2mesh", " "], "empty prompt"),
    (["text2mesh", "a cat", "--teacher", "imagedream"], "text-to-3D teacher"),
    (["text2mesh", "a cat", "--faces", "0"], "face budget"),
    (["text2gs", "   "], "empty prompt"),
    (["text2gs", "a cat", "--views", "6"], "multiple of 4"),
    (["text2gs", "a cat", "--teacher", "stable-zero123"], "text-to-3D teacher"),
    (["image2gs", "{image}", "--teacher", "mvdream"], "use text2gs"),
    (["image2gs", "{image}", "--prompt", "a cat"], "image+text teacher"),
    (["image2gs", "{image}", "--teacher", "imagedream", "--prompt", " "], "empty prompt"),
])
def test_prompt_errors_are_one_line_exit_2(tmp_path, capsys, mv_dir, args, message):
    from microdreamer.cli import main

    image = tmp_path / "cat.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
    out = tmp_path / "out"
    argv = [a.format(image=image) for a in args] + ["--out", str(out), "--device", "cpu"]
    if args[0].startswith("text2"):
        argv += ["--model", str(mv_dir)]
    assert main(argv) == 2
    assert message in _error_line(capsys)
    assert not out.exists() or not any(out.iterdir())


def test_image2gs_with_imagedream_and_a_prompt(tmp_path, id_dir, tiny_run_config):
    from microdreamer.cli import main

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 20:44] = (200, 60, 40, 255)
    image = tmp_path / "cat.png"
    Image.fromarray(rgba).save(image)
    out = tmp_path / "out"
    argv = ["image2gs", str(image), "--teacher", "imagedream", "--prompt", "a cat statue", "--model", str(id_dir),
            "--config", str(tiny_run_config), "--out", str(out), "--device", "cpu", "-q"]
    assert main(argv) == 0
    report = json.loads((out / "cat.json").read_text())
    assert report["prompt"] == "a cat statue" and report["config"]["guidance"]["eta"] == 1.0
    assert sorted(p.name for p in out.iterdir()) == ["cat.json", "cat.ply", "cat_rgba.png", "cat_views.png"]

    # the saved report reproduces the run, prompt included, without repeating --prompt
    again = tmp_path / "again"
    assert main(["image2gs", str(image), "--model", str(id_dir), "--config", str(out / "cat.json"),
                 "--out", str(again), "--device", "cpu", "-q"]) == 0
    assert json.loads((again / "cat.json").read_text())["prompt"] == "a cat statue"
    assert (again / "cat.ply").read_bytes() == (out / "cat.ply").read_bytes()
