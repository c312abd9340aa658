"""`image2gs --method geco` on tiny distilled runs: a Stage II run's generator and fine-tuned LGM (and a Stage I
run's generator with the published LGM) → a loadable PLY, saved and reported as `--method lgm` runs are, the
same bytes for the same seed; `image2mesh --method geco` bakes its mesh; `--init geco` starts SIR from a run's
Gaussians."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microdreamer import pipeline
from microdreamer.cli import main
from microdreamer.config import resolve
from microdreamer.distill.config import Stage2Config
from microdreamer.distill.pseudo_gt import sample_inputs
from microdreamer.distill.reconstruction import GECOReconstructor
from microdreamer.distill.runs import open_run
from microdreamer.distill.stage1 import latent_shape, onestep_generator
from microdreamer.distill.stage2 import run_stage2
from microdreamer.generators.zero123plus import GRAY, Zero123PlusGenerator, split_grid
from microdreamer.io.images import load_image, to_reference
from microdreamer.io.ply import read_gaussian_ply
from microdreamer.reconstructors.lgm import MIN_OPACITY, splatter_to_gaussians
from microdreamer.reconstructors.lgm_unet import LGMNetwork
from tiny_models import build_tiny_stage1_world

pytestmark = pytest.mark.usefixtures("one_thread")

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Zero123++, a one-step Stage I run on it, a small LGM, a one-step Stage II run, an RGBA input."""
    world = build_tiny_stage1_world(tmp_path_factory.mktemp("geco"))
    root = world["root"]
    run_stage2(Stage2Config(data=str(root / "data"), model=str(root / "stage1"), reconstructor=str(root / "lgm"),
                            lambda_lpips=0.0, device="cpu", teacher_steps=2, poses=4, render_views=2, render_size=16,
                            renderer="torch", validate_every=0, steps=1, batch_size=1, lr_reconstructor=1e-3),
               root / "stage2")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 20:44] = (200, 60, 40, 255)
    Image.fromarray(rgba).save(root / "cup.png")
    return {"stage1": root / "stage1", "stage2": root / "stage2", "lgm": root / "lgm", "image": root / "cup.png"}


def _run(runs: dict[str, Path], out: Path, model: str, *extra: str, command: str = "image2gs") -> dict:
    args = [command, str(runs["image"]), "--out", str(out), "--method", "geco", "--model", str(runs[model]),
            "--device", "cpu", "--no-rembg", "--seed", "3", *extra]
    assert main(args) == 0
    return json.loads((out / "cup.json").read_text())


def test_a_stage2_run_makes_a_loadable_ply_reported_as_feed_forward_runs_are_and_the_same_bytes_again(
        runs, tmp_path, capsys):
    report = _run(runs, tmp_path / "a", "stage2")
    assert "non-commercial use only (CC-BY-NC 4.0, from Zero123++)" in capsys.readouterr().err
    ply = read_gaussian_ply(tmp_path / "a" / "cup.ply")
    # the run's reconstructor sees four of the six views, 8² Gaussians each, less those under min_opacity
    assert ply.means.shape[0] == report["primitives"] and 0 < report["primitives"] <= 4 * 8 * 8
    assert torch.isfinite(ply.means).all()
    assert torch.equal(ply.means, _by_hand(runs["stage2"], tmp_path / "a" / "cup_rgba.png", seed=3, radius=2.0))
    assert report["config"]["method"] == "geco" and report["optimisation_steps"] == 0 and report["iterations"] == []
    # one guided generator pass (both halves at once) and one LGM pass
    assert report["evaluations"] == {"total": 2, "guided": 1, "single_branch": 0, "view_evaluations": 12, "lgm": 1}
    assert {"lgm.views", "lgm.reconstruct", "lgm"} <= set(report["timings"])
    assert (tmp_path / "a" / "cup_views.png").is_file() and (tmp_path / "a" / "cup_rgba.png").is_file()
    _run(runs, tmp_path / "b", "stage2")
    assert (tmp_path / "a" / "cup.ply").read_bytes() == (tmp_path / "b" / "cup.ply").read_bytes()
    _run(runs, tmp_path / "c", "stage2", "--seed", "4")
    assert (tmp_path / "a" / "cup.ply").read_bytes() != (tmp_path / "c" / "cup.ply").read_bytes()


