"""``microdreamer doctor`` on this CPU-only machine, and its reports for GPUs, broken builds and cached models."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from microdreamer import doctor
from microdreamer.cli import main
from microdreamer.render import _build
from microdreamer.video import ffmpeg_exe


def _by_name(checks) -> dict:
    return {c["name"] if isinstance(c, dict) else c.name: c for c in checks}


def test_doctor_runs_here_and_prints_only_json(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = _by_name(report["checks"])
    assert report["ok"] is True
    assert checks["torch"]["detail"].startswith(torch.__version__)
    for name in ("gsplat", "nvdiffrast", "nerfacc", "tinycudann", "C++ gaussians kernel", "C++ mesh kernel",
                 "C++ volume kernel",
                 "ffmpeg", "rembg", "stable-zero123", "zero123-xl"):
        assert name in checks, name
    assert all(c["status"] in doctor.STATUSES for c in report["checks"])
    if not torch.cuda.is_available():
        assert checks["cuda"]["status"] == "missing"
        for backend in ("gsplat", "nvdiffrast"):  # never "ok" without a GPU
            assert checks[backend]["status"] in ("missing", "warn")
    if ffmpeg_exe() is not None:
        assert checks["ffmpeg"]["status"] == "ok"
    assert "non-commercial" in checks["stable-zero123"]["detail"]


def test_only_backends_the_code_uses_are_listed():
    """Every GPU package the doctor checks is imported by a renderer, and every optional GPU package a
    renderer imports is checked (nothing is listed before something uses it)."""
    package = Path(doctor.__file__).parent
    sources = {p: p.read_text() for p in package.rglob("*.py") if p.name != "doctor.py"}
    imported = {m.group(1) for text in sources.values()
                for m in re.finditer(r"^\s*(?:from|import) (\w+)", text, re.MULTILINE)}
    imported |= {m.group(1) for text in sources.values() for m in re.finditer(r"find_spec\(\"(\w+)\"\)", text)}
    listed = {module for module, _ in doctor.GPU_BACKENDS}
    assert listed == {"gsplat", "nvdiffrast", "nerfacc", "tinycudann"}
    assert listed <= imported
    known_gpu_packages = {"gsplat", "nvdiffrast", "nerfacc", "tinycudann", "diff_gaussian_rasterization", "simple_knn"}
    assert imported & known_gpu_packages == listed
    names = {c.name for c in doctor.check_backends(build_kernels=False)}
    assert listed <= names


def test_table_output_and_no_build(capsys):
    assert main(["doctor", "--no-build"]) == 0
    out = capsys.readouterr().out
    assert "microdreamer doctor" in out and "not checked" in out


def test_gpu_memory_is_reported_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((10 + i) * 1024**3, 80 * 1024**3))
    checks = _by_name(doctor.check_devices())
    assert checks["cuda:0"].status == "ok" and checks["cuda:0"].detail == "Fake GPU 0, 10.0 GiB free of 80.0 GiB"
    assert checks["cuda:1"].detail == "Fake GPU 1, 11.0 GiB free of 80.0 GiB"


def test_a_kernel_that_cannot_build_is_a_warning_not_a_failure(monkeypatch):
    def broken(name):
        raise _build.ExtensionUnavailable(f"no compiler for {name}")

    monkeypatch.setattr(_build, "load_extension", broken)
    checks = _by_name(doctor.check_backends())
    assert checks["C++ mesh kernel"].status == "warn" and "no compiler for mesh" in checks["C++ mesh kernel"].detail
    assert doctor.to_dict(list(checks.values()))["ok"] is True


def test_a_broken_section_is_an_error_and_exit_1(monkeypatch, capsys):
    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(doctor, "check_devices", boom)
    checks = doctor.run_checks(build_kernels=False)
    errors = [c for c in checks if c.status == "error"]
    assert len(errors) == 1 and errors[0].detail == "driver exploded"
    assert any(c.name == "torch" for c in checks) and any(c.name == "ffmpeg" for c in checks)  # the rest still ran
    assert main(["doctor", "--json", "--no-build"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_model_cache_state_and_size(tmp_path: Path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from test_loading import _fake_cache
    from tiny_models import build_tiny_zero123

    model = build_tiny_zero123(tmp_path / "model")
    hub = tmp_path / "hub"
    snapshot = _fake_cache(hub, model, "ashawkey/zero123-xl-diffusers")
    size = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())
    checks = _by_name(doctor.check_models(hub))
    assert checks["cache"].detail.startswith(str(hub))
    assert checks["zero123-xl"].status == "ok" and f"{size / 1024**3:.1f} GiB" in checks["zero123-xl"].detail
    assert checks["stable-zero123"].status == "missing"
    shutil.rmtree(snapshot / "vae")
    assert _by_name(doctor.check_models(hub))["zero123-xl"].status == "warn"
