"""MVDream / ImageDream camera input: 16 numbers per view (spec §2.7).

A camera-to-world matrix in our world convention (spec §0.4, y up, OpenGL camera) is moved to the
Blender world MVDream was trained in (z up: new row 1 = −old row 2, new row 2 = old row 1), its
translation scaled to unit length, and flattened row-major including the ``[0, 0, 0, 1]`` row.
In our world the MVDream/ImageDream front (input-image) view is azimuth 90 (camera on +x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sir.cameras import Cameras, orbit_camera

#: azimuth (spec §0.4 convention) of the view MVDream/ImageDream treat as the front / input view
FRONT_AZIMUTH = 90.0
#: views denoised together per object (both models were trained on 4 views)
VIEWS_PER_OBJECT = 4

# y-up (OpenGL world) → z-up (Blender world), applied on the left of camera-to-world matrices
_TO_BLENDER = torch.tensor(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def to_blender(c2w: Tensor) -> Tensor:
    """Camera-to-world ``[B,4,4]`` in our y-up world → the same cameras in MVDream's z-up world."""
    return _TO_BLENDER.to(c2w) @ c2w


def mvdream_camera(cameras: Cameras) -> Tensor:
    """The ``[B,16]`` camera input for rendered views at any radius (translation normalised to unit length)."""
    pose = to_blender(cameras.c2w).clone()
    t = pose[:, :3, 3]
    pose[:, :3, 3] = t / (t.norm(dim=-1, keepdim=True) + 1e-8)
    return pose.reshape(len(cameras), 16)


def get_camera(
    num_frames: int,
    elevation: float = 15.0,
    azimuth_start: float = 0.0,
    azimuth_span: float = 360.0,
    extra_view: bool = False,
) -> Tensor:
    """MVDream's own view set: ``num_frames`` unit-radius views, azimuth_start + i·span/F, ``[F(+1),16]``.

    Here ``elevation`` is in MVDream's sign (positive = camera above), the opposite of spec §0.4.
    ``extra_view`` appends ImageDream's all-zero camera for the reference frame.
    """
    azimuth = azimuth_start + torch.arange(num_frames, dtype=torch.float64) * (azimuth_span / num_frames)
    c2w = orbit_camera(torch.full_like(azimuth, -elevation), azimuth, torch.ones_like(azimuth))
    cams = to_blender(c2w).reshape(num_frames, 16)
    if extra_view:
        cams = torch.cat([cams, cams.new_zeros(1, 16)])
    return cams


def with_reference_frame(camera: Tensor, views: int) -> Tensor:
    """``[N·views,16]`` → ``[N·(views+1),16]``: ImageDream's zero camera appended after each object's views."""
    grouped = camera.reshape(-1, views, camera.shape[-1])
    zero = grouped.new_zeros(grouped.shape[0], 1, grouped.shape[-1])
    return torch.cat([grouped, zero], dim=1).reshape(-1, camera.shape[-1])
