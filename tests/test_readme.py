"""Every command block of README.md, run as written, so that no sentence of it can quietly stop being true.

Each fenced block is split into commands. ``microdreamer …`` commands run as a user types them, in one
sandbox folder (later commands see what earlier ones wrote), with the weights they name replaced by tiny
models of the same classes in a Hugging Face cache (offline): the default model ids resolve there exactly as
they would after a download. Python blocks run as scripts in the same sandbox. Install and test commands
cannot run here (they need the network, or are this suite): they must be what ``.ci/run`` runs, which CI
executes on a fresh clone. GPU-only commands are parsed, not run. A command nothing here knows how to check
fails the test: teach this file about it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_loading import _fake_cache
from tiny_models import build_tiny_clip, build_tiny_mvdream, build_tiny_zero123

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = (ROOT / ".ci" / "run", ROOT / "scripts" / "test")  # CI's entry point and the test script it runs
SPOT = ROOT / "microdreamer" / "assets" / "spot" / "spot.obj"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def commands(body: str) -> list[str]:
    """The commands of a shell block: one per line (``\\`` continues it), comments dropped, ``&&`` split."""
    joined = body.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split("&&")]
    return out


def ci_text() -> str:
    """What CI executes, with ``source`` spelled ``.``."""
    return "\n".join(p.read_text() for p in CI).replace("source ", ". ")


def _photo(path: Path, azimuth: float = 0.0) -> Path:
    """An RGBA render of the bundled cow, as a user's transparent PNG."""
    from microdreamer.sir.cameras import Cameras
    from microdreamer.teachers.reference import ReferenceTeacher

    out = ReferenceTeacher(SPOT, resolution=128).render(Cameras.orbit([0.0], [azimuth], 2.0, 128))
    rgba = torch.cat([out.rgb, out.alpha], 1)[0].permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgba * 255 + 0.5).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A working folder with the files the README's examples name, and a hub cache holding tiny models
    under the default ids (downloads off)."""
    root = tmp_path_factory.mktemp("readme")
    hub = root / "hub"
    _fake_cache(hub, build_tiny_zero123(root / "zero123"), "ashawkey/stable-zero123-diffusers")
    _fake_cache(hub, build_tiny_mvdream(root / "mvdream"), "ashawkey/mvdream-sd2.1-diffusers")
    _fake_cache(hub, build_tiny_clip(root / "clip"), "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
    work = root / "work"
    _photo(work / "photo.png")
    _photo(work / "cat.png", 30.0)
    _photo(work / "photos" / "cow.png", 60.0)
    (work / "objaverse_lvis").mkdir()
    for name in ("spot.obj", "spot.mtl", "spot_texture.png"):  # a mesh folder, as `distill prepare` takes
        (work / "objaverse_lvis" / name).write_bytes((SPOT.parent / name).read_bytes())
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    return work, env


def _run(args: list[str], work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{shlex.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


def check_command(command: str, work: Path, env: dict[str, str]) -> None:
    """Run or verify one README command (see the module docstring)."""
    args = shlex.split(command)
    ci = ci_text()
    if args[0] == "torchrun" and "-m" in args:  # a multi-GPU launch of a microdreamer command
        args = ["microdreamer", *args[args.index("-m") + 2:]]
        assert args[1:3] in (["distill", "stage1"], ["distill", "stage2"]), f"README launches {command!r} with torchrun"
    if args[:3] in (["microdreamer", "distill", "stage1"], ["microdreamer", "distill", "stage2"]):
        _check_parses(args[1:])  # GPU-hours of training: its options must parse, it cannot run here
    elif args[0] == "microdreamer":
        _run([str(Path(sys.executable).with_name("microdreamer")), *args[1:]], work, env)
    elif args[:3] == ["python3", "-m", "venv"] or args[0] in (".", "source"):
        assert command.replace("source ", ". ") in ci, f"README set-up step {command!r} is not what CI does"
    elif args[0] in ("pip", "python") and "pip" in args[:3] and "install" in args:
        _check_install(args, ci)
    elif args[:3] == ["python", "-m", "pytest"] or args[0].startswith("./") or args[0] == "bash":
        assert command in ci, f"README test command {command!r} is not what .ci/run runs"
    elif args[0] == "python" and args[1].startswith("benchmarks/"):
        _check_benchmark(args, work, env)
    elif args[0] == "python" and args[1].startswith("examples/"):
        _run([sys.executable, str(ROOT / args[1]), *args[2:]], work, env)
    else:
        pytest.fail(f"README command {command!r}: nothing in tests/test_readme.py knows how to check it")


def _check_parses(args: list[str]) -> None:
    """The command line's parser accepts ``args`` (option names, types, ranges), without running it."""
    import typer

    from microdreamer.cli import app

    command, rest, context = typer.main.get_command(app), list(args), None
    while getattr(command, "commands", None):  # the sub-commands down to the one the arguments name
        name = rest.pop(0)
        context = command.make_context(name, [], parent=context, resilient_parsing=True)
        command = command.commands[name]
    command.make_context(command.name, rest, parent=context)  # raises a usage error if they do not parse


def _check_install(args: list[str], ci: str) -> None:
    """Installs cannot run offline: the torch pin must be .ci/run's and every extra must exist."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for arg in args:
        for extra in re.findall(r"\[([\w,-]+)\]", arg):
            for name in extra.split(","):
                assert name in extras, f"README installs the extra [{name}], which pyproject.toml does not define"
        if arg.startswith("torch=="):
            assert arg in ci, f"README pins {arg}, .ci/run does not"
        if arg in ("-c", "--constraint"):
            constraint = args[args.index(arg) + 1]
            assert (ROOT / constraint).is_file() and constraint in ci, f"constraints file {constraint} not used by CI"


#: runs a script up to its argument parsing, which must accept the arguments, and stops there
_PARSE_ONLY = """
import argparse, os, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_and_stop(self, *args, **kwargs):
    parse(self, *args, **kwargs)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_and_stop
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python SCRIPT` puts the script's folder first
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _check_benchmark(args: list[str], work: Path, env: dict[str, str]) -> None:
    """A benchmark for a GPU cannot run here: its script must exist and accept the README's arguments."""
    script = ROOT / args[1]
    assert script.is_file(), f"{args[1]} does not exist"
    _run([sys.executable, "-c", _PARSE_ONLY, str(script), *args[2:]], work, env)


@pytest.mark.slow
def test_every_command_block_of_the_readme_holds(sandbox):
    work, env = sandbox
    found = blocks(README.read_text())
    assert found, "the README has no command blocks"
    for language, body in found:
        if language == "python":
            _run([sys.executable, "-c", body], work, env)
        elif language in ("bash", "sh", "shell", ""):
            for command in commands(body):
                check_command(command, work, env)
