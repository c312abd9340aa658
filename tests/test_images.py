"""Image loading, the reference-view tensors, atomic saving and the contact sheet."""

from __future__ import annotations

import math
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, JpegImagePlugin
from scipy import ndimage

from microdreamer.errors import UserError
from microdreamer.io.images import MAX_PIXELS, area_resize, image_grid, load_image, save_image, to_reference, to_uint8
from microdreamer.preprocess import DECODE_SIDE, load_input
from tolerances import assert_within, rounding_bound


def brute_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area resampling by brute force: replicate onto a common fine grid, then average blocks."""
    h, w, c = image.shape
    fine_h, fine_w = math.lcm(h, height), math.lcm(w, width)
    fine = np.repeat(np.repeat(image.astype(np.float64), fine_h // h, axis=0), fine_w // w, axis=1)
    return fine.reshape(height, fine_h // height, width, fine_w // width, c).mean(axis=(1, 3))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.mark.parametrize("shape_in,shape_out", [((16, 50), (50, 16)), ((40, 25), (16, 10)), ((9, 9), (6, 12))])
def test_area_resize_matches_brute_force(rng, shape_in, shape_out):
    image = rng.integers(0, 256, shape_in + (3,), dtype=np.uint8)
    np.testing.assert_allclose(area_resize(image, *shape_out), brute_area(image, *shape_out), atol=1e-9)


def test_load_png_rgba_exact_and_jpg_opaque(tmp_path, rng):
    rgba = rng.integers(0, 256, (12, 17, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgba)
    Image.fromarray(rgba[:, :, :3]).save(tmp_path / "b.webp", lossless=True)
    loaded = load_image(tmp_path / "b.webp")
    np.testing.assert_array_equal(loaded[:, :, :3], rgba[:, :, :3])
    assert (loaded[:, :, 3] == 255).all()
    Image.fromarray(rgba[:, :, :3]).save(tmp_path / "c.jpg", quality=95)
    jpg = load_image(tmp_path / "c.jpg")
    assert jpg.shape == (12, 17, 4) and jpg.dtype == np.uint8 and (jpg[:, :, 3] == 255).all()


def test_load_grey_16bit_is_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g.png")[0, :, 0], [0, 100, 255])


def test_exif_orientation_is_applied(tmp_path, rng):
    stored = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "r.png", exif=exif)
    loaded = load_image(tmp_path / "r.png")
    np.testing.assert_array_equal(loaded[:, :, :3], np.rot90(stored, k=-1))


def _assert_one_line_naming(error: pytest.ExceptionInfo, name: str) -> None:
    message = str(error.value)
    assert name in message and "\n" not in message


def test_bad_inputs_raise_user_error(tmp_path, rng):
    with pytest.raises(UserError) as error:
        load_image(tmp_path / "missing.png")
    _assert_one_line_naming(error, "missing.png")

    (tmp_path / "notes.png").write_text("hello, I am text\n")
    with pytest.raises(UserError) as error:
        load_image(tmp_path / "notes.png")
    _assert_one_line_naming(error, "notes.png")

    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as error:
        load_image(tmp_path / "cut.png")
    _assert_one_line_naming(error, "cut.png")

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    with pytest.raises(UserError) as error:
        load_image(tmp_path / "bad.jpg")
    _assert_one_line_naming(error, "bad.jpg")

    with pytest.raises(UserError) as error:
        load_image(tmp_path)
    _assert_one_line_naming(error, "folder")


def test_an_empty_file_is_called_empty(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError) as error:
        load_image(tmp_path / "empty.png")
    assert str(error.value) == f"{tmp_path / 'empty.png'}: the file is empty (0 bytes), not an image; " \
                               "supply a PNG, JPG or WebP image"


def _png_header(path, width: int, height: int):
    """A PNG with only its header: Pillow opens it and learns its size; decoding it would fail."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_the_size_limit_is_the_stated_one_and_checked_before_decoding(tmp_path):
    assert MAX_PIXELS == 150_000_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError) as error:  # 144 MP: within the limit, so decoding starts (and fails)
            load_image(_png_header(tmp_path / "ok.png", 12000, 12000))
        assert "truncated or corrupt" in str(error.value)
        with pytest.raises(UserError) as error:  # 156 MP: above ours, below Pillow's error limit
            load_image(_png_header(tmp_path / "big.png", 13000, 12000))
        assert str(error.value) == (f"{tmp_path / 'big.png'}: 13000x12000 pixels (156 MP) is above the 150-megapixel "
                                    "input limit; downscale it (4096 px on the longer side is plenty)")
        with pytest.raises(UserError) as error:  # 200 MP: Pillow refuses it while opening; the same message
            load_image(_png_header(tmp_path / "huge.png", 20000, 10000))
        assert str(error.value).startswith(f"{tmp_path / 'huge.png'}: the image is above the 150-megapixel input limit")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def _shaded_ellipse(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A red ellipse with smooth shading on a plain light background, and its mask."""
    y, x = np.mgrid[:height, :width] + 0.5
    inside = ((y - 0.47 * height) / (0.3 * height)) ** 2 + ((x - 0.525 * width) / (0.175 * width)) ** 2 <= 1
    shading = 20 * np.sin(x / 60.0)[..., None]
    return to_uint8(np.where(inside[..., None], np.array([200.0, 40.0, 30.0]) + shading, 250.0)), inside


@pytest.fixture
def jpeg_loads(monkeypatch) -> list[tuple[int, int]]:
    """The sizes at which JPEGs are decoded."""
    sizes: list[tuple[int, int]] = []
    load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    return sizes


def test_reduced_decoding_is_the_mean_of_pixel_blocks(tmp_path, jpeg_loads):
    image, inside = _shaded_ellipse(1600, 1200)
    Image.fromarray(image).save(tmp_path / "e.png")
    Image.fromarray(image).save(tmp_path / "e.jpg", quality=90)
    for name in ("e.png", "e.jpg"):
        small = load_image(tmp_path / name, max_side=512)
        assert set(jpeg_loads) <= {(400, 300)}  # a JPEG is decoded at 1/4 scale, not reduced afterwards
        full = load_image(tmp_path / name)
        assert small.shape == (300, 400, 4)  # 1600 / 4: the smallest power of two that fits 512
        difference = np.abs(small - full.astype(np.float64).reshape(300, 4, 400, 4, 4).mean(axis=(1, 3)))
        if name == "e.png":  # block averaging: the exact mean, rounded to 8 bits
            assert difference.max() <= 0.5
        else:  # libjpeg's 1/4-scale IDCT: the same within both roundings, away from the MCUs the edge crosses
            away = np.where(inside, ndimage.distance_transform_edt(inside), ndimage.distance_transform_edt(~inside))
            assert difference[(away > 16).reshape(300, 4, 400, 4).all(axis=(1, 3))].max() <= 1.0
    assert (400, 300) in jpeg_loads


def test_a_big_photo_is_decoded_reduced_for_preprocessing(tmp_path, jpeg_loads):
    photo = Image.new("RGB", (4000, 3000), (250, 250, 250))
    ImageDraw.Draw(photo).ellipse((1400, 600, 2600, 2400), fill=(200, 40, 30))
    photo.save(tmp_path / "big.jpg", quality=90)
    loaded = load_input(tmp_path / "big.jpg")
    assert DECODE_SIDE == 2048 and loaded.shape == (1500, 2000, 4)
    assert set(jpeg_loads) == {(2000, 1500)}  # libjpeg decoded it at half scale from the start


def test_to_reference_half_transparent_red_over_white():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:] = (255, 0, 0, 128)
    rgb, mask = to_reference(rgba)
    assert rgb.shape == (1, 3, 256, 256) and mask.shape == (1, 1, 256, 256)
    assert rgb.dtype == torch.float32 and mask.dtype == torch.float32
    a = 128 / 255
    torch.testing.assert_close(rgb[0, :, 100, 100], torch.tensor([1.0, 1 - a, 1 - a]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rgb.amin(dim=(2, 3))[0], torch.tensor([1.0, 1 - a, 1 - a]), atol=1e-6, rtol=0)
    assert abs(rgb[0, 1].mean().item() - 0.5) < 0.01
    torch.testing.assert_close(mask, torch.full_like(mask, a), atol=1e-6, rtol=0)
    black, _ = to_reference(rgba, background=(0.0, 0.0, 0.0))
    torch.testing.assert_close(black[0, :, 5, 5], torch.tensor([a, 0.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", [100, 320])
def test_to_reference_matches_brute_force_pipeline(rng, side):
    rgba = rng.integers(0, 256, (side, side, 4), dtype=np.uint8)
    big = np.clip(np.floor(brute_area(rgba, 800, 800) + 0.5), 0, 255) / 255.0
    image = torch.from_numpy(big).float().permute(2, 0, 1)[None]
    mask = image[:, 3:]
    expected_rgb = F.interpolate(image[:, :3] * mask + 1 - mask, (128, 128), mode="bilinear", align_corners=False)
    expected_mask = F.interpolate(mask, (128, 128), mode="bilinear", align_corners=False)
    rgb, got_mask = to_reference(rgba, resolution=128)
    # two float32 paths, each compositing (3 roundings) then a bilinear sum of 4 terms, values in [0, 1]
    bound = 2 * rounding_bound(1.0, n=4, ops=4)
    assert_within(rgb, expected_rgb, bound, "rgb")
    assert_within(got_mask, expected_mask, bound, "mask")


def test_to_reference_pads_non_square_without_squashing():
    rgba = np.zeros((50, 100, 4), np.uint8)
    rgba[:, :] = (0, 0, 255, 255)
    rgb, mask = to_reference(rgba, resolution=100)
    column = mask[0, 0, :, 50]
    assert column[:20].max() == 0 and column[30:70].min() == 1 and column[80:].max() == 0
    assert rgb[0, 2, 50, 50] == 1 and rgb[0, 0, 50, 50] == 0 and rgb[0, 0, 5, 50] == 1


def test_save_image_atomic_round_trips(tmp_path, rng):
    tensor = torch.from_numpy(rng.random((1, 3, 8, 9))).float()
    path = save_image(tmp_path / "out" / "t.png", tensor)
    expected = np.floor(tensor[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
    rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    save_image(tmp_path / "out" / "t.png", rgba)  # overwrite=True replaces
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgba)
    save_image(tmp_path / "out" / "t.webp", rgba[:, :, :3].astype(np.float32) / 255)
    assert Image.open(tmp_path / "out" / "t.webp").size == (6, 5)
    assert sorted(os.listdir(tmp_path / "out")) == ["t.png", "t.webp"]  # no temporary files left


def test_save_image_never_clobbers_and_rejects_unknown_extension(tmp_path):
    target = tmp_path / "keep.png"
    save_image(target, np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(UserError, match="already exists"):
        save_image(target, np.full((2, 2, 3), 255, np.uint8), overwrite=False)
    assert np.asarray(Image.open(target)).max() == 0
    with pytest.raises(UserError, match="extension"):
        save_image(tmp_path / "x.notanimage", np.zeros((2, 2, 3), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]


def test_save_jpeg_composites_alpha_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black → white
    save_image(tmp_path / "w.jpg", rgba)
    assert np.asarray(Image.open(tmp_path / "w.jpg")).min() >= 250


def test_image_grid_places_tiles_row_major():
    images = torch.stack([torch.full((3, 4, 5), i * 30 / 255) for i in range(7)])
    sheet = image_grid(images, cols=4)
    assert sheet.shape == (8, 20, 3) and sheet.dtype == np.uint8
    for i in range(7):
        row, col = divmod(i, 4)
        tile = sheet[row * 4 : (row + 1) * 4, col * 5 : (col + 1) * 5]
        assert (tile == i * 30).all()
    assert (sheet[4:, 15:] == 255).all()  # the empty eighth cell is white
