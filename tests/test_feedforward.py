"""The feed-forward path end to end on tiny models: --method lgm (views → LGM → Gaussians) and --init lgm (SIR
started from them), with the reference teacher, ImageDream, MVDream and (experimental) Zero123++ views."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from microdreamer import pipeline
from microdreamer.cli import main
from microdreamer.config import PRESET_DIR, resolve
from microdreamer.errors import UserError
from microdreamer.feedforward import MVDREAM_TO_LGM, ZERO123PLUS_VIEWS, TeacherViews, Zero123PlusViews
from microdreamer.io.images import to_reference
from microdreamer.io.ply import read_gaussian_ply
from microdreamer.pipeline import PreparedInput
from microdreamer.reconstructors.lgm import LGMReconstructor
from microdreamer.sir.cameras import Cameras
from microdreamer.sir.refiner import init_sample
from microdreamer.sir.schedule import SIRSchedule
from microdreamer.teachers.base import Condition
from microdreamer.teachers.mvdream import ImageDreamTeacher
from microdreamer.teachers.reference import ReferenceTeacher
from tiny_models import build_tiny_lgm, build_tiny_mvdream

pytestmark = pytest.mark.usefixtures("one_thread")

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"
RES = 48  # the runs' render size, the reference teacher's too


@pytest.fixture(scope="module")
def lgm_dir(tmp_path_factory) -> Path:
    return build_tiny_lgm(tmp_path_factory.mktemp("lgm") / "lgm")


@pytest.fixture(scope="module")
def lgm(lgm_dir) -> LGMReconstructor:
    return LGMReconstructor.from_pretrained(lgm_dir)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mv")
    return {"mvdream": build_tiny_mvdream(root / "mv"),
            "imagedream": build_tiny_mvdream(root / "id", image_prompt=True)}


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    """Small renders and a short SIR; the schedule's start (t_start, init_steps) stays the preset's."""
    f = tmp_path / "tiny.toml"
    f.write_text(f"[schedule]\niterations = 2\nsteps = 2\n[cameras]\nviews = 2\nresolution = {RES}\n"
                 "[mesh]\nresolution = 32\nfaces = 500\ntexture = 64\nbake_resolution = 32\nrefine_steps = 0\n")
    return f


def _cow(path: Path) -> Path:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 20:44] = (200, 60, 40, 255)
    Image.fromarray(rgba).save(path)
    return path


def _lgm_cameras() -> Cameras:
    """LGM's cameras in our world, as the reference teacher's renders for LGM take them."""
    return Cameras.orbit([0.0] * 4, [0.0, 90.0, 180.0, 270.0], 1.5, RES, 49.1)


def test_method_lgm_with_the_reference_teacher_is_lgm_on_the_mesh_renders(tmp_path, lgm_dir, lgm, tiny):
    out = tmp_path / "out"
    argv = ["image2gs", "--teacher", "reference", "--model", str(SPOT), "--method", "lgm", "--reconstructor",
            str(lgm_dir), "--config", str(tiny), "--device", "cpu", "-q"]
    assert main(argv + ["--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["spot.json", "spot.ply", "spot_views.png"]
    report = json.loads((out / "spot.json").read_text())
    assert report["config"]["method"] == "lgm" and report["config"]["preset"] == "reference-lgm"
    weights = report["config"]["lgm"]["reconstructor"]  # a local folder travels as a FileRef, as --model does
    assert weights["absolute"] == str(lgm_dir.resolve()) and weights["relative"] is not None
    assert report["iterations"] == [] and report["optimisation_steps"] == 0
    assert report["evaluations"] == {"total": 1, "guided": 0, "single_branch": 0, "view_evaluations": 0, "lgm": 1}
    assert {"lgm.views", "lgm.reconstruct", "lgm", "export"} <= set(report["timings"])
    assert "sir" not in report["timings"]
    # the saved Gaussians are LGM's on the mesh's renders at its cameras, and (views at radius 1.5 in our
    # world) in the mesh's own frame and size
    cameras = _lgm_cameras()
    expected = lgm.reconstruct(ReferenceTeacher(SPOT, resolution=RES).render(cameras).rgb, cameras)[0]
    saved = read_gaussian_ply(out / "spot.ply")
    assert saved.num_points == expected.num_points == 4 * 16 * 16
    for field in ("means", "f_dc", "opacity", "scale", "rotation"):
        assert torch.allclose(getattr(saved, field), getattr(expected, field), atol=1e-5), field
    # its report reproduces it
    again = tmp_path / "again"
    assert main(argv[:1] + ["--config", str(out / "spot.json"), "--out", str(again), "-q"]) == 0
    assert (again / "spot.ply").read_bytes() == (out / "spot.ply").read_bytes()


def test_imagedream_views_are_lgms_sampling_reordered_front_first(tmp_path, models):
    teacher = ImageDreamTeacher.from_pretrained(models["imagedream"])
    cfg = resolve("imagedream-lgm", None, {"lgm": {"steps": 3}})
    rgba = np.asarray(Image.open(_cow(tmp_path / "cow.png")))
    views = TeacherViews(teacher, cfg, 49.1)(PreparedInput("cow", rgba=rgba), torch.Generator().manual_seed(5))
    # by hand: MVDream's cameras (azimuths 0..270, its front at 90), DDIM eta 0 with LGM's guidance 5
    g = torch.Generator().manual_seed(5)
    teacher.prepare(Condition(image=to_reference(rgba, teacher.resolution)[0]), g)
    cams = Cameras.orbit([0.0] * 4, [0.0, 90.0, 180.0, 270.0], cfg.cameras.radius, teacher.resolution, 49.1)
    direct = init_sample(teacher, cams, 3, 0.0, 5.0, g)
    assert cfg.lgm.guidance == 5.0 and cfg.lgm.negative_prompt == "" and MVDREAM_TO_LGM == (1, 2, 3, 0)
    assert torch.equal(views.images, direct[[1, 2, 3, 0]])
    assert views.cameras.azimuth.tolist() == [90.0, 180.0, 270.0, 0.0] == [teacher.reference_azimuth + a
                                                                           for a in (0, 90, 180, -90)]
    assert views.evaluations == {"total": 3, "guided": 3, "single_branch": 0, "view_evaluations": 24}


def test_image2mesh_method_lgm_with_imagedream(tmp_path, models, lgm_dir, tiny):
    out = tmp_path / "out"
    assert main(["image2mesh", str(_cow(tmp_path / "cow.png")), "--method", "lgm", "--model", str(models["imagedream"]),
                 "--reconstructor", str(lgm_dir), "--config", str(tiny), "--out", str(out), "--device", "cpu",
                 "-q"]) == 0
    report = json.loads((out / "cow.json").read_text())
    assert report["config"]["teacher"]["name"] == "imagedream" and report["config"]["preset"] == "imagedream-lgm"
    assert report["evaluations"]["guided"] == 30 and report["evaluations"]["lgm"] == 1  # LGM's 30 steps
    mesh = trimesh.load(out / "cow.glb", force="mesh", process=False)
    assert 0 < len(mesh.faces) <= 500
    assert json.loads((out / "cow_mesh.json").read_text())["refine"] is None


def test_text2gs_method_lgm_batch_with_mvdream(tmp_path, models, lgm_dir, tiny):
    out = tmp_path / "out"
    assert main(["text2gs", "a cat", "a red cow", "--method", "lgm", "--model", str(models["mvdream"]),
                 "--reconstructor", str(lgm_dir), "--config", str(tiny), "--out", str(out), "--device", "cpu",
                 "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["done"] == 2
    for stem in ("a_cat", "a_red_cow"):
        report = json.loads((out / f"{stem}.json").read_text())
        assert report["config"]["preset"] == "mvdream-lgm" and report["config"]["lgm"]["guidance"] == 7.5
        assert report["evaluations"]["guided"] == 30 and read_gaussian_ply(out / f"{stem}.ply").num_points > 0
    first = read_gaussian_ply(out / "a_cat.ply").means
    assert not torch.equal(first, read_gaussian_ply(out / "a_red_cow.ply").means)  # the prompt reaches the views


def test_init_lgm_starts_sir_from_lgms_gaussians(tmp_path, monkeypatch, lgm_dir, lgm, tiny):
    started = {}
    engine = pipeline.SIREngine

    def spy(teacher, representation, *args, **kwargs):
        started["means"] = representation.means.detach().clone()
        return engine(teacher, representation, *args, **kwargs)

    monkeypatch.setattr(pipeline, "SIREngine", spy)
    out = tmp_path / "out"
    assert main(["image2gs", "--teacher", "reference", "--model", str(SPOT), "--init", "lgm", "--reconstructor",
                 str(lgm_dir), "--config", str(tiny), "--out", str(out), "--device", "cpu", "-q"]) == 0
    cameras = _lgm_cameras()
    expected = lgm.reconstruct(ReferenceTeacher(SPOT, resolution=RES).render(cameras).rgb, cameras)[0]
    assert torch.allclose(started["means"], expected.means, atol=1e-5)
    report = json.loads((out / "spot.json").read_text())
    assert report["config"]["init"] == "lgm" and report["config"]["preset"] == "reference-lgm-init"
    init, first, second = report["iterations"]
    assert init["loss"] is None and init["t2"] is None  # no init iteration: LGM's Gaussians replace it
    schedule = SIRSchedule.from_config(resolve("reference-lgm-init", None, {"teacher": {"model": str(SPOT)}}).schedule)
    assert first["t2"] == schedule.plans[0].t2 == 551
    assert report["optimisation_steps"] == 4 and report["evaluations"]["lgm"] == 1
    assert report["cleanup"]["final_prune"] >= 0 and report["primitives"] <= expected.num_points  # no densification


@pytest.mark.parametrize("preset", ["reference-lgm-init", "imagedream-lgm-init", "mvdream-lgm-init"])
def test_lgm_init_presets_hold_what_they_state(preset):
    text = (PRESET_DIR / f"{preset}.toml").read_text()
    stated = int(re.search(r"t2 starts at (\d+)", text).group(1))
    cfg = resolve(preset, None, {"teacher": {"model": str(SPOT)}} if preset.startswith("reference") else None)
    base = resolve(preset.removesuffix("-lgm-init"), None,
                   {"teacher": {"model": str(SPOT)}} if preset.startswith("reference") else None)
    assert SIRSchedule.from_config(cfg.schedule).plans[0].t2 == stated
    prose = " ".join(line.lstrip("# ") for line in text.splitlines())
    assert f"instead of {SIRSchedule.from_config(base.schedule).plans[0].t2}" in prose
    assert cfg.init == "lgm" and cfg.schedule.init_steps == 0 and cfg.gaussians.densify_until == 0
    assert 3 * (cfg.schedule.iterations) <= base.schedule.iterations + 1  # at least 3× fewer iterations
    # the step counter ends at one per iteration (the skipped init one too) plus one per optimisation step
    blob = base.gaussians.position_lr_max_steps
    claim = re.search(rf"decay over\s+(\d+) steps instead of {blob} \(the run takes (\d+)\)", prose)
    over, takes = map(int, claim.groups())
    s = cfg.schedule
    assert takes == s.iterations + 1 + s.iterations * s.steps and over == cfg.gaussians.position_lr_max_steps > takes
    assert cfg.gaussians.position_lr_init == base.gaussians.position_lr_init / 2


class _Zero123PlusGrid:
    """Zero123++'s output for the view source (its sampling is tested in test_zero123plus.py): six 16² views
    on its gray, each with a square of its own colour."""

    def __init__(self) -> None:
        from microdreamer.generators.zero123plus import GRAY

        self.views = torch.full((6, 3, 16, 16), GRAY)
        for v in range(6):
            self.views[v, :, 5:11, 4:12] = torch.tensor([0.1 * v, 0.9, 0.3])[:, None, None]
        self.calls: list[tuple] = []

    def generate(self, image, generator, *, steps, guidance_scale, view_size):
        from microdreamer.generators.zero123plus import GeneratedViews, zero123plus_cameras

        self.calls.append((tuple(image.shape), steps, guidance_scale, view_size))
        return GeneratedViews(None, self.views, zero123plus_cameras(resolution=view_size), None)


def test_zero123plus_views_are_rematted_and_keep_their_true_cameras(tmp_path, lgm):
    from microdreamer.generators.zero123plus import zero123plus_cameras

    model = _Zero123PlusGrid()
    cfg = resolve("zero123plus-lgm", None)
    rgba = np.asarray(Image.open(_cow(tmp_path / "cow.png")))
    views = Zero123PlusViews(model, cfg, view_size=16)(PreparedInput("cow", rgba=rgba), torch.Generator())
    assert model.calls == [((1, 3, 16, 16), 28, 4.0, 16)]  # Zero123++'s own settings (zero123plus-lgm)
    picked = list(ZERO123PLUS_VIEWS)
    assert torch.equal(views.images[:, :, 5:11, 4:12], model.views[picked][:, :, 5:11, 4:12])  # the objects kept
    assert (views.images[:, :, :4] == 1.0).all() and (views.images[:, :, 12:] == 1.0).all()  # gray → white
    expected = zero123plus_cameras(resolution=16)[picked]
    assert torch.equal(views.cameras.c2w, expected.c2w) and views.cameras.fovy == 30.0
    assert views.cameras.azimuth.tolist() == [30.0, 90.0, 210.0, 270.0]
    assert views.evaluations == {"total": 28, "guided": 28, "single_branch": 0, "view_evaluations": 28 * 12}
    gaussians = lgm.reconstruct(views.images, views.cameras)[0]
    assert gaussians.num_points > 0 and torch.isfinite(gaussians.means).all()
    with pytest.raises(UserError, match="from an input image"):
        Zero123PlusViews(model, cfg, view_size=16)(PreparedInput("front"), torch.Generator())


def test_a_folder_config_that_is_no_lgm_is_one_line(tmp_path, lgm_dir):
    folder = tmp_path / "lgm"
    folder.mkdir()
    (folder / "model_fp16_fixrot.safetensors").write_bytes((lgm_dir / "model_fp16_fixrot.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps({"input_size": 100}))
    with pytest.raises(UserError, match=r"config.json does not describe an LGM network: input_size 100") as info:
        LGMReconstructor.from_pretrained(folder)
    assert "\n" not in str(info.value)
