"""GECO Stage II on tiny models: deterministic sampling, the generator's views into LGM, the pseudo-ground-truth
cache (deterministic, reused, made from the noise the generator then sees), a falling loss, exact resume, the
refusal without LPIPS weights, and the command line on a tiny Stage I run's output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from microdreamer.cli import main
from microdreamer.distill.checkpoints import latest_checkpoint
from microdreamer.distill.config import Stage2Config
from microdreamer.distill.data import load_conditions
from microdreamer.distill.randomness import batch_items
from microdreamer.distill.reconstruction import GECOReconstructor
from microdreamer.distill.runs import LOG, NOTICE, ReconstructorSpec, open_run
from microdreamer.distill.stage2 import Stage2, load_lpips, run_stage2, stage1_run, stage2_config
from microdreamer.errors import UserError
from microdreamer.generators.euler_ancestral import EulerAncestral
from microdreamer.generators.zero123plus import GRAY, Zero123PlusGenerator
from microdreamer.reconstructors.lgm import LGMReconstructor, plucker_rays
from microdreamer.reconstructors.lgm_unet import LGMConfig, LGMNetwork
from microdreamer.sir.cameras import orbit_camera
from tiny_models import SMALL_LGM, build_tiny_stage1_world, write_lpips_weights

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = torch.finfo(torch.float32).eps
GROUPS = ("generator", "reconstructor", "optimizer_generator", "optimizer_reconstructor")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Condition images, a tiny Zero123++, a one-step Stage I run on it, a small LGM and LPIPS weights."""
    world = build_tiny_stage1_world(tmp_path_factory.mktemp("stage2"))
    vgg, heads = write_lpips_weights(world["root"] / "lpips")
    return {**world, "vgg": vgg, "heads": heads}


def _settings(world: dict[str, Path], **changes) -> dict:
    return {"data": str(world["data"]), "model": str(world["stage1"]), "reconstructor": str(world["lgm"]),
            "lpips_vgg": str(world["vgg"]), "lpips_heads": str(world["heads"]), "device": "cpu", "teacher_steps": 3,
            "poses": 6, "render_views": 3, "render_size": 16, "renderer": "torch", "background": "gray",
            "validate_every": 0, "lr_generator": 1e-4, "lr_reconstructor": 1e-3, **changes}


def _stage(world: dict[str, Path], cache: Path, **changes) -> Stage2:
    """A Stage II trainer loaded as `distill stage2` loads it."""
    config = Stage2Config(**_settings(world, **changes)).validate()
    stage1 = stage1_run(config)
    model = Zero123PlusGenerator.from_pretrained(stage1.generator.model, dtype="fp32")
    lgm = LGMReconstructor.from_pretrained(config.reconstructor, dtype="fp32").network
    return Stage2(model, stage1.generator, stage1.checkpoint.tensors("generator"), lgm, config,
                  load_conditions(config.data), load_lpips(config), cache)


def _build(stage: Stage2) -> int:
    return stage.cache.build(stage.samples, stage.pseudo_ground_truth, stage.world, stage.device, lambda d, t: None)


# ---------------------------------------------------------------------------------------------------------
# deterministic sampling and the reconstructor's inputs


def test_a_step_without_generator_is_ddim_with_eta_0():
    """EulerAncestral.step(…, None) equals DDIM (η = 0) written in the VP form: x0 and ε from v at ᾱ_t, then
    √ᾱ'·x0 + √(1−ᾱ')·ε at the next timestep (the last step lands on x0)."""
    alphas = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64), 0)
    schedule = EulerAncestral.trailing(alphas, 4, "v_prediction")
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        x = torch.randn(2, 4, 3, 3, generator=g) * schedule.sigmas[i]  # the sampler's (VE) sample
        v = torch.randn(2, 4, 3, 3, generator=g)
        a = float(alphas[schedule.timesteps[i]])
        a_next = 1.0 if i == 3 else float(alphas[schedule.timesteps[i + 1]])
        x_vp = x.double() * math.sqrt(a)
        x0 = math.sqrt(a) * x_vp - math.sqrt(1 - a) * v.double()
        eps = math.sqrt(1 - a) * x_vp + math.sqrt(a) * v.double()
        expected = (math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps) / math.sqrt(a_next)
        got = schedule.step(v, x, i, None)
        # float32 arithmetic of a few operations on values up to σ_0 ≈ 14.6
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=16 * EPS32 * expected.abs().max().item())


