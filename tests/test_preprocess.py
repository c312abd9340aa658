"""Background removal, recentring and the preprocess-file contract."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from microdreamer.errors import UserError
from microdreamer.io.images import load_image
from microdreamer.preprocess import (
    is_preprocessed_output,
    preprocess,
    preprocess_file,
    preprocessed_path,
    uniform_background_alpha,
)


def bbox(alpha: np.ndarray) -> tuple[float, float, int, int]:
    """(centre row, centre column, height, width) of ``alpha > 0``, in pixel-edge coordinates."""
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    height, width = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
    return rows[0] + height / 2, cols[0] + width / 2, height, width


def disk(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size] + 0.5
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture
def no_rembg(monkeypatch):
    """Make ``import rembg`` fail, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "rembg", None)
    monkeypatch.setattr("microdreamer.preprocess._rembg_installed", lambda: False)


def fake_rembg(monkeypatch, *, new_session=None, remove=None) -> None:
    module = types.ModuleType("rembg")
    module.new_session = new_session or (lambda model: object())
    module.remove = remove or (lambda image, session: image.convert("RGBA"))
    monkeypatch.setitem(sys.modules, "rembg", module)
    monkeypatch.setattr("microdreamer.preprocess._rembg_installed", lambda: True)


def coloured_disk_jpg(path, *, side=200, centre=(70.0, 120.0), radius=40.0, background=(255, 255, 255)):
    image = np.empty((side, side, 3), np.uint8)
    image[:] = background
    image[disk(side, centre, radius)] = (200, 40, 30)
    Image.fromarray(image).save(path, quality=90)
    return path


def test_rgba_keeps_alpha_and_is_recentred(monkeypatch):
    fake_rembg(monkeypatch, remove=lambda image, session: pytest.fail("alpha present: rembg must not run"))
    rgba = np.zeros((300, 200, 4), np.uint8)
    rgba[20:120, 10:50] = (10, 200, 30, 255)  # 100 tall, 40 wide, far from the centre
    rgba[20:120, 10] = (10, 200, 30, 128)  # a half-transparent edge column is kept as such
    out = preprocess(rgba)
    assert out.shape == (256, 256, 4) and out.dtype == np.uint8
    row, col, height, width = bbox(out[:, :, 3])
    assert abs(row - 128) <= 1 and abs(col - 128) <= 1
    assert abs(height - 256 * 0.8) <= 2 and abs(width - 256 * 0.8 * 0.4) <= 2
    assert (out[60:190, 100:150, 3] == 255).all()
    assert (out[60:190, 100:150, :3] == (10, 200, 30)).all()
    assert 100 <= out[128, int(col - width / 2), 3] <= 160
    assert (out[0, 0, :3] == (10, 200, 30)).all()  # hidden pixels carry the nearest visible colour
    assert out[:25, :, 3].max() == 0 and out[:, :85, 3].max() == 0 and out[:, 172:, 3].max() == 0


@pytest.mark.parametrize("background", [(255, 255, 255), (90, 140, 200)])
def test_uniform_fallback_recovers_the_disk(tmp_path, background):
    path = coloured_disk_jpg(tmp_path / "disk.jpg", background=background)
    image = load_image(path)
    alpha = uniform_background_alpha(image[:, :, :3])
    assert iou(alpha > 127, disk(200, (70.0, 120.0), 40.0)) > 0.95
    out = preprocess(image, remove_background="uniform")
    truth = disk(256, (128.0, 128.0), 256 * 0.8 / 2)
    assert iou(out[:, :, 3] > 127, truth) > 0.95


def test_uniform_fallback_alpha_follows_edge_coverage():
    side, factor = 96, 8
    fine = disk(side * factor, (side * factor / 2, side * factor / 2), 30.3 * factor)
    coverage = fine.reshape(side, factor, side, factor).mean(axis=(1, 3))
    colour, background = np.array([30.0, 160.0, 60.0]), np.array([240.0, 235.0, 220.0])
    image = np.floor(coverage[..., None] * colour + (1 - coverage[..., None]) * background + 0.5).astype(np.uint8)
    alpha = uniform_background_alpha(image) / 255.0
    assert np.abs(alpha - coverage).max() < 0.02
    edge = (coverage > 0) & (coverage < 1)
    assert np.abs(alpha - coverage)[edge].mean() < 0.01


def test_uniform_fallback_drops_specks_and_fills_holes():
    image = np.full((120, 120, 3), 255, np.uint8)
    body = disk(120, (60.0, 60.0), 30.0)
    image[body] = (0, 0, 200)
    image[55:65, 55:65] = 255  # a white patch inside the object
    image[5:7, 100:102] = 0  # a speck of dirt
    alpha = uniform_background_alpha(image)
    assert (alpha[56:64, 56:64] == 255).all()
    assert alpha[5:7, 100:102].max() == 0
    assert iou(alpha > 127, body) > 0.97


