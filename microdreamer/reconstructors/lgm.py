"""The LGM reconstructor: four views of an object → 3D Gaussians in one network pass.

Facts from 3DTopia/LGM@fe8d12c (teachers spec §5, geco spec §2.7), in our words:

- **Input** ``[B, 4, 9, 256, 256]``: per view, the RGB image over a white background (bilinearly
  resized to 256² if needed, then ImageNet-normalised) followed by the Plücker embedding ``(o×d, d)``
  of its camera's ray through every pixel centre (``core/utils.py get_rays``, ``core/models.py``).
- **Cameras**: orbit cameras (our convention, spec §0.4, which is kiui's) at elevation ``e``, azimuths
  0/90/180/270, radius 1.5, fovy 49.1°, then moved by the one rigid motion that puts view 0 at
  ``[I | (0, 0, 1.5)]`` (``core/provider_objaverse.py``; the identity when ``e = 0``). View 0 is the
  front (the input image); LGM's ``infer.py`` reorders MVDream/ImageDream outputs ``[1, 2, 3, 0]`` to
  get this order, our callers pass views by azimuth.
- **Output**: per pixel of each view's splatter image, 14 raw values activated as
  (``core/models.py``): position = clamp(·, −1, 1) (3), opacity = sigmoid (1),
  scale = 0.1·softplus (3), rotation = quaternion (w, x, y, z) normalised over its own 4 values (4),
  colour = 0.5·tanh + 0.5 (3). Gaussians are ordered view, row, column.
- **Rotation fix**: until LGM commit 9a0797c the quaternions were normalised over the Gaussian axis
  instead; ``model.safetensors`` and ``model_fp16.safetensors`` were trained that way and are refused.
  The ``*_fixrot`` files were fine-tuned with the fix.

Frames: LGM's Gaussians live in its normalised frame (cameras at radius 1.5). :func:`lgm_frame`
maps them into ours given the views' cameras in our world: view 0 back to its pose, then scaled by
``r / 1.5`` (r: the views' distance) so that those cameras see exactly what LGM's input cameras saw.
For LGM's own views (:func:`orbit_views`) placed at ``radius`` this is :func:`lgm_to_world`. The
object's size is thus set by how the views frame it, as for every image input (a mesh teacher's
"longest side 1" is a property of reference meshes, not of this frame). Views at other poses (a
generator's fixed views) get the Plücker rays of their true cameras, normalised the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..io.ply import GaussianPLY
from ..representations.gaussians import SH_C0
from ..representations.similarity import Similarity
from ..sir.cameras import Cameras
from ..teachers.catalog import find_entry
from ..teachers.loading import load_module, local_model_dir, read_json, resolve_dtype, resolve_model_dir
from .lgm_unet import NUM_VIEWS, OUT_CHANNELS, LGMConfig, LGMNetwork

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AZIMUTHS = (0.0, 90.0, 180.0, 270.0)  # degrees, views 0..3; view 0 is the front
DEFAULT_FILE = "model_fp16_fixrot.safetensors"
#: published checkpoints trained before the rotation fix (quaternions normalised across Gaussians)
PRE_FIX_FILES = ("model.safetensors", "model_fp16.safetensors")
#: LGM saves only Gaussians at least this opaque (``core/gs.py save_ply``)
MIN_OPACITY = 0.005
#: beside the weights in a local folder, optionally: :class:`LGMConfig` fields of a network other than "big"
CONFIG_FILE = "config.json"


def _front_pose(radius: float) -> Tensor:
    """``[I | (0, 0, radius)]``: where LGM's normalisation puts view 0 (float64)."""
    pose = torch.eye(4, dtype=torch.float64)
    pose[2, 3] = radius
    return pose


def orbit_views(config: LGMConfig, elevation: float = 0.0, radius: float = 2.0,
                resolution: int | None = None) -> Cameras:
    """LGM's own four views in our world: orbit cameras at ``elevation``, azimuths 0/90/180/270, ``radius``,
    LGM's fovy (``resolution`` default: its input size)."""
    return Cameras.orbit([elevation] * NUM_VIEWS, AZIMUTHS, radius, resolution or config.input_size, config.fovy)


def lgm_frame(c2w: Tensor, cam_radius: float = 1.5) -> tuple[Tensor, Similarity]:
    """The four views' camera-to-world matrices in our world ``[4, 4, 4]`` (OpenGL, all at one distance r
    from the origin) → their poses in LGM's normalised frame (float64) and the similarity from that frame
    back into ours.

    LGM's frame is ours scaled by ``cam_radius / r`` and moved by the one rigid motion that puts view 0 at
    ``[I | (0, 0, cam_radius)]`` (the identity for an orbit view 0 at elevation 0, azimuth 0)."""
    c2w = c2w.double().cpu()
    distance = c2w[:, :3, 3].norm(dim=-1)
    if c2w.shape != (NUM_VIEWS, 4, 4) or not torch.allclose(distance, distance[0], rtol=1e-5):
        raise ValueError(f"LGM takes {NUM_VIEWS} cameras at one distance from the origin, got {list(c2w.shape)} "
                         f"at distances {[round(float(d), 4) for d in distance]}")
    s = cam_radius / float(distance[0])
    scaled = c2w.clone()
    scaled[:, :3, 3] *= s
    normalise = _front_pose(cam_radius) @ torch.linalg.inv(scaled[0])
    undo = torch.linalg.inv(normalise)  # LGM's frame → ours scaled by s
    return normalise @ scaled, Similarity(1 / s, undo[:3, :3].float(), (undo[:3, 3] / s).float())


