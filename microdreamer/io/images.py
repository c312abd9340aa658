"""Input images: loading, the reference-view tensors, atomic saving and contact sheets.

Images travel as ``uint8`` numpy arrays ``[H, W, 4]`` (straight, non-premultiplied RGBA) between loading,
preprocessing and saving; the model side gets float tensors from :func:`to_reference`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError, UserError
from .atomic import atomic_path

ImageLike = np.ndarray | torch.Tensor | Image.Image

# Raster formats accepted as input (Pillow's JPEG opener also yields MPO for multi-picture camera JPEGs).
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
_WHAT_TO_DO = "supply a PNG, JPG or WebP image"
#: Largest input image, in pixels (width × height): every phone photo up to 108 MP fits. Larger files are
#: refused before they are decoded (Pillow itself refuses beyond 179 MP, its decompression-bomb limit).
MAX_PIXELS = 150_000_000


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_image(path: str | os.PathLike[str], *, max_side: int | None = None) -> np.ndarray:
    """Read an image file as RGBA ``uint8 [H, W, 4]`` with its EXIF orientation applied.

    Images without transparency get alpha 255. Grey, palette and 16-bit inputs are converted to 8-bit RGBA;
    of an animated file only the first frame is used. With ``max_side`` the image is decoded reduced by a
    power of two, its longer side at most ``max_side`` (and more than half of it): a JPEG at 1/2, 1/4 or
    1/8 scale by libjpeg itself (Pillow's draft mode), other formats by averaging pixel blocks right after
    decoding; a 64-megapixel JPEG is thus never held at full size. Every way the file can fail to be a
    readable image (missing, a folder, empty, not an image, truncated, corrupt, above :data:`MAX_PIXELS`)
    raises :class:`InputError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file; check the path")
    if path.is_dir():
        raise InputError(path, f"a folder, not an image file; {_WHAT_TO_DO}")
    if path.stat().st_size == 0:
        raise InputError(path, f"the file is empty (0 bytes), not an image; {_WHAT_TO_DO}")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit (89.5 MP); MAX_PIXELS, below its error limit, is checked here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=INPUT_FORMATS) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise InputError(path, _too_large(f"{width}x{height} pixels ({width * height / 1e6:.0f} MP)"))
                image = _decode(image, max_side)
                image = ImageOps.exif_transpose(image)
                return _to_rgba_array(image)
    except UnidentifiedImageError:
        raise InputError(path, f"not an image Pillow can read; {_WHAT_TO_DO}") from None
    except Image.DecompressionBombError:  # refused by Pillow while opening, beyond twice its 89.5 MP
        raise InputError(path, _too_large("the image")) from None
    except PermissionError:
        raise InputError(path, "cannot be read (permission denied); check the file's permissions") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(
            path, f"truncated or corrupt ({_one_line(error)}); re-export it as PNG, JPG or WebP"
        ) from None


def _too_large(what: str) -> str:
    return (f"{what} is above the {MAX_PIXELS // 1_000_000}-megapixel input limit; "
            "downscale it (4096 px on the longer side is plenty)")


def _decode(image: Image.Image, max_side: int | None) -> Image.Image:
    """Decode an opened image, shrunk by the smallest power of two that brings its longer side to at most
    ``max_side`` (so to more than half of it): JPEG by libjpeg's DCT scaling while decoding (1/2, 1/4,
    1/8), the rest of the factor and other formats by block averaging (Pillow's ``reduce``)."""
    width, height = image.size
    factor = 1
    while max_side is not None and max(width, height) > factor * max_side:
        factor *= 2
    if factor == 1:
        image.load()
        return image
    image.draft(image.mode, (-(-width // factor), -(-height // factor)))  # a no-op but for JPEG
    factor //= round(width / image.size[0])  # what the JPEG decoder did not already do
    if image.mode.startswith("I;16"):  # Pillow cannot reduce these; 32-bit integers it can
        image = image.convert("I")
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"):
        image = image.convert("RGBA")
    return image.reduce(factor) if factor > 1 else image


def _to_rgba_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        grey = np.asarray(image, dtype=np.float64)
        scale = 257.0 if grey.max(initial=0) > 255 else 1.0  # 16-bit grey → 8-bit
        grey = np.clip(np.floor(grey / scale + 0.5), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    return np.array(image.convert("RGBA"), dtype=np.uint8)


def as_rgba(image: ImageLike) -> np.ndarray:
    """RGBA ``uint8 [H, W, 4]`` from a PIL image or an ``[H, W, 3|4]`` uint8 array (missing alpha → opaque)."""
    if isinstance(image, Image.Image):
        return _to_rgba_array(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected a uint8 [H, W, 3|4] array, got {array.dtype} {array.shape}")
    if array.shape[2] == 3:
        array = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return array


def _area_weights(size_in: int, size_out: int) -> scipy.sparse.csr_matrix:
    """Sparse ``[size_out, size_in]`` matrix: the fraction of output cell i covered by input cell j.

    Output cell i spans ``[i·s, (i+1)·s)`` in input coordinates with ``s = size_in / size_out``; each row
    sums to 1. This is the pixel-area relation of OpenCV's INTER_AREA, for shrinking and for enlarging.
    """
    scale = size_in / size_out
    rows, cols, vals = [], [], []
    for i in range(size_out):
        start, end = i * scale, (i + 1) * scale
        for j in range(int(np.floor(start)), min(int(np.ceil(end)), size_in)):
            overlap = min(end, j + 1) - max(start, j)
            if overlap > 0:
                rows.append(i)
                cols.append(j)
                vals.append(overlap / scale)
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(size_out, size_in))


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``[H, W, C]`` (any dtype) by exact pixel-area averaging; returns float64 ``[height, width, C]``."""
    h, w, c = image.shape
    data = image.astype(np.float64)
    data = (_area_weights(h, height) @ data.reshape(h, w * c)).reshape(height, w, c)
    data = data.transpose(1, 0, 2).reshape(w, height * c)
    data = (_area_weights(w, width) @ data).reshape(width, height, c)
    return np.ascontiguousarray(data.transpose(1, 0, 2))


def area_resize_tensor(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``[..., H, W]`` tensors by exact pixel-area averaging (as :func:`area_resize`), in their dtype."""
    h, w = images.shape[-2:]
    rows = torch.from_numpy(_area_weights(h, height).toarray()).to(images)
    cols = torch.from_numpy(_area_weights(w, width).toarray()).to(images)
    return rows @ images @ cols.T


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round half up and clip to ``uint8``."""
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)


def to_reference(
    rgba: ImageLike,
    resolution: int = 256,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    working_size: int = 800,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference view as the teacher sees it: ``(rgb [1,3,R,R], mask [1,1,R,R])``, float32 in [0, 1].

    Follows the reference input path (spec §1.8): straight RGBA area-resized to ``working_size``² and
    rounded to 8 bits, rgb composited on ``background`` with the alpha as mask, then both bilinearly resized
    (align_corners=False, no antialiasing) to ``resolution``². The area resize is the exact pixel-area
    relation of OpenCV's INTER_AREA: identical when shrinking, within one 8-bit level when enlarging
    (OpenCV then uses fixed-point weights); a 256² input gives the same tensors as the reference.
    Deviation: a non-square image is first padded to a square with transparent pixels, where the
    reference would squash it.
    """
    array = as_rgba(rgba)
    h, w, _ = array.shape
    if h != w:
        side = max(h, w)
        square = np.zeros((side, side, 4), np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = array
        array = square
    # The nudge makes exact ties (x.5, common for rational scales) round up despite float error.
    resized = to_uint8(area_resize(array, working_size, working_size) + 1e-6).astype(np.float32) / 255.0
    image = torch.from_numpy(resized).permute(2, 0, 1).unsqueeze(0)
    mask = image[:, 3:]
    back = torch.tensor(background, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = image[:, :3] * mask + back * (1.0 - mask)
    size = (resolution, resolution)
    rgb = F.interpolate(rgb, size, mode="bilinear", align_corners=False)
    mask = F.interpolate(mask, size, mode="bilinear", align_corners=False)
    return rgb.contiguous(), mask.contiguous()


def _to_uint8_hwc(image: ImageLike) -> np.ndarray:
    """``uint8 [H, W, C]`` from a PIL image, a uint8/float HWC array, or a float CHW/1CHW tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().to("cpu", torch.float32)
        if tensor.ndim == 4:
            if tensor.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {tensor.shape[0]}")
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ValueError(f"expected a [C, H, W] tensor with C in 1, 3, 4, got {tuple(image.shape)}")
        return to_uint8(tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an [H, W, C] array with C in 1, 3, 4, got {array.shape}")
    if array.dtype == np.uint8:
        return array
    return to_uint8(np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0)


def save_image(path: str | os.PathLike[str], image: ImageLike, *, overwrite: bool = True) -> Path:
    """Write an image atomically (temporary file in the same folder, then rename); returns the path.

    Accepts a PIL image, an ``[H, W, C]`` uint8 or float array, or a ``[C, H, W]`` / ``[1, C, H, W]``
    float tensor in [0, 1] with C = 1 (grey), 3 (RGB) or 4 (RGBA). The format follows the extension; for
    formats without alpha (JPEG, BMP) RGBA is composited on white. With ``overwrite=False`` an existing
    file is never replaced and :class:`UserError` is raised instead.
    """
    path = Path(path)
    extension = path.suffix.lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None or image_format not in Image.SAVE:
        raise UserError(f"cannot write {path}: unknown image extension {extension!r}; use .png, .jpg or .webp")
    array = _to_uint8_hwc(image)
    if array.shape[2] == 4 and image_format in ("JPEG", "BMP"):
        alpha = array[:, :, 3:].astype(np.float64) / 255.0
        array = to_uint8(array[:, :, :3] * alpha + 255.0 * (1.0 - alpha))
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if not overwrite and path.exists():
        raise UserError(f"{path} already exists; delete it or pass --overwrite")
    with atomic_path(path, overwrite=overwrite) as temporary:
        pil.save(temporary, format=image_format)
    return path


def image_grid(images: torch.Tensor | np.ndarray, cols: int, *, fill: float = 1.0) -> np.ndarray:
    """Tile ``[B, C, H, W]`` floats in [0, 1] row-major into a ``uint8 [rows·H, cols·W, C]`` sheet.

    Cells after the last image are filled with ``fill`` (white by default).
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu", torch.float32).numpy()
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise ValueError(f"expected [B, C, H, W] images, got shape {images.shape}")
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}")
    count, channels, height, width = images.shape
    rows = max(1, -(-count // cols))
    sheet = np.full((rows, cols, channels, height, width), fill, dtype=np.float64)
    sheet.reshape(rows * cols, channels, height, width)[:count] = images
    sheet = sheet.transpose(0, 3, 1, 4, 2).reshape(rows * height, cols * width, channels)
    return to_uint8(np.clip(sheet, 0.0, 1.0) * 255.0)
