"""The paper's last clean-up of trained Gaussians: removing visible white floaters (MicroDreamer §V; the
reference's ``gs_postprocess.filter_out``, spec §6.6).

On a white background a white Gaussian costs nothing in any novel view's colour loss, so large white
blobs survive training around the object; their colours drift above 1 where the clamped render no
longer pulls them back. The filter looks at the object from six cameras in turn (radius 2, fovy 49°,
512², (elevation, azimuth) = (0, 0), (0, 180), (0, 90), (20, 180), (20, 90), (0, −90)). For each, the
*candidates* are the remaining Gaussians with some scale above 0.01 and a colour above 1 in every
channel; the view's alpha is rendered with and without all candidates, and a candidate is removed when
taking the candidates away lowers the alpha by more than 0.1 at the pixel its centre projects to (it
stands where the candidates make something visible, not hidden behind the object's surface). Centres
outside the image count at the nearest border pixel, as in the reference; centres behind a camera are
left to the other cameras. An object that is really white keeps its Gaussians as long as its renders
are shaded below the background's white (the reference teacher's ``lit`` mode is): their colours then
stay at or below 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..render.gaussians import rasterize_gaussians
from ..sir.cameras import Cameras

#: (elevation, azimuth) of the six filter cameras, in the reference's order
CAMERAS = ((0.0, 0.0), (0.0, 180.0), (0.0, 90.0), (20.0, 180.0), (20.0, 90.0), (0.0, -90.0))
RADIUS = 2.0
FOVY = 49.0
RESOLUTION = 512
MIN_SCALE = 0.01  # a candidate has some scale above this
MIN_COLOUR = 1.0  # ... and a colour above this in every channel
ALPHA_DROP = 0.1  # removed when the candidates' removal lowers the alpha at its centre by more


@torch.no_grad()
def white_floaters(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colours: Tensor,
    backend: str = "auto", resolution: int = RESOLUTION,
) -> Tensor:
    """Which of N Gaussians (activated parameters, ``colours`` not clamped to 1) the filter removes: ``[N]``
    bool. The cameras are visited in turn, each seeing what the earlier ones left."""
    removed = torch.zeros(means.shape[0], dtype=torch.bool, device=means.device)
    bright = (scales.amax(-1) > MIN_SCALE) & (colours > MIN_COLOUR).all(-1)
    background = torch.zeros(3, device=means.device)
    for elevation, azimuth in CAMERAS:
        candidates = bright & ~removed
        if not candidates.any():
            break
        camera = Cameras.orbit([elevation], [azimuth], RADIUS, resolution, FOVY).to(means.device)

        def alpha(keep: Tensor) -> Tensor:
            return rasterize_gaussians(means[keep], quats[keep], scales[keep], opacities[keep],
                                       colours[keep].clamp(0, 1), camera, background, backend).alpha[0, 0]

        drop = alpha(~removed) - alpha(~removed & ~candidates) > ALPHA_DROP
        index = candidates.nonzero()[:, 0]
        row, col, in_front = _pixels(means[index], camera)
        hit = in_front & drop[row, col]
        removed[index[hit]] = True
    return removed


def _pixels(points: Tensor, camera: Cameras) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel (row, column) of each point's projection, clamped into the image, and whether it lies in
    front of the camera."""
    view = camera.viewmats()[0].to(points)
    p = points @ view[:3, :3].T + view[:3, 3]
    in_front = p[:, 2] > camera.near
    z = torch.where(in_front, p[:, 2], 1.0)
    fx, fy = camera.focal
    col = (fx * p[:, 0] / z + camera.width / 2).floor().clamp(0, camera.width - 1).long()
    row = (fy * p[:, 1] / z + camera.height / 2).floor().clamp(0, camera.height - 1).long()
    return row, col, in_front
