"""GECO's reconstructor: the generator's six Zero123++ views → LGM → Gaussians, and cameras to render them.

GECO feeds the one-step generator's views to LGM but does not say how six views at Zero123++'s poses meet a
network trained on four at elevation 0 (spec geco.md §2.6). Our reading, each part a Stage II setting
recorded in the run (:class:`~microdreamer.distill.runs.ReconstructorSpec`):

- **views**: a subset of the six, in the generator's order (default 0, 1, 3, 4: azimuths 30, 90, 210, 270
  from the condition, 30° above and 20° below by turns, the four ``image2gs --method lgm`` takes from
  Zero123++). All six (0..5) is option (a) of the spec: the network's attention then spans six views, which
  the published weights never saw and Stage II fine-tunes.
- **cameras**: each view gets the Plücker rays of its true camera (:func:`~microdreamer.generators.zero123plus.
  zero123plus_cameras` with field of view ``fovy``) in LGM's normalised frame: cameras at LGM's distance
  (1.5) and the whole rig moved by the one rigid motion that puts the first chosen view at [I | (0, 0, 1.5)],
  as LGM's training normalises its inputs.
- **background**: ``white`` moves Zero123++'s gray background onto LGM's white (:func:`~microdreamer.
  generators.zero123plus.on_white` with the coverage each view's border colour gives, held fixed so that
  gradients pass through the colours); a view whose border is not a plain colour stays on gray and is
  counted. ``gray`` passes the views as generated. Renders use the same background.

Renders are placed in our world's orbit convention around the condition view (azimuth 0, distance 1.5: the
input views' distance) and mapped into LGM's frame by the same motion (:meth:`GECOReconstructor.cameras`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import UserError
from ..generators.zero123plus import GRAY, on_white, view_coverage, zero123plus_cameras
from ..reconstructors.lgm import network_images, plucker_rays
from ..reconstructors.lgm_unet import LGMNetwork
from ..render.gaussians import rasterize_gaussians
from ..representations.similarity import Similarity
from ..sir.cameras import Cameras, orbit_camera
from .runs import ReconstructorSpec


class GECOReconstructor:
    """An LGM network fed the chosen views of the generator's grid, as :class:`ReconstructorSpec` says."""

    def __init__(self, network: LGMNetwork, spec: ReconstructorSpec) -> None:
        if network.config != spec.network:
            raise ValueError("the LGM network's shape differs from the reconstructor's settings")
        self.network, self.spec = network, spec
        radius = spec.network.cam_radius
        c2w = zero123plus_cameras(radius=radius, fovy=spec.fovy).c2w[list(spec.views)].double()
        front = orbit_camera([0.0], [0.0], radius)[0].double()  # [I | (0, 0, r)]
        #: our world (cameras at LGM's distance) → LGM's normalised frame, a rigid motion [4, 4] (float64)
        self.frame = front @ torch.linalg.inv(c2w[0])
        self.rays = plucker_rays(self.frame @ c2w, spec.network.input_size, spec.fovy).float()  # [V, 6, S, S]
        self.background = torch.ones(3) if spec.background == "white" else torch.full((3,), GRAY)

    @property
    def device(self) -> torch.device:
        return self.network.conv.weight.device

    def inputs(self, views: Tensor) -> tuple[Tensor, int]:
        """The generator's views ``[B, 6, 3, s, s]`` in [0, 1] on gray → LGM's input ``[B, V, 9, S, S]`` (float32,
        differentiable in ``views``) and the number of views left on gray (``white``: no plain border)."""
        b = views.shape[0]
        x = views[:, list(self.spec.views)].float()
        x = x.reshape(b * len(self.spec.views), *x.shape[2:])
        unmatted = 0
        if self.spec.background == "white":
            coverage = []
            for view in x:
                try:
                    coverage.append(view_coverage(view[None]))
                except UserError:  # not a plain border: nothing to tell background from object
                    coverage.append(torch.ones_like(view[None, :1]))
                    unmatted += 1
            x = on_white(x, torch.cat(coverage))
        size = self.spec.network.input_size
        x = network_images(x, size).reshape(b, len(self.spec.views), 3, size, size)
        rays = self.rays.to(x.device).expand(b, -1, -1, -1, -1)
        return torch.cat([x, rays], dim=2), unmatted

    def splats(self, views: Tensor) -> tuple[Tensor, int]:
        """Raw splatter images ``[B, V, 14, s', s']`` (float32) of the generator's views, and how many views stayed
        on gray; differentiable unless called under ``torch.no_grad()``."""
        x, unmatted = self.inputs(views.to(self.device))
        return self.network(x.to(self.network.conv.weight.dtype)).float(), unmatted

    def cameras(self, elevation: Tensor, azimuth: Tensor, resolution: int) -> Cameras:
        """Orbit cameras in our world (degrees, at the input views' distance, field of view ``fovy``) as LGM's
        frame sees them."""
        world = Cameras.orbit(elevation, azimuth, self.spec.network.cam_radius, resolution, self.spec.fovy)
        return dataclasses.replace(world, c2w=(self.frame @ world.c2w.double()).float())

    def to_world(self, radius: float = 2.0) -> Similarity:
        """LGM's frame → our world with the condition view's camera at ``radius`` (Gaussians from
        :func:`~microdreamer.reconstructors.lgm.splatter_to_gaussians` to save or render as any run's)."""
        undo = torch.linalg.inv(self.frame)
        scale = radius / self.spec.network.cam_radius
        return Similarity(scale, undo[:3, :3].float(), (scale * undo[:3, 3]).float())


def render(gaussians: dict[str, Tensor], cameras: Cameras, background: Tensor, backend: str = "auto") -> Tensor:
    """Renders ``[B, 3, H, W]`` by ``cameras`` of activated Gaussians (keyed as
    :func:`~microdreamer.reconstructors.lgm.splatter_activations` gives them)."""
    floats = {k: v.float() for k, v in gaussians.items()}
    return rasterize_gaussians(**floats, cameras=cameras.to(floats["means"].device),
                               background=background.to(floats["means"].device), backend=backend).rgb