def _reconstructor(views: tuple[int, ...], background: str = "gray") -> GECOReconstructor:
    torch.manual_seed(1)
    network = LGMNetwork(LGMConfig(**SMALL_LGM)).eval()
    return GECOReconstructor(network, ReconstructorSpec(network.config, views, background, 30.0))


def test_lgm_sees_the_chosen_views_with_their_true_rays_and_six_views_attend_jointly():
    four = _reconstructor((0, 1, 3, 4))
    # the first chosen view (azimuth 30°, 30° above) becomes LGM's front camera [I | (0, 0, 1.5)]
    front = orbit_camera([0.0], [0.0], 1.5)[0].double()
    first = four.frame @ orbit_camera([-30.0], [30.0], 1.5)[0].double()
    torch.testing.assert_close(first, front, rtol=0, atol=1e-12)
    torch.testing.assert_close(four.rays[0].double(), plucker_rays(front[None], 16, 30.0)[0], rtol=0, atol=1e-6)
    # render cameras at a view's own angles are that view's input camera (view 3: azimuth 210°, 20° below)
    camera = four.cameras(torch.tensor([20.0]), torch.tensor([210.0]), 16)
    torch.testing.assert_close(plucker_rays(camera.c2w, 16, 30.0)[0].float(), four.rays[2], rtol=0, atol=1e-5)
    # back into our world with the cameras at radius 2: LGM's front camera is view 0's orbit camera again
    to_world = four.to_world(2.0)
    torch.testing.assert_close(to_world.points(first[:3, 3].float()), orbit_camera([-30.0], [30.0], 2.0)[0, :3, 3],
                               rtol=0, atol=1e-5)
    assert to_world.scale == pytest.approx(2.0 / 1.5)

    views = torch.rand(1, 6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    inputs, unmatted = four.inputs(views)
    assert inputs.shape == (1, 4, 9, 16, 16) and unmatted == 0
    six = _reconstructor((0, 1, 2, 3, 4, 5))
    with torch.no_grad():
        splats, _ = six.splats(views)
        changed = views.clone()
        changed[0, 5] = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3))
        moved, _ = six.splats(changed)
    assert splats.shape == (1, 6, 14, 8, 8)
    assert (moved - splats)[0, 0].abs().max() > 1e-4  # view 0's splats see view 5 through the attention