def network_images(images: Tensor, size: int) -> Tensor:
    """Views ``[N, 3, H, W]`` in [0, 1] → LGM's image channels ``[N, 3, size, size]``: bilinear resize, ImageNet
    normalisation (differentiable)."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
    return (images - mean) / std


def input_cameras(config: LGMConfig, elevation: float = 0.0) -> Tensor:
    """Camera-to-world ``[4, 4, 4]`` (OpenGL, float64) of LGM's input views in its normalised frame."""
    return lgm_frame(orbit_views(config, elevation, config.cam_radius).c2w, config.cam_radius)[0]


def plucker_rays(c2w: Tensor, size: int, fovy: float) -> Tensor:
    """Plücker embedding ``(o×d, d)`` ``[V, 6, size, size]`` (float64) of OpenGL cameras ``c2w [V, 4, 4]``.

    ``d`` is the unit direction through each pixel centre: camera-space
    ``((x + 0.5 − size/2)/f, −(y + 0.5 − size/2)/f, −1)`` for column x, row y, rotated into the world,
    with ``f = (size/2) / tan(fovy/2)``; ``o`` is the camera centre."""
    c2w = c2w.double()
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    coords = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) / focal
    row, col = torch.meshgrid(coords, coords, indexing="ij")
    dirs = torch.stack([col, -row, -torch.ones_like(col)], -1)  # [size, size, 3] camera space
    d = torch.einsum("vij,hwj->vhwi", c2w[:, :3, :3], dirs)
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2w[:, None, None, :3, 3].expand_as(d)
    return torch.cat([torch.linalg.cross(o, d, dim=-1), d], -1).permute(0, 3, 1, 2)


def lgm_to_world(config: LGMConfig, elevation: float = 0.0, radius: float = 2.0) -> Similarity:
    """LGM's normalised frame → ours, for its own input views at ``elevation`` placed at ``radius``: undo
    the normalisation (a rotation about x by the elevation), then scale by ``radius / cam_radius``."""
    return lgm_frame(orbit_views(config, elevation, radius).c2w, config.cam_radius)[1]


def _log_softplus(x: Tensor) -> Tensor:
    """``log(softplus(x))``, finite for very negative x (where it equals x to float precision)."""
    return torch.where(x > -15, F.softplus(x).log(), x)


def splatter_activations(splats: Tensor) -> dict[str, Tensor]:
    """One object's raw splatter images ``[V, 14, s, s]`` → its Gaussians as LGM renders them (differentiable,
    in LGM's frame), keyed as :func:`~microdreamer.render.gaussians.rasterize_gaussians` takes them:
    ``means`` clamp(·, −1, 1), ``opacities`` sigmoid, ``scales`` 0.1·softplus, ``quats`` normalised over their
    4 values, ``colors`` 0.5·tanh + 0.5. Gaussians are ordered view, row, column."""
    x = splats.float().permute(0, 2, 3, 1).reshape(-1, OUT_CHANNELS)
    return {"means": x[:, 0:3].clamp(-1.0, 1.0), "quats": F.normalize(x[:, 7:11], dim=-1),
            "scales": 0.1 * F.softplus(x[:, 4:7]), "opacities": torch.sigmoid(x[:, 3]),
            "colors": 0.5 * torch.tanh(x[:, 11:14]) + 0.5}


def splatter_to_gaussians(splats: Tensor, min_opacity: float = MIN_OPACITY) -> GaussianPLY:
    """One object's raw splatter images ``[4, 14, s, s]`` → raw 3DGS parameters in LGM's frame.

    The raw values LGM's activations imply, as a 3DGS PLY stores them: opacity logit (the raw value
    itself), log scale ``log(0.1·softplus)``, the normalised quaternion, SH DC colour
    ``(rgb − 0.5) / C0`` with ``rgb = 0.5·tanh + 0.5``. Gaussians with opacity below ``min_opacity``
    are dropped."""
    x = splats.float().permute(0, 2, 3, 1).reshape(-1, OUT_CHANNELS)  # Gaussian index: view, row, column
    keep = torch.sigmoid(x[:, 3]) >= min_opacity
    x = x[keep]
    return GaussianPLY(
        means=x[:, 0:3].clamp(-1.0, 1.0),
        f_dc=0.5 * torch.tanh(x[:, 11:14]) / SH_C0,
        f_rest=torch.zeros(x.shape[0], 0, 3, dtype=x.dtype, device=x.device),
        opacity=x[:, 3].clone(),
        scale=_log_softplus(x[:, 4:7]) + math.log(0.1),
        rotation=F.normalize(x[:, 7:11], dim=-1),
    )


