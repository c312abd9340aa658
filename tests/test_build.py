"""The compiled-kernel cache: one folder per (source, flags, compiler, torch, Python) and portable flags."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from microdreamer.render import _build

BASE = dict(torch_version="2.5.1", compiler="c++: gcc 12.2.0", python_abi="cpython-312-x86_64")


def test_the_key_changes_with_each_input_and_only_then():
    key = _build.build_key(b"int f();", ("-O3",), **BASE)
    assert key == _build.build_key(b"int f();", ("-O3",), **BASE)
    variants = [
        _build.build_key(b"int g();", ("-O3",), **BASE),
        _build.build_key(b"int f();", ("-O3", "-mavx2", "-mfma"), **BASE),
        _build.build_key(b"int f();", ("-O3",), **{**BASE, "torch_version": "2.6.0"}),
        _build.build_key(b"int f();", ("-O3",), **{**BASE, "compiler": "c++: gcc 13.1.0"}),
        _build.build_key(b"int f();", ("-O3",), **{**BASE, "python_abi": "cpython-311-x86_64"}),
    ]
    assert len({key, *variants}) == 1 + len(variants)


@pytest.mark.parametrize(
    ("machine", "capability", "expected"),
    [
        ("x86_64", "AVX512", ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl")),
        ("x86_64", "AVX2", ("-mavx2", "-mfma")),
        ("x86_64", "DEFAULT", ()),
        ("AMD64", "AVX2", ("-mavx2", "-mfma")),
        ("aarch64", "SVE256", ()),
        ("arm64", "DEFAULT", ()),
    ],
)
def test_the_baseline_follows_the_cpu_and_is_never_native(machine, capability, expected):
    flags = _build.cpu_baseline_flags(machine, capability)
    assert flags == expected
    assert not any(f.startswith(("-march", "-mcpu", "-mtune")) for f in flags)


def test_load_builds_in_the_keyed_folder_with_portable_flags(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("MICRODREAMER_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs) or "module")
    assert _build.load_extension.__wrapped__("gaussians") == "module"
    (call,) = calls
    flags = tuple(call["extra_cflags"])
    assert "-march=native" not in flags and {"-O3", "-fopenmp"} <= set(flags)
    folder = Path(call["build_directory"])
    assert folder.parent == tmp_path and folder.is_dir()
    assert folder == _build.build_directory("gaussians", flags)
    assert folder.name.startswith("gaussians-") and len(folder.name) == len("gaussians-") + 16


def test_the_folder_follows_the_torch_version_and_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MICRODREAMER_EXT_DIR", str(tmp_path))
    (tmp_path / "csrc").mkdir()
    source = tmp_path / "csrc" / "k.cpp"
    source.write_text("int f();")
    monkeypatch.setattr(_build, "CSRC", tmp_path / "csrc")
    first = _build.build_directory("k", ("-O3",))
    assert _build.build_directory("k", ("-O3",)) == first
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    other_torch = _build.build_directory("k", ("-O3",))
    source.write_text("int g();")
    other_source = _build.build_directory("k", ("-O3",))
    assert len({first, other_torch, other_source}) == 3


def test_the_built_kernel_is_loaded_from_its_keyed_folder():
    try:
        module = _build.load_extension("mesh")
    except _build.ExtensionUnavailable as error:
        pytest.skip(str(error))
    flags = _build.OPTIMISE + _build.cpu_baseline_flags()
    assert Path(module.__file__).parent == _build.build_directory("mesh", flags)


def test_a_killed_build_s_leftover_lock_does_not_block_later_loads():
    """torch waits forever on the ``lock`` file of a build that was killed; a fresh process loads anyway."""
    try:
        _build.load_extension("mesh")
    except _build.ExtensionUnavailable as error:
        pytest.skip(str(error))
    folder = _build.build_directory("mesh", _build.OPTIMISE + _build.cpu_baseline_flags())
    (folder / "lock").touch()  # as a build killed between taking and releasing torch's lock leaves it
    done = subprocess.run([sys.executable, "-c", "from microdreamer.render._build import load_extension\n"
                           "print(load_extension('mesh').__file__)"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).parent == folder and not (folder / "lock").exists()


@pytest.mark.skipif(_build.fcntl is None, reason="POSIX file locks")
def test_a_second_process_waits_for_the_build_in_progress(tmp_path):
    waiter = ("import sys, time\nfrom pathlib import Path\nfrom microdreamer.render._build import exclusive_build\n"
              "with exclusive_build(Path(sys.argv[1])):\n    print(time.monotonic())")
    with _build.exclusive_build(tmp_path):
        (tmp_path / "lock").touch()  # torch's lock of the build in progress: left alone while it runs
        second = subprocess.Popen([sys.executable, "-c", waiter, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        time.sleep(3.0)
        assert second.poll() is None and (tmp_path / "lock").exists()
        released = time.monotonic()
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0 and float(out) >= released
