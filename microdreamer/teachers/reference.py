"""The reference teacher: a ground-truth mesh standing in for a diffusion model.

It works in pixel space (encode x ↦ 2x − 1) and, for any noisy input x_t, returns exactly the noise
that makes the DDIM x0-prediction equal to the mesh's own rendering from the same camera:
eps = (x_t − sqrt(ᾱ_t) x_ref) / sqrt(1 − ᾱ_t). Guidance has nothing to act on, so every branch gives
the same eps. This makes the whole SIR loop testable end to end without model weights, and its
optimum is known: the reconstruction should converge to the mesh.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io.mesh import TexturedMesh, load_mesh
from ..render.mesh import rasterize_mesh, resolve_mesh_backend
from ..render.types import RenderOutput
from ..sir.cameras import Cameras
from ..sir.scheduler import scaled_linear_alphas_cumprod
from .base import Branch, Condition, Teacher

#: camera batches whose renders are kept (one SIR iteration queries the same batch many times)
_CACHED_BATCHES = 4


class ReferenceTeacher(Teacher):
    """Noise predictions that lead to the renders of a known mesh (see the module docstring)."""

    reference_azimuth = 0.0

    def __init__(
        self,
        mesh: str | Path | TexturedMesh,
        device: torch.device | str = "cpu",
        resolution: int = 256,
        background: Tensor | tuple[float, float, float] = (1.0, 1.0, 1.0),
        backend: str = "auto",
        supersample: int = 2,
    ) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.mesh = (mesh if isinstance(mesh, TexturedMesh) else load_mesh(mesh)).to(self.device)
        self.resolution = resolution
        self.background = torch.as_tensor(background, dtype=torch.float32).reshape(3).to(self.device)
        self.backend = resolve_mesh_backend(backend, self.device)
        self.supersample = supersample
        self._alphas_cumprod = scaled_linear_alphas_cumprod()
        self._renders: OrderedDict[tuple, RenderOutput] = OrderedDict()

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._alphas_cumprod

    def prepare(self, condition: Condition, generator: torch.Generator | None = None) -> None:
        """Nothing to prepare: the mesh is the condition."""

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return images * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, 3, self.resolution, self.resolution)

    def render(self, cameras: Cameras) -> RenderOutput:
        """The mesh seen by ``cameras`` at the teacher resolution, antialiased (cached per camera batch)."""
        cams = cameras.to(self.device).with_resolution(self.resolution)
        key = (cams.c2w.detach().cpu().numpy().tobytes(), cams.fovy, cams.near, cams.far)
        if key in self._renders:
            self._renders.move_to_end(key)
            return self._renders[key]
        with torch.no_grad():
            out = rasterize_mesh(self.mesh, cams, self.background, self.backend, supersample=self.supersample)
        self._renders[key] = out
        if len(self._renders) > _CACHED_BATCHES:
            self._renders.popitem(last=False)
        return out

    def _eps(self, latents: Tensor, t: int, cameras: Cameras, branch: Branch, guidance_scale: float) -> Tensor:
        x_ref = self.encode(self.render(cameras).rgb).to(device=latents.device, dtype=torch.float64)
        a = float(self._alphas_cumprod[int(t)])
        eps = (latents.to(torch.float64) - math.sqrt(a) * x_ref) / math.sqrt(1.0 - a)
        return eps.to(latents.dtype)

    def front_image(
        self, elevation: float | Cameras = 0.0, radius: float = 2.0, fovy: float = 49.1
    ) -> tuple[Tensor, Tensor]:
        """The run's input image when none is given: rgb ``[1,3,res,res]`` and mask ``[1,1,res,res]`` of the
        view at the reference azimuth (0). ``elevation`` may also be the reference camera itself."""
        camera = (
            elevation
            if isinstance(elevation, Cameras)
            else Cameras.orbit([elevation], [self.reference_azimuth], radius, self.resolution, fovy)
        )
        out = self.render(camera[:1])
        return out.rgb, out.alpha
