from pathlib import Path

import pytest

from microdreamer.config import RunConfig, preset_names, resolve
from microdreamer.errors import UserError


def test_presets_load_and_reference_values():
    assert {"reference", "stable-zero123"} <= set(preset_names())
    cfg = resolve("stable-zero123")
    s = cfg.schedule
    assert (s.t_start, s.t_end, s.inverse_ratio, s.denoise_steps, s.iterations, s.steps, s.init_steps) == (
        0.9, 0.2, 0.6, 20, 20, 15, 15
    )
    assert (cfg.guidance.scale, cfg.guidance.eta, cfg.cameras.views, cfg.cameras.radius) == (3.0, 0.5, 6, 2.0)
    assert (cfg.loss.reference_rgb, cfg.loss.reference_mask) == (0.3, 0.01)
    teacher = resolve("reference").teacher
    assert (teacher.shading, teacher.imperfection) == ("lit", "none")  # geometry runs see shaded targets
    assert resolve("reference", None, {"teacher": {"shading": "albedo", "imperfection": "moderate"}}).teacher == \
        type(teacher)("reference", None, "auto", "albedo", "moderate")


def test_precedence_preset_then_file_then_flags(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text("seed = 7\n[schedule]\nsteps = 3\niterations = 4\n")
    cfg = resolve("reference", f, {"schedule": {"iterations": 9}})
    assert (cfg.seed, cfg.schedule.steps, cfg.schedule.iterations) == (7, 3, 9)
    assert cfg.teacher.name == "reference"


def test_saved_json_config_reproduces(tmp_path: Path):
    import json

    cfg = resolve("reference", None, {"seed": 5, "cameras": {"views": 3}})
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"config": cfg.to_dict()}))
    again = resolve("reference", f)
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"schedule": {"iterations": 0}}, "--iters"),
        ({"cameras": {"views": 0}}, "--views"),
        ({"cameras": {"resolution": 3}}, "--res"),
        ({"schedule": {"t_start": 0.1, "t_end": 0.5}}, "t_end <= t_start"),
        ({"schedule": {"nope": 1}}, "unknown setting 'schedule.nope'"),
        ({"schedule": {"steps": "many"}}, "must be a number"),
        ({"schedule": {"steps": 1.5}}, "whole number"),
        ({"teacher": {"shading": "flat"}}, r"--shading \(teacher.shading\) must be lit or albedo, got 'flat'"),
        ({"teacher": {"imperfection": "heavy"}}, r"--imperfection \(teacher.imperfection\) must be none or moderate, got 'heavy'"),
        ({"teacher": {"name": "stable-zero123", "imperfection": "moderate"}},
         r"--imperfection \(teacher.imperfection\) applies to the reference teacher only, not 'stable-zero123'"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        resolve("reference", None, overrides)
    assert "\n" not in str(info.value)


def test_unknown_preset_and_missing_file(tmp_path: Path):
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        resolve("nope")
    with pytest.raises(UserError, match="config file not found"):
        resolve("reference", tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[schedule\n")
    with pytest.raises(UserError, match="cannot parse"):
        resolve("reference", bad)


def test_defaults_validate():
    RunConfig().validate()


def test_a_preset_extends_another_table_by_table(tmp_path, monkeypatch):
    from microdreamer import config

    monkeypatch.setattr(config, "PRESET_DIR", tmp_path)
    (tmp_path / "base.toml").write_text('[schedule]\niterations = 7\nsteps = 3\n[cameras]\nviews = 5\n')
    (tmp_path / "child.toml").write_text('extends = "base"\nmethod = "lgm"\n[schedule]\nsteps = 9\n')
    cfg = resolve("child")
    assert (cfg.schedule.iterations, cfg.schedule.steps, cfg.cameras.views, cfg.method) == (7, 9, 5, "lgm")
    assert cfg.preset == "child" and "extends" not in config.load_preset("child")
    (tmp_path / "base.toml").write_text('extends = "child"\n')
    with pytest.raises(UserError, match=r"preset 'child' extends itself \(through child → base\)"):
        resolve("child")
    (tmp_path / "base.toml").write_text('extends = "nowhere"\n')
    with pytest.raises(UserError, match="unknown preset 'nowhere'"):
        resolve("child")
