"""The reference teacher: a ground-truth mesh standing in for a diffusion model.

It works in pixel space (encode x ↦ 2x − 1) and, for any noisy input x_t, returns exactly the noise
that makes the DDIM x0-prediction equal to the mesh's own rendering from the same camera:
eps = (x_t − sqrt(ᾱ_t) x_ref) / sqrt(1 − ᾱ_t). Guidance has nothing to act on, so every branch gives
the same eps. This makes the whole SIR loop testable end to end without model weights, and its
optimum is known: the reconstruction should converge to the mesh.

Renders are ``lit`` by default (a key light fixed to the object plus ambient light, the look of a photo
or a diffusion model's output: a white object on the white background is seen by its shading) or
``albedo`` (the surface colours themselves, for texture checks); the run's input image is the same
render from the reference camera. With an imperfection level (:mod:`.imperfection`) the targets carry
seeded defects that grow with t2. A refinement's guided predictions for one camera batch come as one
descending DDIM sampling pass from t2 (spec §6.3): a guided query at a timestep not below the batch's
previous one starts a new pass, and every prediction of the pass aims at the render with the defects of
that t2. Unconditional predictions, which the refiner uses only to invert the render up to t2, aim at
the render itself: the sampling pass's predictions alone make the target.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io.mesh import TexturedMesh, load_mesh
from ..render.mesh import rasterize_mesh, resolve_mesh_backend, shading_light
from ..render.types import RenderOutput
from ..sir.cameras import Cameras
from ..sir.scheduler import scaled_linear_alphas_cumprod
from .base import Branch, Condition, Teacher
from .imperfection import imperfect_images, imperfection_level, ramp

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
        shading: str = "lit",
        imperfection: str = "none",
        full_at: float = 0.9,
    ) -> None:
        """``shading``: ``lit`` or ``albedo``; ``imperfection``: a level of :data:`.imperfection.LEVELS`,
        whose defects reach their maxima from t2 = ``full_at``·T on (the schedule's ``t_start``)."""
        super().__init__()
        self.device = torch.device(device)
        self.mesh = (mesh if isinstance(mesh, TexturedMesh) else load_mesh(mesh)).to(self.device)
        self.resolution = resolution
        self.background = torch.as_tensor(background, dtype=torch.float32).reshape(3).to(self.device)
        self.backend = resolve_mesh_backend(backend, self.device)
        self.supersample = supersample
        self.shading = shading
        self.light = shading_light(shading)
        self.imperfection_name = imperfection
        self.imperfection = imperfection_level(imperfection)
        self._alphas_cumprod = scaled_linear_alphas_cumprod()
        self.t_full = min(int(round(full_at * len(self._alphas_cumprod))), len(self._alphas_cumprod) - 1)
        self.seed = 0  # of the defects; prepare() draws it from the run's generator
        self._renders: OrderedDict[tuple, RenderOutput] = OrderedDict()
        self._passes: OrderedDict[tuple, tuple[int, Tensor]] = OrderedDict()  # batch → (last t, target)
        self._mirrored: TexturedMesh | None = None
        self._backdrop: Tensor | None = None  # set_backdrop: what the renders being refined show behind the object

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._alphas_cumprod

    @property
    def mode(self) -> str:
        """What its targets are, for reports: ``lit`` or ``albedo``, and the imperfection level."""
        return f"{self.shading}, imperfection {self.imperfection_name}"

    def prepare(self, condition: Condition, generator: torch.Generator | None = None) -> None:
        """The mesh is the condition; with an imperfection level, the defects' seed comes from ``generator``."""
        self._passes.clear()
        if self.imperfection.active and generator is not None:
            self.seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return images * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, 3, self.resolution, self.resolution)

    def _key(self, cameras: Cameras) -> tuple:
        return (cameras.c2w.detach().cpu().numpy().tobytes(), cameras.fovy, cameras.near, cameras.far)

    def _draw(self, cameras: Cameras, mirrored: bool = False) -> RenderOutput:
        mesh = self.mesh
        if mirrored and mesh.has_texture:
            if self._mirrored is None:
                self._mirrored = replace(mesh, texture=mesh.texture.flip(1), cache={})  # u → 1 − u
            mesh = self._mirrored
        with torch.no_grad():
            return rasterize_mesh(mesh, cameras.to(self.device).with_resolution(self.resolution), self.background,
                                  self.backend, supersample=self.supersample, light=self.light)

    def render(self, cameras: Cameras) -> RenderOutput:
        """The mesh seen by ``cameras`` at the teacher resolution, antialiased (cached per camera batch)."""
        key = self._key(cameras)
        if key in self._renders:
            self._renders.move_to_end(key)
            return self._renders[key]
        out = self._draw(cameras)
        self._renders[key] = out
        if len(self._renders) > _CACHED_BATCHES:
            self._renders.popitem(last=False)
        return out

    def set_backdrop(self, backdrop: Tensor | None) -> None:
        """A perfect teacher keeps the background of the render it refines: the targets show the mesh over
        ``backdrop`` (resized to the teacher's resolution) instead of the run's colour."""
        self._backdrop = backdrop

    def target(self, cameras: Cameras, t: int, branch: Branch = "guided") -> Tensor:
        """The image ``[B,3,res,res]`` the prediction at ``t`` aims at: the render, or with an imperfection
        level and a guided query, the render with the defects of the current sampling pass's t2; over the
        backdrop when one is set (with the defects, over the clean render's coverage)."""
        image = self._target(cameras, t, branch)
        if self._backdrop is None:
            return image
        backdrop = self._backdrop.to(image)
        if backdrop.shape[-2:] != image.shape[-2:]:
            backdrop = F.interpolate(backdrop, image.shape[-2:], mode="bilinear", align_corners=False)
        return image + (1 - self.render(cameras).alpha) * (backdrop - self.background[:, None, None])

    def _target(self, cameras: Cameras, t: int, branch: Branch) -> Tensor:
        if not self.imperfection.active or branch != "guided":
            return self.render(cameras).rgb
        key = self._key(cameras)
        last = self._passes.get(key)
        if last is None or t >= last[0]:  # a new sampling pass starts at t2 = t
            amplitude = ramp(t, self.t_full, self._alphas_cumprod)
            image = imperfect_images(self._draw, cameras, amplitude, self.imperfection, self.seed,
                                     self.reference_azimuth, self.background)
        else:
            image = last[1]
        self._passes[key] = (int(t), image)
        self._passes.move_to_end(key)
        if len(self._passes) > _CACHED_BATCHES:
            self._passes.popitem(last=False)
        return image

    def _eps(self, latents: Tensor, t: int, cameras: Cameras, branch: Branch, guidance_scale: float) -> Tensor:
        x_ref = self.encode(self.target(cameras, t, branch)).to(device=latents.device, dtype=torch.float64)
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