def test_white_background_moves_gray_to_white_and_passes_gradients():
    """An object on Zero123++'s gray: its background reaches LGM as white, the object unchanged, and the
    gradient flows to the colours; a view without a plain border is passed as it is and counted."""
    reconstructor = _reconstructor((0, 1, 3, 4), "white")
    views = torch.full((1, 6, 3, 32, 32), GRAY)
    views[:, :, :, 8:24, 10:22] = torch.tensor([0.8, 0.2, 0.1])[:, None, None]
    views[0, 4] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))  # noise: no plain border
    views.requires_grad_(True)
    matted = reconstructor.inputs(views)[0]
    assert reconstructor.inputs(views)[1] == 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = matted[0, :, :3] * std[:, None, None] + mean[:, None, None]  # 32² → 16²: pixels 2×2 averaged
    torch.testing.assert_close(rgb[0, :, 0, 0], torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(rgb[0, :, 8, 8], torch.tensor([0.8, 0.2, 0.1]), rtol=0, atol=1e-5)
    unchanged = torch.nn.functional.avg_pool2d(views[0, 4].detach(), 2)  # the noise view, as it was
    torch.testing.assert_close(rgb[3], unchanged, rtol=0, atol=1e-5)
    rgb[0, 0, 8, 8].backward()
    assert views.grad[0, 0, 0, 16:18, 16:18].sum() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# the pseudo-ground-truth cache


def test_the_pseudo_ground_truth_is_deterministic_reused_and_made_from_the_noise_the_generator_sees(
    world, tmp_path, monkeypatch
):
    first = _stage(world, tmp_path / "a")
    started: dict[int, tuple] = {}
    real_sample = Zero123PlusGenerator.sample

    def sample(model, conditioning, noise, generator, **kwargs):  # what the teacher starts from, per sample
        assert kwargs["deterministic"] and kwargs["steps"] == 3
        started[len(started)] = (noise.clone(), conditioning.reference.clone(), conditioning.context.clone())
        return real_sample(model, conditioning, noise, generator, **kwargs)

    monkeypatch.setattr(Zero123PlusGenerator, "sample", sample)
    assert _build(first) == 3
    monkeypatch.setattr(Zero123PlusGenerator, "sample", real_sample)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["index.json", *(f"sample-{j:08d}.safetensors" for j in range(3))]
    # another trainer, another folder: the same bytes
    assert _build(_stage(world, tmp_path / "b")) == 3
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # reused: nothing made again, nothing rewritten; a lost sample is made again identically
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    assert _build(first) == 0 and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == stamps
    kept = (tmp_path / "a" / files[2]).read_bytes()
    (tmp_path / "a" / files[2]).unlink()
    assert _build(first) == 1 and (tmp_path / "a" / files[2]).read_bytes() == kept
    # other settings: refused in one line
    with pytest.raises(UserError, match=r"other settings \(teacher_steps 3 → 4\)") as info:
        _build(_stage(world, tmp_path / "a", teacher_steps=4))
    assert "\n" not in str(info.value)

    # a training step gives the generator exactly the noise and conditioning its target was sampled from
    seen = []
    forward = first.generator.forward

    def recording(noise, conditioning):
        seen.append((noise.detach().clone(), conditioning.reference.clone(), conditioning.context.clone()))
        return forward(noise, conditioning)

    first.generator.forward = recording
    first.config.batch_size = 3  # one step: every sample
    first.train_step(1)
    noise, reference, context = seen[0]
    for position, sample in enumerate(batch_items(0, 1, 3, 3)):
        z, ref, ctx = started[sample]
        assert torch.equal(noise[position], z[0])  # the same noise, bit for bit
        # the same draws of the condition latents; the VAE and CLIP encoders ran on a batch of 3 here and of 1
        # for the teacher, so their outputs differ by rounding (as in test_batched_conditioning_equals_…)
        rows = [position, 3 + position]  # [uncond ; cond] rows of this sample
        torch.testing.assert_close(reference[rows], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(context[rows], ctx, rtol=1e-5, atol=1e-5)
    entry = first.cache.entry(0, first.device)
    assert entry.elevation.shape == entry.azimuth.shape == (6,)
    assert ((entry.elevation >= -30) & (entry.elevation <= 20)).all()
    assert entry.gaussians["opacities"].min() >= 0.005 and entry.gaussians["means"].shape[1] == 3


# ---------------------------------------------------------------------------------------------------------
# training


def test_stage2_lowers_mse_plus_lpips_on_held_out_poses(world, tmp_path):
    """Eight steps (batch 2) lower L_3D = MSE + LPIPS of the three samples at six fixed poses, rendered from
    the generator + LGM against the pseudo ground truth."""
    stage = _stage(world, tmp_path / "cache", batch_size=2)
    _build(stage)
    entries = [stage.cache.entry(j, stage.device) for j in range(3)]

    def held_out() -> float:
        with torch.no_grad():
            made, target, _ = stage.renders(entries, [torch.arange(6)] * 3)
            return ((made - target).square().mean() + stage.lpips(made, target).mean()).item()

    before = held_out()
    for step in range(1, 9):
        stage.train_step(step)
    after = held_out()
    assert after < 0.85 * before, (before, after)


def _steps(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records if r["event"] == "step"]


def test_a_resumed_stage2_run_ends_with_the_same_bytes(world, tmp_path):
    """4 steps in one go, and 2 then --resume to 4 (sharing one pseudo-ground-truth folder): the same
    weights, optimiser states and losses."""
    cache = tmp_path / "cache"
    settings = _settings(world, pseudo_gt=str(cache), steps=4, checkpoint_every=2, lambda_lpips=0.0)
    straight = run_stage2(Stage2Config(**settings), tmp_path / "straight")
    assert (straight.step, straight.resumed_from) == (4, 0)
    run_stage2(Stage2Config(**{**settings, "steps": 2}), tmp_path / "halves")
    config = stage2_config(tmp_path / "halves", {"steps": 4}, resume=True)
    resumed = run_stage2(config, tmp_path / "halves", resume=True)
    assert (resumed.resumed_from, resumed.step) == (2, 4)
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "halves")
    for name in GROUPS:
        ta, tb = a.tensors(name), b.tensors(name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert _steps(tmp_path / "halves") == _steps(tmp_path / "straight") and len(_steps(tmp_path / "straight")) == 4
    made = [json.loads(line)["made"] for line in (tmp_path / "halves" / LOG).read_text().splitlines()
            if '"pseudo_gt"' in line]
    assert made == [0, 0]  # the cache the first run made was reused by both
    start = stage1_run(config).checkpoint.tensors("generator")
    trained = b.tensors("generator")
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-5  # the generator did move


def test_without_lpips_weights_stage2_says_so_before_loading_anything(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Zero123PlusGenerator, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(LGMReconstructor, "from_pretrained", lambda *a, **k: pytest.fail("LGM loaded"))
    settings = {k: v for k, v in _settings(world).items() if not k.startswith("lpips")}
    with pytest.raises(UserError, match=r"needs LPIPS weights.*--lpips-vgg FILE --lpips-heads FILE.*--lambda-lpips 0"):
        run_stage2(Stage2Config(**settings), tmp_path / "run")
    args = ["distill", "stage2", "--out", str(tmp_path / "run"), "--data", str(world["data"]),
            "--model", str(world["stage1"]), "--reconstructor", str(world["lgm"]), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs LPIPS weights" in err
    assert main([*args, "--lpips-vgg", str(tmp_path / "nope.pth"), "--lpips-heads", str(world["heads"])]) == 2
    assert "nope.pth not found" in capsys.readouterr().err
    assert main([*args[:-2], "--model", str(world["data"]), "--lambda-lpips", "0"]) == 2
    assert "is not a run folder of `microdreamer distill`" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_command_line_runs_stage2_on_a_stage1_run_and_leaves_a_loadable_run(world, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "stage2", "--out", str(out), "--data", str(world["data"]), "--model", str(world["stage1"]),
            "--reconstructor", str(world["lgm"]), "--lpips-vgg", str(world["vgg"]), "--lpips-heads", str(world["heads"]),
            "--device", "cpu", "--teacher-steps", "2", "--poses", "4", "--render-views", "2", "--render-size", "16",
            "--renderer", "torch", "--batch-size", "2", "--epochs", "1", "--validate-every", "1",
            "--validation-images", "2", "--validation-views", "2", "--lgm-views", "0,1,2,3,4,5",
            "--pose-elevations=-20,10"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "starting of 2" in err and "pseudo ground truth: 3 samples (made 3)" in err and "done: step 2" in err
    records = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert [r["event"] for r in records] == ["pseudo_gt", "validation", "step", "validation", "step", "checkpoint",
                                             "validation"]
    assert all(np.isfinite(r["psnr"]) for r in records if r["event"] == "validation")
    from PIL import Image

    with Image.open(out / records[-1]["sheet"]) as sheet:  # 2 samples: 2 renders | 2 pseudo-ground-truth renders
        assert sheet.size == (4 * 16, 2 * 16)
    notice = (out / NOTICE).read_text()
    assert "CC-BY-NC 4.0" in notice and "ashawkey/LGM" in notice
    # the documented layout: config.json says how to rebuild both networks, the checkpoint holds their weights
    run = open_run(out)
    assert run.stage == 2 and run.checkpoint.step == 2 and run.generator.view_size == 8
    assert run.reconstructor.views == (0, 1, 2, 3, 4, 5) and run.reconstructor.background == "white"
    network = LGMNetwork(run.reconstructor.network)
    network.load_state_dict(run.checkpoint.tensors("reconstructor"), strict=True)
    model = Zero123PlusGenerator.from_pretrained(run.generator.model, dtype="fp32")
    model.unet.load_state_dict(run.checkpoint.tensors("generator"), strict=True)
    entry = GECOReconstructor(network, run.reconstructor)
    assert entry.rays.shape == (6, 6, 16, 16)
    # resuming: more epochs continue from step 2; a setting that changes the numbers is refused
    assert main(["distill", "stage2", "--out", str(out), "--resume", "--render-size", "32"]) == 2
    assert "render_size 16 → 32" in capsys.readouterr().err
    assert main(["distill", "stage2", "--out", str(out), "--resume", "--epochs", "2", "--validate-every", "0"]) == 0
    assert "resuming at step 2 of 3" in capsys.readouterr().err
    assert latest_checkpoint(out).step == 3
    assert main(["distill", "stage1", "--out", str(out), "--resume"]) == 2
    assert "holds a Stage 2 run, not Stage 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": None}, "give the Stage I run to fine-tune with --model RUN_DIR"),
        ({"lgm_views": (0, 0, 1)}, r"--lgm-views must name distinct views among 0..5, got \[0, 0, 1\]"),
        ({"lgm_views": (6,)}, "--lgm-views must name distinct views"),
        ({"render_views": 9, "poses": 8}, "--render-views 9 exceeds the 8 poses of each sample"),
        ({"pose_elevations": (30.0, -30.0)}, "--pose-elevations must satisfy -90 < low <= high < 90, got 30.0..-30.0"),
        ({"background": "black"}, "unknown --background 'black' \\(use white, gray\\)"),
        ({"lambda_lpips": -1.0}, "--lambda-lpips must not be negative"),
        ({"steps": -2}, "--steps must be at least 1, got -2"),
        ({"render_size": 8}, "LPIPS needs renders of at least 16² pixels"),
    ],
)
def test_bad_stage2_settings_are_one_line(changes, message):
    with pytest.raises(UserError, match=message) as info:
        Stage2Config(**{"data": "d", "model": "m", **changes}).validate()
    assert "\n" not in str(info.value)


def test_list_options_are_checked_on_the_command_line(tmp_path, capsys):
    args = ["distill", "stage2", "--out", str(tmp_path / "run"), "--data", "d", "--model", "m"]
    assert main([*args, "--lgm-views", "0,x"]) == 2
    assert "--lgm-views takes comma-separated numbers, got '0,x'" in capsys.readouterr().err
    assert main([*args, "--pose-elevations", "10"]) == 2
    assert "--pose-elevations takes 2 comma-separated numbers, got '10'" in capsys.readouterr().err


def test_a_full_disk_while_caching_is_one_line_and_keeps_the_samples_made(tmp_path, monkeypatch):
    from microdreamer.distill import pseudo_gt

    cache = pseudo_gt.PseudoGroundTruth(tmp_path / "cache", {"seed": 0})
    cache.write(0, {"means": torch.zeros(2, 3)}, {"image": 0})
    kept = cache.path(0).read_bytes()

    def full(tensors, path, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pseudo_gt, "save_file", full)
    with pytest.raises(UserError, match=r"sample 1 in .*\(No space left on device\); free space and run again"):
        cache.write(1, {"means": torch.zeros(2, 3)}, {"image": 1})
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["sample-00000000.safetensors"]
    assert cache.path(0).read_bytes() == kept
