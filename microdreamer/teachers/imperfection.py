"""Seeded defects that make the reference teacher's targets imperfect, as a real diffusion model's are.

A multi-view diffusion model's refined images are not the ground truth: its views disagree a little in
brightness, colour and pose, fine detail is softened, the unseen side is a plausible invention, and a
view now and then grows a part no other view has. The reference teacher's targets are exact; with an
imperfection level (``teacher.imperfection``) they carry one defect for each of those departures.

The defects of a refinement depend on t2, the noise level its sampling starts from, as a diffusion
model's freedom does: at small t2 the target stays near the render, at large t2 it may depart from it.
Every amplitude is the level's maximum times

    ramp(t2) = min(1, (1 − sqrt(ᾱ_t2 / ᾱ_0)) / (1 − sqrt(ᾱ_full / ᾱ_0)))

the share of the clean signal that noising to t2 removes, relative to noising to ``t_full`` (the
schedule's start): 0 at t2 = 0, 1 from ``t_full`` on.

What each defect models, and its maximum at the ``moderate`` level (each view draws its own):

- **exposure**: the object's colours times 1 + e, |e| ≤ 0.10 — brightness drifting from view to view;
- **colour shift**: plus c per channel, |c| ≤ 0.03, on the object — a colour cast, white balance;
- **pose misregistration**: the view rendered from its camera turned about the object's centre by at
  most 2° and moved by at most 2 % of its distance — the model's camera conditioning is approximate;
- **blur**: Gaussian, σ ≤ 1 px at 256² (scaled with the image size) — detail the VAE and the sampler lose;
- **wrong far side**: views more than 90° in azimuth from the reference view see the mesh with its
  texture mirrored (u → 1 − u), blended in by the ramp — a plausible but wrong guess at the unseen side
  (meshes without a texture keep their colours);
- **extra blob**: in one view in 4 on average, a small soft disc (radius 3.5 % of the image side) of an
  object colour centred on the object's outline, opacity = ramp — a part invented in one view only.

The background stays the renderer's (white): a model trained on white-background objects keeps it.
All draws come from a generator seeded by the run's seed and the camera, so a run is reproducible.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..render.types import RenderOutput
from ..sir.cameras import Cameras


@dataclass(frozen=True)
class Imperfection:
    """The defects' maxima, reached from ``t_full`` on (see the module docstring); 0 switches one off."""

    exposure: float = 0.0  # |e| in the gain 1 + e on the object
    colour_shift: float = 0.0  # |c| added per channel on the object
    rotation_degrees: float = 0.0  # camera turned about the object's centre
    translation: float = 0.0  # camera moved, as a share of its distance to the centre
    blur_pixels: float = 0.0  # Gaussian σ at 256² (scaled with the image size)
    far_side_degrees: float | None = None  # views farther than this in azimuth see the mirrored texture
    blob_rate: float = 0.0  # probability of an extra blob per view
    blob_radius: float = 0.035  # share of the image side

    @property
    def active(self) -> bool:
        return bool(self.exposure or self.colour_shift or self.rotation_degrees or self.translation
                    or self.blur_pixels or self.far_side_degrees is not None or self.blob_rate)


LEVELS: dict[str, Imperfection] = {
    "none": Imperfection(),
    "moderate": Imperfection(exposure=0.10, colour_shift=0.03, rotation_degrees=2.0, translation=0.02,
                             blur_pixels=1.0, far_side_degrees=90.0, blob_rate=0.25),
}


def imperfection_level(name: str) -> Imperfection:
    if name not in LEVELS:
        raise UserError(f"unknown imperfection level '{name}' (choose one of {', '.join(LEVELS)})")
    return LEVELS[name]


def ramp(t2: int, t_full: int, alphas_cumprod: Tensor) -> float:
    """The defects' amplitude at t2, in [0, 1] (see the module docstring)."""
    a0 = float(alphas_cumprod[0])
    lost = 1 - math.sqrt(float(alphas_cumprod[max(int(t2), 0)]) / a0)
    full = 1 - math.sqrt(float(alphas_cumprod[t_full]) / a0)
    return min(1.0, lost / full)


@dataclass(frozen=True)
class ViewDraw:
    """One view's random choices, each in a unit range; the amplitude and the level scale them."""

    exposure: float  # [-1, 1]
    colour: Tensor  # [3] in [-1, 1]
    axis: Tensor  # [3] unit rotation axis
    angle: float  # [0, 1]
    direction: Tensor  # [3] unit translation direction
    distance: float  # [0, 1]
    blob: float  # [0, 1): a blob when below the level's rate
    blob_centre: float  # [0, 1): which outline pixel is its centre
    blob_colour: float  # [0, 1): which object pixel lends its colour

    @classmethod
    def draw(cls, seed: int, c2w: Tensor) -> "ViewDraw":
        """The draws of the view with camera-to-world ``c2w [4,4]`` in the run with ``seed``."""
        digest = hashlib.blake2b(c2w.detach().cpu().double().numpy().tobytes(), digest_size=8,
                                 key=int(seed).to_bytes(8, "little")).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        u = torch.rand(6, generator=g, dtype=torch.float64).tolist()
        axis, direction = (F.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0) for _ in "ad")
        return cls(
            exposure=2 * u[0] - 1, colour=2 * torch.rand(3, generator=g, dtype=torch.float64) - 1, axis=axis,
            angle=u[1], direction=direction, distance=u[2], blob=u[3], blob_centre=u[4], blob_colour=u[5],
        )


