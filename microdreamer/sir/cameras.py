"""Orbit cameras in the reference convention (spec §0.4) and the per-iteration camera sampler.

World: y up. A camera at elevation ``el``, azimuth ``az`` (degrees) and radius ``r`` sits at
``(r cos(el) sin(az), -r sin(el), r cos(el) cos(az))`` looking at the origin, so a *negative*
elevation puts the camera *above* the object, azimuth 0 is on +z and azimuth 90 on +x.
Camera-to-world matrices are OpenGL style (the camera looks along its -z, +y is up in the image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import CameraConfig

# The OpenGL camera axes (x right, y up, looking along -z) become OpenCV axes (x right, y down,
# looking along +z) by flipping the camera's y and z.
_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def orbit_camera(elevation: Tensor, azimuth: Tensor, radius: Tensor) -> Tensor:
    """Camera-to-world ``[B,4,4]`` (float32) for orbit angles in degrees (spec §0.4)."""
    el = torch.deg2rad(torch.as_tensor(elevation, dtype=torch.float64)).reshape(-1)
    az = torch.deg2rad(torch.as_tensor(azimuth, dtype=torch.float64)).reshape(-1)
    r = torch.as_tensor(radius, dtype=torch.float64).reshape(-1).expand_as(el)
    pos = torch.stack([r * el.cos() * az.sin(), -r * el.sin(), r * el.cos() * az.cos()], -1)
    forward = pos / pos.norm(dim=-1, keepdim=True)
    up_world = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(forward)
    right = torch.linalg.cross(up_world, forward, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    up = torch.linalg.cross(forward, right, dim=-1)
    c2w = torch.zeros(el.shape[0], 4, 4, dtype=torch.float64)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, forward, pos
    c2w[:, 3, 3] = 1.0
    return c2w.float()


@dataclass
class Cameras:
    """A batch of B pinhole cameras sharing one image size and vertical field of view.

    ``elevation``/``azimuth``/``radius`` (degrees, world units) are kept beside ``c2w`` because
    teachers condition on the angles (Zero123 on deltas to the reference view, MVDream on poses).
    """

    c2w: Tensor  # [B,4,4] OpenGL camera-to-world
    elevation: Tensor  # [B] degrees, negative = above
    azimuth: Tensor  # [B] degrees
    radius: Tensor  # [B]
    width: int
    height: int
    fovy: float = 49.1  # degrees
    near: float = 0.01
    far: float = 100.0

    @classmethod
    def orbit(
        cls,
        elevation,
        azimuth,
        radius,
        resolution: int | tuple[int, int],
        fovy: float = 49.1,
        near: float = 0.01,
        far: float = 100.0,
    ) -> "Cameras":
        el = torch.as_tensor(elevation, dtype=torch.float32).reshape(-1)
        az = torch.as_tensor(azimuth, dtype=torch.float32).reshape(-1)
        r = torch.as_tensor(radius, dtype=torch.float32).reshape(-1).expand_as(el).clone()
        w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
        return cls(orbit_camera(el, az, r), el, az, r, w, h, fovy, near, far)

    @staticmethod
    def cat(batches: "list[Cameras]") -> "Cameras":
        """One batch from several that share image size and intrinsics."""
        first = batches[0]
        dev = first.device
        return Cameras(
            *(torch.cat([getattr(b, k).to(dev) for b in batches]) for k in ("c2w", "elevation", "azimuth", "radius")),
            first.width, first.height, first.fovy, first.near, first.far,
        )

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, idx) -> "Cameras":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return Cameras(
            self.c2w[idx], self.elevation[idx], self.azimuth[idx], self.radius[idx],
            self.width, self.height, self.fovy, self.near, self.far,
        )

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(
            self.c2w.to(device), self.elevation.to(device), self.azimuth.to(device),
            self.radius.to(device), self.width, self.height, self.fovy, self.near, self.far,
        )

    def with_resolution(self, width: int, height: int | None = None) -> "Cameras":
        return Cameras(
            self.c2w, self.elevation, self.azimuth, self.radius, width, height or width,
            self.fovy, self.near, self.far,
        )

    @property
    def focal(self) -> tuple[float, float]:
        """Focal lengths (fx, fy) in pixels; fovx follows from fovy and the aspect ratio."""
        fy = 0.5 * self.height / math.tan(math.radians(self.fovy) / 2)
        return fy, fy

    def intrinsics(self) -> Tensor:
        """``[B,3,3]`` pixel intrinsics, principal point at the image centre (pixel centres at +0.5)."""
        fx, fy = self.focal
        k = torch.tensor([[fx, 0, self.width / 2], [0, fy, self.height / 2], [0, 0, 1]])
        return k.to(self.c2w).expand(len(self), 3, 3)

    def viewmats(self) -> Tensor:
        """``[B,4,4]`` OpenCV world-to-camera matrices (x right, y down, looking along +z)."""
        rot, t = self.c2w[:, :3, :3], self.c2w[:, :3, 3:]
        w2c = torch.zeros_like(self.c2w)
        w2c[:, :3, :3] = rot.transpose(1, 2)  # the exact rigid inverse: [Rᵀ | −Rᵀt]
        w2c[:, :3, 3:] = -rot.transpose(1, 2) @ t
        w2c[:, 3, 3] = 1.0
        return _GL_TO_CV.to(w2c) @ w2c

    def centers(self) -> Tensor:
        return self.c2w[:, :3, 3]

    def rays(self, pixels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """World ray origins and unit directions through pixel centres, ``[B,P,3]`` each.

        ``pixels [B,P]`` are row-major flat pixel indices per camera (default: all ``H·W`` pixels).
        """
        fx, fy = self.focal
        if pixels is None:
            pixels = torch.arange(self.width * self.height, device=self.device).expand(len(self), -1)
        u = (pixels % self.width).float() + 0.5
        v = torch.div(pixels, self.width, rounding_mode="floor").float() + 0.5
        # OpenGL camera: x right, y up, looking along -z; image rows grow downwards
        local = torch.stack([(u - self.width / 2) / fx, -(v - self.height / 2) / fy, -torch.ones_like(u)], -1)
        directions = local @ self.c2w[:, :3, :3].transpose(1, 2)
        directions = directions / directions.norm(dim=-1, keepdim=True)
        return self.centers()[:, None, :].expand_as(directions), directions


@dataclass
class CameraSampler:
    """Draws the B cameras of one SIR iteration (spec §6.5).

    Azimuths are spread evenly (360/B apart) from a random offset in [-180, -180 + 360/B); each view
    gets its own elevation offset drawn from [min_ver, max_ver) around the reference elevation,
    clipped so that the absolute elevation stays within ±80°.
    """

    views: int = 6
    elevation: float = 0.0
    min_ver: float = -30.0
    max_ver: float = 30.0
    radius: float = 2.0
    resolution: int = 256
    fovy: float = 49.1

    def sample(self, generator: torch.Generator) -> Cameras:
        step = 360 // self.views
        base = int(torch.randint(-180, -180 + step, (1,), generator=generator))
        azimuth = torch.tensor([base + step * i for i in range(self.views)], dtype=torch.float32)
        el = self.elevation
        lo = max(min(self.min_ver, self.min_ver - el), -80 - el)
        hi = min(max(self.max_ver, self.max_ver - el), 80 - el)
        lo_i, hi_i = int(math.floor(lo)), int(math.floor(hi))
        ver = (
            torch.randint(lo_i, hi_i, (self.views,), generator=generator).float()
            if hi_i > lo_i
            else torch.full((self.views,), float(lo_i))
        )
        return Cameras.orbit(el + ver, azimuth, self.radius, self.resolution, self.fovy)

    def reference(self, azimuth: float = 0.0) -> Cameras:
        """The reference view: the input image's camera (azimuth 0 for Zero123, 90 for MVDream)."""
        return Cameras.orbit([self.elevation], [azimuth], self.radius, self.resolution, self.fovy)