def _by_hand(run_dir: Path, rgba: Path, seed: int, radius: float) -> torch.Tensor:
    """The Gaussians' centres of a Stage II run rebuilt as its author documents it (``open_run``, the one-step
    generator with the checkpoint's weights, its six views, the fine-tuned LGM as the run feeds it, our world),
    from the saved preprocessed input and the run's seed."""
    run = open_run(run_dir)
    model = Zero123PlusGenerator.from_pretrained(run.generator.model, dtype="fp32")
    generator = onestep_generator(model, run.generator.timestep, run.generator.guidance)
    generator.unet.load_state_dict(run.checkpoint.tensors("generator"))
    network = LGMNetwork(run.reconstructor.network)
    network.load_state_dict(run.checkpoint.tensors("reconstructor"))
    reconstructor = GECOReconstructor(network.eval(), run.reconstructor)
    size = run.generator.view_size
    condition = to_reference(load_image(rgba), size, (GRAY,) * 3)[0]
    with torch.no_grad():
        conditioning, noise, _ = sample_inputs(model, [condition], [seed], latent_shape(model, size))
        views = split_grid(model.decode(generator(noise, conditioning)).float())
        splats, _ = reconstructor.splats(views[None])
    return reconstructor.to_world(radius).apply(splatter_to_gaussians(splats[0], MIN_OPACITY)).means


def test_a_stage1_run_uses_the_published_lgm_and_image2mesh_bakes_a_mesh(runs, tmp_path):
    assert open_run(runs["stage1"]).reconstructor is None
    report = _run(runs, tmp_path / "m", "stage1", "--reconstructor", str(runs["lgm"]), "--grid", "16",
                  "--texture-size", "64", command="image2mesh")
    assert report["config"]["lgm"]["reconstructor"]["absolute"] == str(runs["lgm"])  # a FileRef, as --model
    assert read_gaussian_ply(tmp_path / "m" / "cup.ply").means.shape[0] == report["primitives"] > 0
    assert (tmp_path / "m" / "cup.glb").stat().st_size > 0


def test_init_geco_starts_sir_from_a_geco_runs_gaussians_and_the_same_seed_gives_the_same_bytes(
        runs, tmp_path, monkeypatch, capsys):
    started, teachers = [], []
    engine = pipeline.SIREngine

    def spy(teacher, representation, *args, **kwargs):
        started.append(representation.means.detach().clone())
        teachers.append((teacher, teacher.evaluations.as_dict()))  # the count before SIR
        return engine(teacher, representation, *args, **kwargs)

    monkeypatch.setattr(pipeline, "SIREngine", spy)
    tiny = tmp_path / "tiny.toml"
    tiny.write_text("[schedule]\niterations = 1\nsteps = 2\n[cameras]\nviews = 2\nresolution = 32\n"
                    "[mesh]\nrefine_steps = 0\n")
    args = ["--teacher", "reference", "--model", str(SPOT), "--init", "geco", "--init-model", str(runs["stage2"]),
            "--config", str(tiny), "--device", "cpu", "--no-rembg", "--seed", "3", "-q"]
    assert main(["image2gs", str(runs["image"]), "--out", str(tmp_path / "a"), *args]) == 0
    report = json.loads((tmp_path / "a" / "cup.json").read_text())
    c = report["config"]
    assert c["init"] == "geco" and c["preset"] == "reference-lgm-init" and c["schedule"]["init_steps"] == 0
    assert c["lgm"]["init_model"]["absolute"] == str(runs["stage2"])  # a FileRef, as --model's and --reconstructor's
    assert resolve("reference-lgm-init", tmp_path / "a" / "cup.json").lgm.init_model == str(runs["stage2"])
    assert f"GECO run {runs['stage2']}: the weights are for non-commercial use only" in capsys.readouterr().err
    expected = _by_hand(runs["stage2"], tmp_path / "a" / "cup_rgba.png", seed=3, radius=c["cameras"]["radius"])
    assert torch.equal(started[0], expected)
    assert report["iterations"][0]["loss"] is None
    # the evaluations: SIR's teacher, plus the generator's one guided pass of six views, plus LGM's one pass
    teacher, before = teachers[0]
    sir = {k: v - before[k] for k, v in teacher.evaluations.as_dict().items()}
    made = {"total": 1 + 1, "guided": 1, "single_branch": 0, "view_evaluations": 12, "lgm": 1}  # total: + LGM's
    assert report["evaluations"] == {k: sir.get(k, 0) + made[k] for k in made}
    assert main(["image2gs", str(runs["image"]), "--out", str(tmp_path / "b"), *args]) == 0
    assert (tmp_path / "a" / "cup.ply").read_bytes() == (tmp_path / "b" / "cup.ply").read_bytes()