def check_weights_source(source: str | Path, filename: str = DEFAULT_FILE) -> None:
    """What :meth:`LGMReconstructor.from_pretrained` would refuse about where the weights are, checked
    before anything loads: the pre-fix and pickle files, a local folder that is missing or lacks the file."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        _check_weights_name(path.name)
        return
    _check_weights_name(filename)
    local_model_dir(str(source), (filename,))


def _check_weights_name(name: str) -> None:
    if name in PRE_FIX_FILES:
        raise UserError(
            f"{name} is LGM's checkpoint from before its rotation fix (quaternions normalised across Gaussians, "
            "LGM commit 9a0797c); use model_fp16_fixrot.safetensors or model_fixrot.safetensors"
        )
    if not name.endswith(".safetensors"):
        raise UserError(
            f"{name}: only .safetensors weights are loaded (pickle files can run code); "
            "use model_fp16_fixrot.safetensors from ashawkey/LGM"
        )


class LGMReconstructor:
    """The LGM network with its input convention and its output turned into our Gaussians."""

    def __init__(self, network: LGMNetwork) -> None:
        self.network = network
        self.config = network.config

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path | None = None,
        filename: str = DEFAULT_FILE,
        *,
        config: LGMConfig | None = None,
        device: torch.device | str = "cpu",
        dtype: str = "auto",
        allow_download: bool = True,
        cache_dir: str | Path | None = None,
    ) -> "LGMReconstructor":
        """Load LGM weights strictly from safetensors: a Hugging Face id (default ``ashawkey/LGM``,
        only ``filename`` is fetched), a folder holding ``filename``, or the file itself.

        The network is "big" (every published checkpoint) unless ``config`` says otherwise, or a
        ``config.json`` of :class:`LGMConfig` fields lies beside the weights. ``dtype="auto"`` is fp16 on
        CUDA and fp32 elsewhere. The pre-fix checkpoints and pickle files are refused before anything is
        read or downloaded."""
        source = find_entry("lgm").repo_id if model_id_or_path is None else model_id_or_path
        path = Path(str(source)).expanduser()
        if path.is_file():
            weights = path
        else:
            _check_weights_name(filename)
            folder = resolve_model_dir(source, allow_download=allow_download, cache_dir=cache_dir, files=(filename,))
            weights = folder / filename
        _check_weights_name(weights.name)
        if config is None:
            config = _folder_config(weights.parent)
        device = torch.device(device)
        network = load_module(lambda: LGMNetwork(config), weights, device=device, dtype=resolve_dtype(dtype, device))
        return cls(network)

    @property
    def device(self) -> torch.device:
        return self.network.conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.conv.weight.dtype

    def prepare(self, images: Tensor, cameras: Cameras | None = None) -> Tensor:
        """Views ``[4, 3, H, W]`` or ``[B, 4, 3, H, W]`` in [0, 1] over white, seen by ``cameras`` (our
        world; default: LGM's own, :func:`orbit_views`) → the network input ``[B, 4, 9, S, S]`` (float32,
        on the images' device)."""
        if images.dim() == 4:
            images = images[None]
        if images.dim() != 5 or images.shape[1] != NUM_VIEWS or images.shape[2] != 3:
            raise ValueError(f"LGM takes [{NUM_VIEWS}, 3, H, W] or [B, {NUM_VIEWS}, 3, H, W] images, got {list(images.shape)}")
        b, size = images.shape[0], self.config.input_size
        x = network_images(images.reshape(b * NUM_VIEWS, *images.shape[2:]).float(), size)
        x = x.reshape(b, NUM_VIEWS, 3, size, size)
        cameras = cameras if cameras is not None else orbit_views(self.config)
        rays = plucker_rays(lgm_frame(cameras.c2w, self.config.cam_radius)[0], size, cameras.fovy).to(x)
        return torch.cat([x, rays.expand(b, -1, -1, -1, -1)], dim=2)

    @torch.no_grad()
    def splatter_images(self, inputs: Tensor) -> Tensor:
        """Raw network output ``[B, 4, 14, s, s]`` (float32) for inputs from :meth:`prepare`."""
        return self.network(inputs.to(self.device, self.dtype)).float()

    def reconstruct(self, images: Tensor, cameras: Cameras | None = None,
                    min_opacity: float = MIN_OPACITY) -> list[GaussianPLY]:
        """One set of raw Gaussian parameters per object, in our world: the frame of ``cameras`` (default:
        LGM's own views at radius 2, :func:`orbit_views`)."""
        cameras = cameras if cameras is not None else orbit_views(self.config)
        splats = self.splatter_images(self.prepare(images.to(self.device), cameras))
        to_world = lgm_frame(cameras.c2w, self.config.cam_radius)[1]
        return [to_world.apply(splatter_to_gaussians(s, min_opacity)) for s in splats]


def _folder_config(folder: Path) -> LGMConfig:
    """"big", or the network a ``config.json`` beside the weights describes."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return LGMConfig()
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in read_json(path).items()}
    try:
        return LGMConfig(**values)
    except (TypeError, ValueError) as error:
        raise UserError(f"{path} does not describe an LGM network: {error}") from None