@dataclass
class RangeCameraSampler:
    """Draws the B cameras of one iteration from threestudio-style ranges (spec nerf §1.2, §1.6).

    One fovy and one distance per batch, uniform in their ranges (a relative distance is divided by
    tan(fovy/2), threestudio's ``relative_radius``, so the object fills the same share of every view);
    elevations uniform in degrees or, with probability ½ per batch, uniform on the sphere (uniform in
    sin), one for the whole batch or one per view; azimuths spread evenly from a random offset
    (MicroDreamer's change to threestudio, paper §V). Elevations are in our convention (negative =
    above): threestudio's range [a, b] (positive = above) is ours [−b, −a].
    """

    views: int = 4
    elevation_range: tuple[float, float] = (-30.0, 30.0)
    shared_elevation: bool = False
    distance_range: tuple[float, float] = (2.0, 2.0)
    relative_distance: bool = False
    fovy_range: tuple[float, float] = (49.1, 49.1)
    resolution: int = 256
    elevation: float = 0.0  # the reference view
    radius: float = 2.0
    fovy: float = 49.1

    def sample(self, generator: torch.Generator) -> Cameras:
        def uniform(n: int, bounds: tuple[float, float]) -> Tensor:
            u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).cpu()
            return bounds[0] + u * (bounds[1] - bounds[0])

        fovy = float(uniform(1, self.fovy_range))
        distance = uniform(1, self.distance_range)
        if self.relative_distance:
            distance = distance / math.tan(math.radians(fovy) / 2)
        n = 1 if self.shared_elevation else self.views
        on_sphere = float(uniform(1, (0.0, 1.0))) >= 0.5
        if on_sphere:
            lo, hi = (math.sin(math.radians(e)) for e in self.elevation_range)
            elevation = torch.rad2deg(torch.asin(uniform(n, (lo, hi)).clamp(-1.0, 1.0)))
        else:
            elevation = uniform(n, self.elevation_range)
        azimuth = (uniform(1, (0.0, 1.0)) + torch.arange(self.views)) / self.views * 360.0 - 180.0
        return Cameras.orbit(elevation.expand(self.views), azimuth, distance, self.resolution, fovy)

    def reference(self, azimuth: float = 0.0) -> Cameras:
        """The reference view: the input image's camera."""
        return Cameras.orbit([self.elevation], [azimuth], self.radius, self.resolution, self.fovy)


def camera_sampler(c: CameraConfig) -> CameraSampler | RangeCameraSampler:
    """The configured sampler (``cameras.sampler``: ``offsets`` or ``ranges``)."""
    if c.sampler == "ranges":
        return RangeCameraSampler(c.views, tuple(c.elevation_range), c.shared_elevation, tuple(c.distance_range),
                                  c.relative_distance, tuple(c.fovy_range), c.resolution, c.elevation, c.radius,
                                  c.fovy)
    return CameraSampler(c.views, c.elevation, c.min_ver, c.max_ver, c.radius, c.resolution, c.fovy)


def turntable(n: int, elevation: float, radius: float, resolution: int, fovy: float = 49.1,
              offset: float = 0.0) -> Cameras:
    """``n`` cameras evenly around the object at one elevation, starting at azimuth ``offset``."""
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n) + offset
    return Cameras.orbit(torch.full((n,), float(elevation)), az, radius, resolution, fovy)
