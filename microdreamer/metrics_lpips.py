"""LPIPS v0.1 with the VGG16 trunk (Zhang et al. 2018), without torchvision: our own VGG16 feature stack whose
parameter names are torchvision's ``vgg16().features.*``, and the five linear heads of the lpips package.

Weights are not bundled; two published files are read, weights only (``torch.load(weights_only=True)``, or
safetensors):

- torchvision's ImageNet VGG16 (``vgg16-397923af.pth``): its ``features.*`` tensors are loaded strictly (the
  ``classifier.*`` ones are not used);
- lpips' v0.1 heads for VGG (``lpips/weights/v0.1/vgg.pth``): ``lin0.model.1.weight`` … ``lin4.model.1.weight``.

The distance of images x, y in [0, 1] (mapped to [−1, 1]): both are shifted and scaled channel-wise
((v − shift)/scale, shift (−0.030, −0.088, −0.188), scale (0.458, 0.448, 0.450)), the VGG activations after
relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 are unit-normalised over channels (eps 1e-10), and the squared
differences are weighted per channel by head l (a 1×1 convolution to one channel), averaged over positions and
summed over the five layers. Dropout, part of the heads in training, is not applied.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import UserError

#: VGG16 ("D") convolution widths, "M" a 2×2 max-pool: torchvision's layer order, so features.<index> match
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
#: features index after which each tapped ReLU sits (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
WEIGHTS_HELP = (
    "LPIPS needs torchvision's VGG16 ImageNet weights (vgg16-397923af.pth) and the lpips v0.1 VGG heads "
    "(lpips/weights/v0.1/vgg.pth)"
)


def vgg16_features() -> nn.Sequential:
    """The convolutional part of VGG16 as torchvision numbers it (conv3×3 pad 1, ReLU, 2×2 max-pools)."""
    layers: list[nn.Module] = []
    channels = 3
    for width in VGG16:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(width), 3, padding=1), nn.ReLU(inplace=False)]
            channels = int(width)
    return nn.Sequential(*layers)


class _Head(nn.Module):
    """lpips' NetLinLayer: ``model`` = [Dropout, 1×1 conv to one channel without bias] (only the conv runs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model[1](x)


class LPIPS(nn.Module):
    """LPIPS distance ``[B]`` of image batches ``[B,3,H,W]`` in [0, 1]; differentiable, frozen weights."""

    def __init__(self) -> None:
        super().__init__()
        self.vgg = nn.Module()
        self.vgg.features = vgg16_features()
        for i, c in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _Head(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @classmethod
    def from_files(cls, vgg_path: str | Path, heads_path: str | Path) -> "LPIPS":
        """Load torchvision's VGG16 file (its ``features.*``) and the lpips v0.1 VGG heads, both strictly."""
        model = cls()
        vgg = _read_state(vgg_path, "VGG16")
        features = {k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}
        _load_strict(model.vgg.features, features, vgg_path, "torchvision's vgg16 features.")
        heads = _read_state(heads_path, "lpips heads")
        _load_strict(nn.ModuleList([getattr(model, f"lin{i}") for i in range(5)]),
                     {_head_key(k): v for k, v in heads.items()}, heads_path, "lpips v0.1 lin")
        return model

    def features(self, x: Tensor) -> list[Tensor]:
        """The unit-normalised relu1_2 … relu5_3 activations of images in [0, 1]."""
        h = ((x * 2 - 1) - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.vgg.features[: TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                taps.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
            raise ValueError(f"expected two RGB batches [B,3,H,W] of one shape, got {shapes}")
        total = x.new_zeros(x.shape[0])
        for i, (a, b) in enumerate(zip(self.features(x), self.features(y))):
            total = total + getattr(self, f"lin{i}")((a - b).square()).mean(dim=(1, 2, 3))
        return total


def _head_key(key: str) -> str:
    """``lin3.model.1.weight`` → ``3.model.1.weight`` (the heads as a ModuleList)."""
    return key.removeprefix("lin") if key.startswith("lin") else key


def _read_state(path: str | Path, what: str) -> dict[str, Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{WEIGHTS_HELP}: {what} file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors failures all mean: not a weights file
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"{path} is not a readable {what} weights file ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors; {WEIGHTS_HELP}")
    return state


def _load_strict(module: nn.Module, state: dict[str, Tensor], path: str | Path, names: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing {names}{missing[0]}" if missing else f"unexpected {names}{unexpected[0]}"
        raise UserError(f"{path} does not hold the expected tensors ({what}); {WEIGHTS_HELP}")
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"{path}: {names}{k} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