def test_uniform_fallback_rejects_busy_background():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(UserError, match="rembg"):
        preprocess(noise, remove_background="uniform")


def test_auto_without_rembg_uses_uniform_fallback(tmp_path, no_rembg):
    out = preprocess(load_image(coloured_disk_jpg(tmp_path / "d.jpg")))
    assert iou(out[:, :, 3] > 127, disk(256, (128.0, 128.0), 102.4)) > 0.95


def test_none_keeps_the_whole_picture(tmp_path):
    out = preprocess(load_image(coloured_disk_jpg(tmp_path / "d.jpg")), remove_background="none")
    row, col, height, width = bbox(out[:, :, 3])
    assert (out[26:230, 26:230, 3] == 255).all() and out[:25, :, 3].max() == 0
    assert abs(row - 128) <= 1 and abs(col - 128) <= 1 and abs(height - 204.8) <= 2 and abs(width - 204.8) <= 2


def test_rembg_missing_is_a_user_error(no_rembg):
    with pytest.raises(UserError) as error:
        preprocess(np.full((32, 32, 3), 255, np.uint8), remove_background="rembg")
    message = str(error.value)
    assert "--no-rembg" in message and 'pip install "microdreamer[rembg]"' in message and "\n" not in message


def test_rembg_without_its_model_is_a_user_error(monkeypatch):
    def offline(model):
        raise ConnectionError("Failed to download\nu2net.onnx")

    fake_rembg(monkeypatch, new_session=offline)
    with pytest.raises(UserError) as error:
        preprocess(np.full((32, 32, 3), 255, np.uint8))  # auto picks rembg when it is installed
    assert "--no-rembg" in str(error.value) and "\n" not in str(error.value)


def test_rembg_mask_is_used(monkeypatch):
    def remove(image, session):
        cut = image.convert("RGBA")
        alpha = np.zeros((64, 64), np.uint8)
        alpha[10:30, 40:50] = 255
        cut.putalpha(Image.fromarray(alpha))
        return cut

    fake_rembg(monkeypatch, remove=remove)
    out = preprocess(np.full((64, 64, 3), 128, np.uint8), size=128)
    _, _, height, width = bbox(out[:, :, 3])
    assert abs(height - 128 * 0.8) <= 2 and abs(width - 128 * 0.8 / 2) <= 2


