"""The LGM network (Large Multi-View Gaussian Model, Tang et al. 2024; geco spec §2.7), in plain PyTorch.

An asymmetric U-Net over the input views of one object (4 for the published weights). Each view enters as
9 channels (RGB and its Plücker ray embedding) and leaves as a *splatter image*: 14 raw Gaussian parameters
per pixel of a ``splat_size`` map (the decoder stops before the input resolution). Views are processed as a
batch, except in the attention layers, which attend jointly over the tokens of all views of an object. No
weight depends on the number of views, so the network also runs on other counts (GECO Stage II can feed it
all six Zero123++ views); LGM itself hard-codes four.

Module and parameter names follow the published ``ashawkey/LGM`` safetensors exactly (376 tensors,
415,042,848 parameters for the "big" configuration), so those files load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: views per object of the published network (LGM's ``MVAttention`` hard-codes four)
NUM_VIEWS = 4
#: per-view input channels: RGB + Plücker embedding (o×d, d)
IN_CHANNELS = 9
#: per-pixel outputs: position 3, opacity 1, scale 3, rotation 4, colour 3
OUT_CHANNELS = 14
ATTENTION_HEADS = 16
NORM_GROUPS = 32
#: every residual sum (ResNet blocks and attention) is multiplied by this
SKIP_SCALE = math.sqrt(0.5)


@dataclass(frozen=True)
class LGMConfig:
    """U-Net shape (LGM ``core/options.py``). The defaults are "big", the configuration of every
    published checkpoint; :meth:`small` is LGM's default one. ``*_attention[i]`` puts multi-view
    attention after every ResNet layer of block ``i``."""

    input_size: int = 256
    down_channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 1024)
    down_attention: tuple[bool, ...] = (False, False, False, True, True, True)
    mid_attention: bool = True
    up_channels: tuple[int, ...] = (1024, 1024, 512, 256, 128)
    up_attention: tuple[bool, ...] = (True, True, True, False, False)
    layers_per_block: int = 2  # ResNet layers per down block; up blocks have one more
    fovy: float = 49.1  # degrees, of the input cameras
    cam_radius: float = 1.5  # distance of the input cameras from the origin

    def __post_init__(self) -> None:
        if len(self.down_attention) != len(self.down_channels) or len(self.up_attention) != len(self.up_channels):
            raise ValueError("LGMConfig needs one attention flag per down and per up block")
        if not 1 <= len(self.up_channels) <= len(self.down_channels):
            raise ValueError("LGMConfig needs between 1 and len(down_channels) up blocks")
        if any(c % NORM_GROUPS for c in (*self.down_channels, *self.up_channels)):
            raise ValueError(f"LGMConfig channels must be multiples of {NORM_GROUPS} (GroupNorm groups)")
        if self.input_size % 2 ** (len(self.down_channels) - 1):
            raise ValueError(f"input_size {self.input_size} does not survive {len(self.down_channels) - 1} halvings")

    @classmethod
    def small(cls) -> "LGMConfig":
        """LGM's default configuration: one up block fewer, 64² splatter images."""
        return cls(up_channels=(1024, 1024, 512, 256), up_attention=(True, True, True, False))

    @property
    def splat_size(self) -> int:
        """Side of each view's splatter image: halved by every down block but the last, doubled by
        every up block but the last (128 for "big", 64 for "small")."""
        return self.input_size // 2 ** (len(self.down_channels) - 1) * 2 ** (len(self.up_channels) - 1)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice; plus the input (1×1 conv when channels change), times √½."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(NORM_GROUPS, in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(NORM_GROUPS, out_channels, eps=1e-5)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (h + self.shortcut(x)) * SKIP_SCALE


class SelfAttention(nn.Module):
    """Multi-head self-attention: one bias-free linear to q, k, v (in that order, heads contiguous
    within each), scaled dot-product softmax, a linear projection with bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [n, heads, length, d]
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class MVAttention(nn.Module):
    """GroupNorm, then self-attention over the tokens of all views of an object (view-major, then
    row, column), plus the input, times √½. Input ``[B·V, C, H, W]`` with each object's ``views`` = V
    views contiguous."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(NORM_GROUPS, dim, eps=1e-5)
        self.attn = SelfAttention(dim, ATTENTION_HEADS)

    def forward(self, x: Tensor, views: int = NUM_VIEWS) -> Tensor:
        bv, c, h, w = x.shape
        b = bv // views
        tokens = self.norm(x).reshape(b, views, c, h * w).permute(0, 1, 3, 2).reshape(b, views * h * w, c)
        out = self.attn(tokens).reshape(b, views, h * w, c).permute(0, 1, 3, 2).reshape(bv, c, h, w)
        return (out + x) * SKIP_SCALE


