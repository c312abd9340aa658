"""The install the README gives: bounded dependency ranges, the pinned set CI and the README use, and the
test command CI runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_UNPINNED = {"rembg", "onnxruntime"}  # the rembg extra is not part of the tested set


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in map(Requirement, listed) if canonicalize_name(r.name) != "microdreamer"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not a pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_is_bounded_above():
    for req in _requirements():
        assert any(s.operator in ("<", "<=", "~=", "==") for s in req.specifier), f"{req} has no upper bound"


def test_constraints_pin_every_dependency_inside_its_range():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in OPTIONAL_UNPINNED:
            continue
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"


def _readme_block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).strip()


def test_ci_runs_the_readme_test_command_which_installs_with_the_constraints():
    command = _readme_block_after("## Run the tests")
    assert "\n" not in command  # one line
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [command]
    script = (ROOT / command.removeprefix("./")).read_text()
    assert 'pip install -q -e ".[dev,ray]" -c constraints.txt' in script
    assert script.rstrip().endswith('exec python -m pytest -q "$@"')  # pytest's exit code, 5 (no tests) included


def test_readme_installs_use_the_constraints():
    text = (ROOT / "README.md").read_text()
    installs = re.findall(r"pip install [^`&\n]*", text)
    project_installs = [i for i in installs if '-e "' in i]
    assert project_installs and all("-c constraints.txt" in i for i in project_installs), project_installs
    assert "https://download.pytorch.org/whl/cpu" in text  # the CPU build of torch on Linux
    assert '".[models,cuda]"' in text and "nvcc" in text  # the GPU install brings gsplat, which compiles on first use