def test_fully_transparent_and_unknown_mode_are_user_errors():
    with pytest.raises(UserError, match="transparent"):
        preprocess(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(UserError, match="unknown"):
        preprocess(np.zeros((8, 8, 3), np.uint8), remove_background="magic")


def test_preprocess_file_dotted_name_and_no_silent_overwrite(tmp_path):
    source = coloured_disk_jpg(tmp_path / "my.cat.v2.jpg")
    out_dir = tmp_path / "out"
    out = preprocess_file(source, out_dir, remove_background="uniform")
    assert out == out_dir / "my.cat.v2_rgba.png" == preprocessed_path(source, out_dir)
    written = load_image(out)
    assert written.shape == (256, 256, 4) and written[:, :, 3].max() == 255 and written[0, 0, 3] == 0
    assert is_preprocessed_output(out) and not is_preprocessed_output(source)
    before = out.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        preprocess_file(source, out_dir, remove_background="none")
    assert out.read_bytes() == before
    preprocess_file(source, out_dir, remove_background="none", overwrite=True)
    assert load_image(out)[0, 128, 3] == 0 and load_image(out)[128, 28, 3] == 255
    assert sorted(p.name for p in out_dir.iterdir()) == ["my.cat.v2_rgba.png"]


def test_preprocess_file_bad_inputs_are_user_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture\n")
    with pytest.raises(UserError, match="notes.txt"):
        preprocess_file(tmp_path / "notes.txt", tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(UserError, match="broken.png"):
        preprocess_file(tmp_path / "broken.png", tmp_path)
    noise = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "busy.png")
    with pytest.raises(UserError, match="busy.png"):
        preprocess_file(tmp_path / "busy.png", tmp_path, remove_background="uniform")
    assert not any(is_preprocessed_output(p) for p in tmp_path.iterdir())


def shadowed_scene(colour, blur: float, side: int = 200, darkness: float = 0.4):
    """An ellipse of ``colour`` on a white (250) backdrop casting a soft shadow: the backdrop dimmed by up to
    ``darkness``, a shifted ellipse blurred by ``blur`` px; light noise as a camera adds. Returns the image,
    the object's mask and the shadow's dimming."""
    y, x = np.mgrid[:side, :side] + 0.5
    obj = ((y - 0.45 * side) / (0.225 * side)) ** 2 + ((x - 0.45 * side) / (0.175 * side)) ** 2 <= 1
    cast = ((y - 0.65 * side) / (0.125 * side)) ** 2 + ((x - 0.6 * side) / (0.275 * side)) ** 2 <= 1
    shade = darkness * ndimage.gaussian_filter(cast.astype(np.float64), blur)
    image = 250.0 * (1.0 - shade)[..., None] * np.ones(3)
    image[obj] = colour
    image += np.random.default_rng(0).normal(0.0, 2.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), obj, shade


@pytest.mark.parametrize("colour", [(200, 40, 30), (60, 60, 60), (200, 200, 200)], ids=["red", "dark", "grey"])
def test_uniform_fallback_leaves_a_soft_shadow_as_background(colour):
    image, obj, shade = shadowed_scene(colour, blur=8.0)
    alpha = uniform_background_alpha(image)
    # the object: all but its one-pixel soft edge band
    assert iou(alpha > 127, obj) > 0.95
    # the shadow, from two pixels off the object (its edge band) on: background
    shadow = (shade > 0.02) & (ndimage.distance_transform_edt(~obj) > 2)
    assert (alpha[shadow] == 0).mean() > 0.99
    out = preprocess(np.dstack([image, np.full(obj.shape, 255, np.uint8)]), remove_background="uniform")
    _, _, height, width = bbox(out[:, :, 3])  # the crop is the object's, not object + shadow
    assert abs(height - 256 * 0.8) <= 1 and abs(width - 256 * 0.8 * 0.175 / 0.225) <= 2


def test_uniform_fallback_keeps_what_it_cannot_tell_from_a_shadow():
    # a grey object whose very soft shadow hides more of its outline than can be bridged: object and shadow
    # share the backdrop's hue and no outline closes, so both stay rather than the object being lost
    image, obj, shade = shadowed_scene((200, 200, 200), blur=24.0)
    alpha = uniform_background_alpha(image)
    assert (alpha[obj] > 127).mean() > 0.99


def test_preprocessing_a_reduced_decode_matches_the_full_image(tmp_path):
    y, x = np.mgrid[:1200, :1600] + 0.5
    inside = ((y - 564) / 360) ** 2 + ((x - 840) / 280) ** 2 <= 1
    image = np.where(inside[..., None], np.array([200.0, 40.0, 30.0]) + 20 * np.sin(x / 60.0)[..., None], 250.0)
    Image.fromarray(np.round(image).astype(np.uint8)).save(tmp_path / "e.png")
    small = preprocess(load_image(tmp_path / "e.png", max_side=512), remove_background="uniform")
    full = preprocess(load_image(tmp_path / "e.png"), remove_background="uniform")
    # The reduced decode is the 4×4 block mean (test_images); the object's bounding box is then found to
    # one reduced pixel, 4 source pixels = 205/180 ≈ 1.14 output pixels (the 720-pixel-tall object becomes
    # 205). Shifting the outline by that much changes at most perimeter × 1.14 pixels of the mask:
    # 577 × 1.14 / 25 800 ≈ 2.5 % of the ellipse's area.
    assert iou(small[:, :, 3] > 127, full[:, :, 3] > 127) > 0.97
    # Inside, colours differ by the 8-bit rounding of the block mean (0.5) plus the shading's change over
    # that shift (20/60 per source pixel × 4 source pixels ≈ 1.3 levels).
    inner = ndimage.binary_erosion((small[:, :, 3] == 255) & (full[:, :, 3] == 255), iterations=3)
    assert np.abs(small[:, :, :3].astype(int) - full[:, :, :3])[inner].max() <= 2


def test_preprocess_messages_name_the_input_once_and_list_earlier_outputs(tmp_path, capsys):
    from microdreamer.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(photos / "plain.png")
    coloured_disk_jpg(photos / "cat.jpg")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(photos / "cat_rgba.png")  # an earlier output
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(photos / "lone_rgba.png")  # so is any *_rgba.png
    empty = "the file is empty (0 bytes), not an image; supply a PNG, JPG or WebP image"

    assert main(["preprocess", str(photos / "empty.png")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {photos / 'empty.png'}: {empty}"

    out = tmp_path / "out"
    assert main(["preprocess", str(photos), "--no-rembg", "-o", str(out), "-q"]) == 1
    failed = sorted(capsys.readouterr().err.strip().splitlines())
    assert failed[0] == f"failed: {photos / 'empty.png'}: {empty}"
    assert failed[1].startswith(f"failed: {photos / 'plain.png'}: no object stands out")
    assert all(line.count("photos") == 1 for line in failed)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {Path(e["input"]).name: e["error"] for e in manifest["entries"]}["empty.png"] == empty
    assert manifest["earlier_outputs"] == [str(photos / "cat_rgba.png"), str(photos / "lone_rgba.png")]
    assert manifest["ignored"] == []

    assert main(["preprocess", str(photos), "--no-rembg", "-o", str(out), "--skip-existing"]) == 1
    summary = " ".join(capsys.readouterr().err.split())
    assert "left out 2 earlier outputs, not inputs: cat_rgba.png, lone_rgba.png" in summary
