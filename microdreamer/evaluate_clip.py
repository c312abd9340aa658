"""MicroDreamer's CLIP-similarity protocol (Table III, Fig. 7): how alike a result's renders are to what it was made
from, with a CLIP model the user points to (:mod:`microdreamer.metrics_clip`).

Eight views at elevation 0 and azimuths 0°, 45°, …, 315° (the paper's: evenly spaced from 0; the set holds the
front view of every teacher, 0° for Zero123 and 90° for the multi-view teachers), rendered at 512² over white as
the result's albedo: the colours the representation learnt, a mesh's texture unlit. Each render, as 8-bit RGB, is
compared with the input image composited over white (image-to-3D) or with the prompt (text-to-3D); the score is
the mean of the eight cosine similarities.

What a result is compared with: ``image`` or ``prompt`` when given; else the run's report beside it
(``<stem>.json``) says: its preprocessed input ``<stem>_rgba.png`` (what the run reconstructed; the paper's test
images are such RGBA cut-outs), else its input image, else its prompt.

Framing differs from the paper's, which fits every mesh into [−0.9, 0.9]³ and renders from distance 3 at 49°: a
result is rendered in its run's frame (a mesh put back by its export report, else fitted into the unit box, as
``eval`` places it) from the run's reference-view distance and field of view (its report's ``cameras``), so the
object fills the renders as it filled the input view. Without a report: distance 2, fovy 49.1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import video
from .errors import UserError
from .io.images import as_rgba, load_image, to_uint8
from .metrics_clip import ClipSimilarity, cosine, find_clip
from .sir.cameras import Cameras, turntable

CLIP_VIEWS = 8
CLIP_RESOLUTION = 512
#: the framing of a result without a run report (the held-out views' distance, the runs' default fovy)
DEFAULT_RADIUS, DEFAULT_FOVY = 2.0, 49.1


def clip_cameras(radius: float, fovy: float, resolution: int = CLIP_RESOLUTION) -> Cameras:
    """The 8 views: elevation 0, azimuths 45°·i."""
    return turntable(CLIP_VIEWS, 0.0, radius, resolution, fovy)


@dataclass(frozen=True)
class ClipTarget:
    """What the renders are compared with: an RGB image (``uint8 [H,W,3]``, over white) or a prompt."""

    image: np.ndarray | None = None
    prompt: str | None = None
    source: str = ""  # where the image came from

    @classmethod
    def from_image(cls, image: str | Path | np.ndarray, source: str | None = None) -> "ClipTarget":
        """An image file or an RGBA/RGB ``uint8`` array, composited over white."""
        if not isinstance(image, np.ndarray):
            source, image = source or str(image), load_image(image)
        rgba = as_rgba(image).astype(np.float64)
        alpha = rgba[..., 3:] / 255.0
        return cls(image=to_uint8(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), source=source or "array")

    @classmethod
    def from_prompt(cls, prompt: str) -> "ClipTarget":
        if not prompt.strip():
            raise UserError("empty prompt: give the text the result was made from")
        return cls(prompt=prompt.strip())

    @property
    def text(self) -> bool:
        return self.prompt is not None


def run_target(result: Path, image: str | Path | None = None, prompt: str | None = None) -> ClipTarget:
    """What a saved ``result`` is compared with (see the module docstring)."""
    from .pipeline import SavedRun

    if image is not None and prompt is not None:
        raise UserError("compare with an image or a prompt, not both: pass --image or --prompt")
    if image is not None:
        return ClipTarget.from_image(image)
    if prompt is not None:
        return ClipTarget.from_prompt(prompt)
    run = SavedRun.beside(result)
    if run is not None:
        rgba = run.path.with_name(f"{run.path.stem}_rgba.png")
        if rgba.is_file():
            return ClipTarget.from_image(rgba)
        fix = f"pass the image: --image IMAGE (the run report is {run.path})"
        source = run.input_image(fix)
        if source is not None:
            return ClipTarget.from_image(source)
        if run.prompt is not None:
            return ClipTarget.from_prompt(run.prompt)
    where = f"its report {run.path.name} names neither" if run is not None else f"no run report beside {result.name}"
    raise UserError(f"nothing to compare {result.name} with ({where}): pass --image IMAGE or --prompt TEXT")


def run_framing(result: Path, radius: float | None = None) -> tuple[float, float]:
    """The distance (``radius`` when given) and fovy of the reference view of the run that wrote ``result``."""
    from .pipeline import SavedRun

    run = SavedRun.beside(result)
    cameras = run.data["config"].get("cameras") if run is not None else None
    cameras = cameras if isinstance(cameras, dict) else {}
    radius = float(cameras.get("radius", DEFAULT_RADIUS)) if radius is None else float(radius)
    return radius, float(cameras.get("fovy", DEFAULT_FOVY))


@dataclass
class ClipViewScore:
    view: int
    elevation: float
    azimuth: float
    similarity: float


@dataclass
class ClipEvalReport:
    result: str
    model: str  # the CLIP checkpoint, as given (a folder or a Hugging Face id)
    target: ClipTarget
    radius: float
    fovy: float
    resolution: int
    views: list[ClipViewScore]

    @property
    def similarity(self) -> float:
        """The protocol's score: the mean over the views."""
        return sum(v.similarity for v in self.views) / len(self.views)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": "clip",
            "result": self.result,
            "model": self.model,
            "compared_with": "prompt" if self.target.text else "image",
            "image": None if self.target.text else self.target.source,
            "prompt": self.target.prompt,
            "similarity": self.similarity,
            "radius": self.radius,
            "fovy": self.fovy,
            "resolution": self.resolution,
            "views": [asdict(v) for v in self.views],
        }


def clip_scores(
    render: video.RenderFn, clip: ClipSimilarity, target: ClipTarget, cameras: Cameras
) -> list[ClipViewScore]:
    """The similarity to ``target`` of each view ``render`` draws (cameras → rgb ``[B,3,H,W]`` in [0, 1], over
    white)."""
    views = video.render_frames(render, cameras)  # 8-bit, as the paper's saved PNGs
    wanted = clip.text_embedding(target.prompt) if target.text else clip.image_embeddings(target.image[None])
    similarity = cosine(clip.image_embeddings(views), wanted).tolist()
    return [ClipViewScore(i, float(cameras.elevation[i]), float(cameras.azimuth[i]), similarity[i])
            for i in range(len(cameras))]


def score_result(
    result: Path,
    model: str | Path,
    device: torch.device,
    *,
    image: str | Path | None = None,
    prompt: str | None = None,
    radius: float | None = None,
    resolution: int = CLIP_RESOLUTION,
    allow_download: bool = True,
) -> ClipEvalReport:
    """The protocol on a saved result (Gaussians ``.ply``, mesh, or any result :func:`video.result_renderer`
    draws), compared with ``image``, ``prompt`` or what its run report names; ``radius`` replaces the run's.
    Everything is checked before the CLIP model and the result load."""
    result = Path(result)
    target = run_target(result, image, prompt)
    radius, fovy = run_framing(result, radius)
    folder = find_clip(model, text=target.text, allow_download=allow_download)
    render = video.result_renderer(result, device, run_frame=True)
    clip = ClipSimilarity.load(folder, device, text=target.text)
    views = clip_scores(render, clip, target, clip_cameras(radius, fovy, resolution))
    return ClipEvalReport(str(result), str(model), target, radius, fovy, resolution, views)