def _rotation(axis: Tensor, angle: float) -> Tensor:
    """Rodrigues: the rotation by ``angle`` radians about unit ``axis`` ``[3,3]`` (float64)."""
    k = torch.zeros(3, 3, dtype=torch.float64)
    k[0, 1], k[0, 2], k[1, 2] = -axis[2], axis[1], -axis[0]
    k = k - k.T
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def misregistered(cameras: Cameras, draws: list[ViewDraw], amplitude: float, level: Imperfection) -> Cameras:
    """The cameras turned about the origin (the object's centre) and moved, as the draws say."""
    c2w = cameras.c2w.detach().cpu().double().clone()
    for i, d in enumerate(draws):
        turn = _rotation(d.axis, math.radians(amplitude * level.rotation_degrees * d.angle))
        c2w[i, :3] = turn @ c2w[i, :3]  # rotation and position turn together
        c2w[i, :3, 3] += amplitude * level.translation * d.distance * c2w[i, :3, 3].norm() * d.direction
    moved = cameras[:]
    moved.c2w = c2w.to(cameras.c2w)
    return moved


def _blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[B,C,H,W]`` with edge replication (a white border stays white)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def _blob(rgb: Tensor, alpha: Tensor, draw: ViewDraw, opacity: float, radius: float) -> tuple[Tensor, Tensor]:
    """One view ``[3,H,W]``/``[1,H,W]`` with a soft disc of an object colour on its outline composited over it."""
    solid = alpha[0] > 0.5
    outline = (solid & (F.max_pool2d((~solid)[None].float(), 3, 1, 1)[0] > 0)).nonzero()
    if len(outline) == 0:
        return rgb, alpha
    inside = solid.nonzero()
    h, w = alpha.shape[-2:]
    centre = outline[min(int(draw.blob_centre * len(outline)), len(outline) - 1)].double() + 0.5  # (row, column)
    pick = inside[min(int(draw.blob_colour * len(inside)), len(inside) - 1)]
    colour = rgb[:, pick[0], pick[1]].clone()
    rows = torch.arange(h, dtype=torch.float64)[:, None] + 0.5  # pixel centres
    cols = torch.arange(w, dtype=torch.float64)[None, :] + 0.5
    distance = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2).sqrt()
    cover = (opacity * (radius * max(h, w) - distance + 1).clamp(0, 1)).to(rgb)  # one pixel of soft edge
    return rgb * (1 - cover) + colour[:, None, None] * cover, alpha + (1 - alpha) * cover


def imperfect_images(
    render: Callable[[Cameras, bool], RenderOutput],
    cameras: Cameras,
    amplitude: float,
    level: Imperfection,
    seed: int,
    reference_azimuth: float,
    background: Tensor,
) -> Tensor:
    """The defective targets ``[B,3,H,W]`` of ``cameras`` at ``amplitude`` (``ramp(t2)``).

    ``render(cameras, mirrored)`` renders the mesh (with its texture mirrored when asked). A pure function
    of its arguments: the same render, amplitude, cameras and seed give the same images.
    """
    draws = [ViewDraw.draw(seed, c2w) for c2w in cameras.c2w]
    cams = misregistered(cameras, draws, amplitude, level) if level.rotation_degrees or level.translation \
        else cameras
    out = render(cams, False)
    rgb, alpha = out.rgb.clone(), out.alpha.clone()
    if level.far_side_degrees is not None and amplitude > 0:
        turned = (cameras.azimuth.cpu() - reference_azimuth + 180) % 360 - 180
        far = (turned.abs() > level.far_side_degrees).nonzero()[:, 0]
        if len(far):
            wrong = render(cams[far.to(cameras.device)], True).rgb
            rgb[far] = (1 - amplitude) * rgb[far] + amplitude * wrong
    for i, d in enumerate(draws):
        if d.blob < level.blob_rate and amplitude > 0:
            rgb[i], alpha[i] = _blob(rgb[i], alpha[i], d, amplitude, level.blob_radius)
    bg = background.to(rgb).view(1, 3, 1, 1) * (1 - alpha)
    gain = torch.tensor([1 + amplitude * level.exposure * d.exposure for d in draws]).to(rgb).view(-1, 1, 1, 1)
    shift = torch.stack([amplitude * level.colour_shift * d.colour for d in draws]).to(rgb)[..., None, None]
    rgb = bg + gain * (rgb - bg) + alpha * shift
    sigma = amplitude * level.blur_pixels * rgb.shape[-1] / 256
    if sigma > 1e-3:
        rgb = _blur(rgb, sigma)
    return rgb.clamp(0, 1)
