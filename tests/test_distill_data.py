"""`microdreamer distill prepare`: meshes and images → square condition images on gray 127 at elevation 0, with
a manifest; bad inputs are one line, a failing input is recorded and the others go on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from microdreamer.cli import main
from microdreamer.distill.data import GRAY, MANIFEST, load_conditions
from microdreamer.io.images import load_image, save_image


def _cube(path: Path) -> Path:
    """A green unit cube (OBJ with vertex colours)."""
    corners = [(x, y, z) for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)]
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    lines = [f"v {x} {y} {z} 0 1 0" for x, y, z in corners]
    lines += [f"f {a + 1} {b + 1} {c + 1}\nf {a + 1} {c + 1} {d + 1}" for a, b, c, d in quads]
    path.write_text("\n".join(lines) + "\n")
    return path


def _picture(path: Path, colour=(200, 40, 40)) -> Path:
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[10:50, 30:50, :3] = colour
    rgba[10:50, 30:50, 3] = 255
    save_image(path, rgba)
    return path


def test_meshes_and_images_become_gray_square_conditions_with_a_manifest(tmp_path, capsys):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    _cube(inputs / "sub" / "cube.obj")
    _picture(inputs / "red.png")
    (inputs / "notes.txt").write_text("not an input")
    out = tmp_path / "conditions"
    assert main(["distill", "prepare", str(inputs), "--out", str(out), "--views", "8", "--size", "320"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    names = ["red.png"] + [f"cube_az{a:03d}.png" for a in range(0, 360, 45)]
    assert [r["file"] for r in manifest["items"]] == names
    assert [r.get("azimuth") for r in manifest["items"]] == [None] + [float(a) for a in range(0, 360, 45)]
    assert (manifest["background"], manifest["elevation"], manifest["size"], manifest["failed"]) == (127, 0.0, 320, [])
    assert "ignored 1 file" in capsys.readouterr().err
    shapes = {}
    for record in manifest["items"]:
        rgb = load_image(out / record["file"])[:, :, :3].astype(int)
        assert rgb.shape == (320, 320, 3)
        assert (rgb[:4, :4] == GRAY).all() and (rgb[-4:, -4:] == GRAY).all()  # gray corners
        foreground = np.abs(rgb - GRAY).sum(-1) > 30
        rows, cols = np.flatnonzero(foreground.any(1)), np.flatnonzero(foreground.any(0))
        shapes[record["file"]] = (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        assert abs(max(shapes[record["file"]]) - 320 * 0.8) <= 2  # recentred: longer side size·(1 − border)
    # elevation 0: facing a side, the camera sees only that square face (top and bottom are edge-on); from
    # above or below the top or bottom face would make the silhouette taller than wide. At 45° two faces show,
    # and the near vertical edge, closer than the far corners are apart, makes it taller than wide.
    for azimuth in range(0, 360, 90):
        height, width = shapes[f"cube_az{azimuth:03d}.png"]
        assert abs(height - width) <= 2, (azimuth, height, width)
    height, width = shapes["cube_az045.png"]
    assert height > width + 10
    red = load_image(out / "red.png")[:, :, :3]
    assert (red[160, 160] == [200, 40, 40]).all()
    assert len(load_conditions(out)) == 9


def test_a_bad_input_is_recorded_and_the_others_go_on(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _picture(inputs / "good.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    (inputs / "empty.obj").write_text("")
    out = tmp_path / "out"
    assert main(["distill", "prepare", str(inputs), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2 inputs failed" in err
    manifest = json.loads((out / MANIFEST).read_text())
    assert [r["file"] for r in manifest["items"]] == ["good.png"]
    failed = {Path(r["source"]).name: r["error"] for r in manifest["failed"]}
    assert set(failed) == {"broken.png", "empty.obj"}
    assert "mesh file is empty" in failed["empty.obj"] and all("\n" not in e for e in failed.values())


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda d: d / "missing.png", [], "input not found"),
        (lambda d: (d / "a.txt").write_text("x") and d / "a.txt", [], "is neither an image nor a mesh"),
        (lambda d: (d / "empty").mkdir() or d / "empty", [], "holds no images or meshes"),
        (lambda d: _picture(d / "p.png"), ["--size", "256"], "--size must be at least 320"),
        (lambda d: _picture(d / "p.png"), ["--views", "0"], "--views must be at least 1"),
    ],
)
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, make, extra, message):
    source = make(tmp_path)
    out = tmp_path / "out"
    assert main(["distill", "prepare", str(source), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not out.exists()


def test_an_earlier_prepare_and_clashing_names_are_refused(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _picture(tmp_path / "a" / "cat.png"), _picture(tmp_path / "b" / "cat.jpg")
    out = tmp_path / "out"
    assert main(["distill", "prepare", str(first), str(second), "--out", str(out)]) == 2
    assert "would write the same condition images ('cat')" in capsys.readouterr().err
    assert main(["distill", "prepare", str(first), "--out", str(out)]) == 0
    assert main(["distill", "prepare", str(first), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["distill", "prepare", str(first), "--out", str(out), "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
