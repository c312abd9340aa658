"""Turn a user's picture into the square, recentred RGBA image the reference view expects.

Steps (after the reference's offline ``process.py``, spec §1.8): find the object's mask, then crop its
bounding box and scale it so the longer side is ``size·(1 − border_ratio)``, centred on a transparent
``size``² canvas.

Where the mask comes from (``remove_background``):

- ``"auto"``: the image's own alpha when it is meaningful (some pixel not fully opaque); otherwise rembg
  when it is installed; otherwise the uniform-background estimate.
- ``"rembg"``: always rembg (on the image composited on white); missing rembg is an error.
- ``"uniform"``: never rembg: a meaningful alpha is kept, otherwise the uniform-background estimate.
  This is what ``--no-rembg`` means.
- ``"none"``: no removal: the image as given, its alpha if it has one, else fully opaque (the whole
  picture is the object).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from .errors import UserError, about_input
from .io.images import ImageLike, as_rgba, to_uint8, area_resize, load_image, save_image

RemoveBackground = Literal["auto", "rembg", "uniform", "none"]
MODES: tuple[str, ...] = ("auto", "rembg", "uniform", "none")
OUTPUT_SUFFIX = "_rgba.png"
#: Inputs are decoded with their longer side at most this (or 8× the output size, when larger) before
#: masking: 8× the default 256 px output, so an object filling a tenth of the frame keeps full detail.
DECODE_SIDE = 2048
_REMBG_HINT = 'install it with pip install "microdreamer[rembg]", or pass --no-rembg'


def has_alpha(rgba: np.ndarray) -> bool:
    """Whether an RGBA array carries a meaningful alpha (some pixel not fully opaque)."""
    return bool(rgba.shape[2] == 4 and rgba[:, :, 3].min() < 255)


def new_rembg_session(model: str = "u2net") -> Any:
    """A rembg session (loads, and on first use downloads, its model); :class:`UserError` when impossible.

    Create one and pass it to :func:`preprocess` to avoid reloading the model for every image of a folder.
    """
    try:
        rembg = importlib.import_module("rembg")
    except (Exception, SystemExit):  # rembg exits the interpreter when onnxruntime is missing
        raise UserError(f"background removal needs rembg; {_REMBG_HINT}") from None
    try:
        return rembg.new_session(model)
    except Exception as error:  # network, cache or onnxruntime failures all mean the same to the user
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"rembg could not load its {model} model ({reason}); {_REMBG_HINT}") from None


def _rembg_installed() -> bool:
    return importlib.util.find_spec("rembg") is not None


def _rembg_alpha(rgb: np.ndarray, session: Any) -> np.ndarray:
    rembg = importlib.import_module("rembg")
    try:
        cut = rembg.remove(Image.fromarray(rgb), session=session)
    except Exception as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"rembg failed on this image ({reason}); pass --no-rembg") from None
    return np.asarray(cut.convert("RGBA"))[:, :, 3]


def _over_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[:, :, 3:].astype(np.float64) / 255.0
    return to_uint8(rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha))


def uniform_background_alpha(
    rgb: np.ndarray,
    *,
    threshold: float = 0.1,
    border: int | None = None,
    window: int = 7,
    shadow_floor: float = 0.5,
) -> np.ndarray:
    """Alpha ``uint8 [H, W]`` for an object on a plain, uniformly coloured background.

    The background colour B is the median of the outer ``border`` pixels (default 2 % of the shorter side,
    at least 1); d is each pixel's Euclidean RGB distance to B (colours in [0, 1]) and c the largest d
    within a ``window``² neighbourhood, the local object contrast. A pixel a·F + (1 − a)·B has d = a·c, so
    pixels with d > max(threshold, c/2) (at least half covered, above the noise floor) stand out.

    Shadows: a pixel P that is only B dimmed (s = P·B / B·B between ``shadow_floor`` and 1, chroma residual
    |P − s·B| at most ``threshold``) is the backdrop in a soft shadow, unless it lies inside a closed outline
    (an object of the backdrop's hue, grey on white). The outline is where d changes sharply: its range
    over a (2r+1)² neighbourhood exceeds ``threshold`` and 0.7 of its range over (4r+1)², with r = 0.25 % of
    the shorter side; an object's edge is about r pixels wide, a soft shadow's ramp many times that. Gaps
    in the outline up to 10 % of the shorter side are bridged (a shadow as dark as the object hides part of
    its edge). Shadows darker than ``shadow_floor``·B or with hard edges stay with the object; when only
    shadow-like pixels stand out and no outline closes, they are all kept, as nothing tells object from
    shadow then.

    Of what stands out, the largest connected component is kept together with any at least a tenth its
    size, holes are filled, and on the one-pixel band around the edge alpha is d/c (1 inside, 0 outside).
    Raises :class:`UserError` when the border is not uniform or nothing stands out from it.
    """
    height, width, _ = rgb.shape
    if border is None:
        border = max(1, round(0.02 * min(height, width)))
    colours = rgb.astype(np.float32) / 255.0
    ring = np.ones((height, width), bool)
    ring[border : height - border, border : width - border] = False
    background = np.median(colours[ring], axis=0)
    distance = _norm(colours - background)
    if np.mean(distance[ring] <= threshold) < 0.5:
        raise UserError(
            "the background is not a plain colour, so it cannot be removed without rembg; "
            "install rembg or supply an RGBA image with transparency"
        )
    contrast = ndimage.maximum_filter(distance, size=window)
    visible = distance > np.maximum(threshold, 0.5 * contrast)
    dimming = colours @ background / max(float(background @ background), 1e-12)
    residual = _norm(colours - dimming[:, :, None] * background)
    shadow_like = (residual <= threshold) & (dimming >= shadow_floor) & (dimming <= 1.0)
    reach = max(1, round(0.0025 * min(height, width)))  # an object edge's width at this resolution
    step = _spread(distance, 2 * reach + 1)
    sharp = (step > np.maximum(threshold, 0.7 * _spread(distance, 4 * reach + 1))) & (distance > threshold)
    outlined = _enclosed(sharp, 0.05 * min(height, width))
    separated = visible & (~shadow_like | outlined)
    # with nothing of another hue and no closed outline there is nothing to tell the object from shadows by
    foreground = separated if separated.any() else visible
    labels, count = ndimage.label(foreground)
    if count == 0:
        raise UserError("no object stands out from the background; supply an RGBA image with transparency")
    sizes = ndimage.sum_labels(foreground, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
    mask = ndimage.binary_fill_holes(np.isin(labels, keep))
    core = ndimage.binary_erosion(mask)
    band = ndimage.binary_dilation(mask) & ~core
    ramp = np.clip(distance / np.maximum(contrast, 1e-6), 0.0, 1.0)
    alpha = np.where(core, 1.0, np.where(band, ramp, 0.0))
    return to_uint8(alpha * 255.0)


def _enclosed(outline: np.ndarray, gap: float) -> np.ndarray:
    """The regions an outline encloses, itself included, bridging gaps in it up to ``2·gap`` pixels wide
    (the outline thickened by ``gap``, chessboard distance, is filled, then thinned by as much). Pieces of
    outline with fewer than ``gap`` pixels (noise) are left out; an empty mask when nothing is enclosed."""
    labels, count = ndimage.label(outline, structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(outline, labels, index=np.arange(1, count + 1))
    outline = np.isin(labels, np.flatnonzero(sizes >= gap) + 1)
    thick = ndimage.distance_transform_cdt(~outline) <= gap
    filled = ndimage.binary_fill_holes(thick)
    labels, _ = ndimage.label(filled)
    closed = np.isin(labels, np.unique(labels[filled & ~thick]))  # the pieces that enclose something
    return ndimage.distance_transform_cdt(closed) > gap


def _spread(values: np.ndarray, size: int) -> np.ndarray:
    """The range (largest minus smallest value) within each ``size``² neighbourhood."""
    return ndimage.maximum_filter(values, size=size) - ndimage.minimum_filter(values, size=size)


def _norm(vectors: np.ndarray) -> np.ndarray:
    """Euclidean norm over the last axis."""
    return np.sqrt(np.einsum("...i,...i->...", vectors, vectors))


def _resize_rgba(rgba: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize straight RGBA through premultiplied alpha: area when shrinking, bilinear when enlarging."""
    alpha = rgba[:, :, 3:].astype(np.float64) / 255.0
    premultiplied = np.concatenate([rgba[:, :, :3] * alpha, alpha * 255.0], axis=2)
    if height <= rgba.shape[0] and width <= rgba.shape[1]:
        resized = area_resize(premultiplied, height, width)
    else:
        tensor = torch.from_numpy(premultiplied).permute(2, 0, 1).unsqueeze(0)
        tensor = F.interpolate(tensor, (height, width), mode="bilinear", align_corners=False, antialias=True)
        resized = tensor[0].permute(1, 2, 0).numpy()
    resized = np.clip(resized, 0.0, 255.0)
    new_alpha = resized[:, :, 3:] / 255.0
    rgb = np.where(new_alpha > 0, resized[:, :, :3] / np.maximum(new_alpha, 1e-12), 0.0)
    return to_uint8(np.concatenate([rgb, resized[:, :, 3:]], axis=2))


def _bleed_colours(rgba: np.ndarray) -> np.ndarray:
    """Give fully transparent pixels the colour of the nearest visible one (no dark fringes on resizing)."""
    hidden = rgba[:, :, 3] == 0
    if not hidden.any() or hidden.all():
        return rgba
    _, (rows, cols) = ndimage.distance_transform_edt(hidden, return_indices=True)
    result = rgba.copy()
    result[:, :, :3] = rgba[rows, cols, :3]
    result[:, :, 3] = rgba[:, :, 3]
    return result


def recentre(rgba: np.ndarray, *, size: int = 256, border_ratio: float = 0.2) -> np.ndarray:
    """Crop the bounding box of ``alpha > 0``, scale its longer side to ``size·(1 − border_ratio)``, centre it.

    Returns a transparent ``size``² canvas (the bounding box is inclusive, unlike the reference's off-by-one).
    """
    if not 0.0 <= border_ratio < 1.0:
        raise ValueError(f"border_ratio must be in [0, 1), got {border_ratio}")
    rows = np.flatnonzero(rgba[:, :, 3].any(axis=1))
    cols = np.flatnonzero(rgba[:, :, 3].any(axis=0))
    if rows.size == 0:
        raise UserError("no object found: the mask is empty; supply an RGBA image with the object visible")
    crop = rgba[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    target = size * (1.0 - border_ratio)
    scale = target / max(crop.shape[:2])
    height = max(1, min(size, round(crop.shape[0] * scale)))
    width = max(1, min(size, round(crop.shape[1] * scale)))
    canvas = np.zeros((size, size, 4), np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top : top + height, left : left + width] = _resize_rgba(crop, height, width)
    return _bleed_colours(canvas)


def preprocess(
    rgba_image: ImageLike,
    *,
    border_ratio: float = 0.2,
    size: int = 256,
    remove_background: RemoveBackground = "auto",
    rembg_session: Any = None,
    threshold: float = 0.1,
) -> np.ndarray:
    """Mask, recentre and rescale an image; returns ``uint8 [size, size, 4]`` straight RGBA.

    ``remove_background`` picks the mask (module docstring); ``rembg_session`` reuses a session from
    :func:`new_rembg_session`; ``threshold`` is the colour distance of the uniform-background estimate.
    """
    if remove_background not in MODES:
        raise UserError(f"unknown background removal {remove_background!r}; choose one of {', '.join(MODES)}")
    rgba = as_rgba(rgba_image).copy()
    if not rgba[:, :, 3].any():
        raise UserError("the image is fully transparent: there is no object to reconstruct")
    use_alpha = has_alpha(rgba) and remove_background != "rembg"
    if remove_background == "none" or use_alpha:
        alpha = rgba[:, :, 3]
    elif remove_background == "rembg" or (remove_background == "auto" and _rembg_installed()):
        session = rembg_session if rembg_session is not None else new_rembg_session()
        rgba[:, :, :3] = _over_white(rgba)
        alpha = _rembg_alpha(rgba[:, :, :3], session)
    else:
        alpha = uniform_background_alpha(rgba[:, :, :3], threshold=threshold)
    rgba[:, :, 3] = alpha
    return recentre(rgba, size=size, border_ratio=border_ratio)


def load_input(path: str | os.PathLike[str], size: int = 256) -> np.ndarray:
    """An input image for :func:`preprocess` to ``size`` px, decoded reduced (see :data:`DECODE_SIDE`)."""
    return load_image(path, max_side=max(DECODE_SIDE, 8 * size))


def preprocessed_path(in_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Where :func:`preprocess_file` writes: ``out_dir/<stem>_rgba.png`` ("my.cat.v2.png" → "my.cat.v2_rgba.png")."""
    return Path(out_dir) / f"{Path(in_path).stem}{OUTPUT_SUFFIX}"


def is_preprocessed_output(path: str | os.PathLike[str]) -> bool:
    """Whether a file name is one :func:`preprocess_file` produces, so folder mode can skip it."""
    return Path(path).name.endswith(OUTPUT_SUFFIX)


def preprocess_file(
    in_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Load ``in_path``, :func:`preprocess` it with ``options``, write ``<stem>_rgba.png`` atomically.

    An existing output raises :class:`UserError` unless ``overwrite`` is true.
    """
    out_path = preprocessed_path(in_path, out_dir)
    if not overwrite and out_path.exists():
        raise UserError(f"{out_path} already exists; delete it or pass --overwrite")
    with about_input(in_path):
        result = preprocess(load_input(in_path, options.get("size", 256)), **options)
    return save_image(out_path, result, overwrite=overwrite)