def _attention_layers(attention: bool, dim: int, count: int) -> nn.ModuleList | None:
    return nn.ModuleList(MVAttention(dim) for _ in range(count)) if attention else None


class DownBlock(nn.Module):
    """ResNet layers (each followed by attention when enabled), then an optional stride-2 3×3 conv.
    Every layer's output, and the downsampled one, is kept for the decoder's skip connections."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, attention: bool, downsample: bool) -> None:
        super().__init__()
        self.nets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels)
                                  for i in range(layers))
        self.attns = _attention_layers(attention, out_channels, layers)
        self.downsample = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: Tensor, skips: list[Tensor], views: int) -> Tensor:
        for i, net in enumerate(self.nets):
            x = net(x)
            if self.attns is not None:
                x = self.attns[i](x, views)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """ResNet → attention → ResNet at the lowest resolution."""

    def __init__(self, channels: int, attention: bool) -> None:
        super().__init__()
        self.nets = nn.ModuleList([ResnetBlock(channels, channels), ResnetBlock(channels, channels)])
        self.attns = _attention_layers(attention, channels, 1)

    def forward(self, x: Tensor, views: int) -> Tensor:
        x = self.nets[0](x)
        if self.attns is not None:
            x = self.attns[0](x, views)
        return self.nets[1](x)


class UpBlock(nn.Module):
    """ResNet layers over [x, next skip] (each followed by attention when enabled), then an optional
    nearest ×2 upsampling and 3×3 conv. ``skip_channels`` lists the channels of the skips in the
    order they are consumed."""

    def __init__(self, in_channels: int, skip_channels: list[int], out_channels: int, attention: bool,
                 upsample: bool) -> None:
        super().__init__()
        self.nets = nn.ModuleList(ResnetBlock((in_channels if i == 0 else out_channels) + skip, out_channels)
                                  for i, skip in enumerate(skip_channels))
        self.attns = _attention_layers(attention, out_channels, len(skip_channels))
        self.upsample = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], views: int) -> Tensor:
        for i, net in enumerate(self.nets):
            x = net(torch.cat([x, skips.pop()], dim=1))
            if self.attns is not None:
                x = self.attns[i](x, views)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class UNet(nn.Module):
    """conv_in → down blocks → mid block → up blocks (each consuming ``layers_per_block + 1`` skips,
    latest first) → GroupNorm → SiLU → conv_out. Skips the up blocks do not reach stay unused."""

    def __init__(self, config: LGMConfig) -> None:
        super().__init__()
        down, up = config.down_channels, config.up_channels
        self.conv_in = nn.Conv2d(IN_CHANNELS, down[0], 3, padding=1)
        skips = [down[0]]
        blocks, channels = [], down[0]
        for i, (out, attention) in enumerate(zip(down, config.down_attention)):
            last = i == len(down) - 1
            blocks.append(DownBlock(channels, out, config.layers_per_block, attention, downsample=not last))
            skips += [out] * (config.layers_per_block + (0 if last else 1))
            channels = out
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(channels, config.mid_attention)
        blocks = []
        for i, (out, attention) in enumerate(zip(up, config.up_attention)):
            used = [skips.pop() for _ in range(config.layers_per_block + 1)]
            blocks.append(UpBlock(channels, used, out, attention, upsample=i != len(up) - 1))
            channels = out
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(NORM_GROUPS, channels, eps=1e-5)
        self.conv_out = nn.Conv2d(channels, OUT_CHANNELS, 3, padding=1)

    def forward(self, x: Tensor, views: int = NUM_VIEWS) -> Tensor:
        """``x [B·views, 9, S, S]``, each object's views contiguous."""
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, skips, views)
        x = self.mid_block(x, views)
        for block in self.up_blocks:
            x = block(x, skips, views)
        return self.conv_out(F.silu(self.norm_out(x)))


class LGMNetwork(nn.Module):
    """``[B, V, 9, S, S]`` views with rays → raw splatter images ``[B, V, 14, s, s]`` (U-Net, then a 1×1
    conv); V = 4 for the published weights."""

    def __init__(self, config: LGMConfig = LGMConfig()) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet(config)
        self.conv = nn.Conv2d(OUT_CHANNELS, OUT_CHANNELS, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, v, c, h, w = x.shape
        if v < 1 or c != IN_CHANNELS or h != w or h != self.config.input_size:
            size = self.config.input_size
            raise ValueError(f"LGM takes [B, V, {IN_CHANNELS}, {size}, {size}] inputs, got {list(x.shape)}")
        out = self.conv(self.unet(x.reshape(b * v, c, h, w), v))
        return out.reshape(b, v, OUT_CHANNELS, *out.shape[-2:])
