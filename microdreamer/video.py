"""360° turntable previews: orbit cameras → rendered frames → an mp4 (imageio-ffmpeg) or a gif (Pillow).

The turntable starts at the reference view (the input image's azimuth) and turns once around the
object at one elevation. ``.mp4`` needs the ffmpeg binary that the ``imageio-ffmpeg`` wheel ships;
``.gif`` needs only Pillow. Files appear atomically.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .config import TURNTABLE_FPS as FPS
from .config import TURNTABLE_FRAMES as FRAMES
from .config import TURNTABLE_RESOLUTION as RESOLUTION
from .errors import UserError
from .io.atomic import atomic_path
from .io.images import to_uint8
from .sir.cameras import Cameras, turntable

VIDEO_FORMATS = ("mp4", "gif")
#: MP4 quality on imageio-ffmpeg's 0–10 scale (libx264)
MP4_QUALITY = 8

RenderFn = Callable[[Cameras], Tensor]  # cameras → rgb [B,3,H,W] in [0, 1]


@dataclass(frozen=True)
class VideoOptions:
    """A turntable: ``frames`` views over 360° played at ``fps``; ``resolution`` None = the run's."""

    format: str = "mp4"
    frames: int = 90
    fps: int = 30
    resolution: int | None = None

    def __post_init__(self) -> None:
        if self.format not in VIDEO_FORMATS:
            raise UserError(f"unknown video format '{self.format}' (use {' or '.join(VIDEO_FORMATS)})")
        if not FRAMES[0] <= self.frames <= FRAMES[1] or not FPS[0] <= self.fps <= FPS[1]:
            raise UserError(f"a turntable needs {FRAMES[0]}..{FRAMES[1]} frames at {FPS[0]}..{FPS[1]} fps")
        if self.resolution is not None and not RESOLUTION[0] <= self.resolution <= RESOLUTION[1]:
            raise UserError(f"a turntable's frame side must lie in {RESOLUTION[0]}..{RESOLUTION[1]} pixels")


def ffmpeg_exe() -> str | None:
    """The ffmpeg binary imageio-ffmpeg provides, or None when it is not installed or not usable."""
    try:
        return importlib.import_module("imageio_ffmpeg").get_ffmpeg_exe()
    except Exception:  # not installed, or no binary for this platform
        return None


def default_format() -> str:
    """``mp4`` when ffmpeg is available, else ``gif``."""
    return "mp4" if ffmpeg_exe() is not None else "gif"


def format_of(path: Path) -> str:
    """The video format a file name asks for (``.mp4`` or ``.gif``)."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in VIDEO_FORMATS:
        raise UserError(f"cannot write a video to {path}: use a .mp4 or .gif name")
    return fmt


def turntable_cameras(
    frames: int, elevation: float, radius: float, resolution: int, fovy: float = 49.1, start_azimuth: float = 0.0
) -> Cameras:
    """``frames`` orbit cameras, evenly over 360° starting at ``start_azimuth`` (no repeated end frame)."""
    return turntable(frames, elevation, radius, resolution, fovy, offset=start_azimuth)


@torch.no_grad()
def render_frames(render: RenderFn, cameras: Cameras, chunk: int = 8) -> np.ndarray:
    """Render ``cameras`` in chunks of ``chunk`` views; returns ``uint8 [N, H, W, 3]``."""
    frames = []
    for start in range(0, len(cameras), chunk):
        rgb = render(cameras[start : start + chunk]).detach().to("cpu", torch.float32).clamp(0, 1)
        frames.append(to_uint8(rgb.permute(0, 2, 3, 1).numpy() * 255.0))
    return np.concatenate(frames, axis=0)


def encode_video(path: Path, frames: np.ndarray, fps: int, fmt: str | None = None) -> Path:
    """Encode ``uint8 [N, H, W, 3]`` frames to ``path`` (not atomic; see :func:`write_video`).

    MP4 is H.264 in yuv420p (odd sizes are padded by one replicated row/column, as the format needs even
    sizes); GIF loops forever with one adaptive palette per frame.
    """
    fmt = fmt or format_of(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 [N, H, W, 3] frames, got {frames.dtype} {frames.shape}")
    if fmt == "gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(
            path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
        )
        return path
    if ffmpeg_exe() is None:
        raise UserError('writing mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg); or ask for a .gif')
    imageio_ffmpeg = importlib.import_module("imageio_ffmpeg")
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(
        str(path), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264", quality=MP4_QUALITY,
        macro_block_size=1, ffmpeg_log_level="error", output_params=["-movflags", "+faststart"],
    )
    writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()
    return path


def write_video(path: Path, frames: np.ndarray, fps: int) -> Path:
    """Encode to ``path`` (format from its suffix); the file appears only once complete."""
    fmt = format_of(path)
    with atomic_path(Path(path)) as tmp:
        encode_video(tmp, frames, fps, fmt)
    return Path(path)


def result_renderer(path: Path, device: torch.device, normalize: bool = True, run_frame: bool = False) -> RenderFn:
    """A render function for a saved result: a 3DGS ``.ply``, a NeRF's ``.safetensors`` or a mesh (``.obj``,
    ``.glb``, ``.gltf``, …).

    A mesh is rendered unlit (its albedo) with 2×2 supersampling; ``normalize`` fits it into the unit box
    first, unless ``run_frame`` puts it back into its run's frame by its export report
    (:func:`~microdreamer.evaluate.load_result_mesh`). The background is white.
    """
    from .representations.registry import load_saved, saved_representation

    path = Path(path)
    if not path.is_file():
        raise UserError(f"result not found: {path}")
    background = torch.ones(3, device=device)
    if saved_representation(path) is not None:
        model = load_saved(path, device)
        return lambda cameras: model.render(cameras.to(device), background).rgb
    from .evaluate import load_result_mesh
    from .io.mesh import load_mesh
    from .render.mesh import rasterize_mesh

    mesh = (load_result_mesh(path)[0] if run_frame else load_mesh(path, normalize=normalize)).to(device)
    return lambda cameras: rasterize_mesh(mesh, cameras.to(device), background, supersample=2).rgb
