"""The multi-view UNet of MVDream and ImageDream (spec §2.3–2.4, §3.3–3.5), in plain PyTorch.

A Stable Diffusion 2.1 UNet whose self-attention runs jointly over the F views of one object, with a
camera embedding added to the timestep embedding. The ImageDream variant (``ip_dim > 0``) adds a
Perceiver resampler that turns CLIP image features into ``ip_dim`` extra context tokens, decoupled
image cross-attention (``to_k_ip``/``to_v_ip``) and a reference frame: the last view of every object
is replaced by the reference latent before anything else runs.

Module and parameter names follow the checkpoints ``ashawkey/mvdream-sd2.1-diffusers`` and
``ashawkey/imagedream-ipmv-diffusers`` exactly, so their ``unet/`` weights load strictly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .loading import load_module, read_json, weights_file

#: config.json keys that do not change the network (diffusers metadata start with "_")
_IGNORED_KEYS = frozenset({"use_checkpoint"})


@dataclass(frozen=True)
class MultiViewUNetConfig:
    """Constructor arguments, named as in the checkpoint's ``unet/config.json`` (spec §2.2, §3.1)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a transformer
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_head_channels: int = 64
    context_dim: int = 1024
    transformer_depth: int = 1
    camera_dim: int = 16
    ip_dim: int = 0  # image-prompt tokens: 0 = MVDream, 16 = ImageDream
    ip_weight: float = 1.0
    image_size: int = 32  # recorded by the checkpoint, unused
    # ImageDream resampler (fixed in the checkpoints; smaller only in tests)
    ip_embedding_dim: int = 1280
    ip_resampler_depth: int = 4
    ip_resampler_heads: int = 12
    ip_resampler_head_dim: int = 64

    @classmethod
    def from_dict(cls, values: dict) -> "MultiViewUNetConfig":
        """Build from ``config.json`` contents; unknown keys are an error (metadata ``_*`` is skipped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if not k.startswith("_") and k not in _IGNORED_KEYS}
        unknown = sorted(set(kept) - names)
        if unknown:
            raise UserError(f"multi-view UNet config has unknown keys {unknown}; expected a subset of {sorted(names)}")
        for key in ("attention_resolutions", "channel_mult"):
            if key in kept:
                kept[key] = tuple(kept[key])
        return cls(**kept)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[N, dim]`` in **[cos, sin]** order, frequencies exp(−ln(max_period)·i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _at_least_float32(x: Tensor) -> Tensor:
    """fp16/bf16 upcast to float32 (as in the original LDM code); float32 and float64 kept as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 whatever the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(_at_least_float32(x)).type(x.dtype)


class ResBlock(nn.Module):
    """Two 3×3 convolutions with the (time + camera) embedding added as a per-channel bias."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(32, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        # index 2 is the (inference-time no-op) dropout slot of the checkpoint layout
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _heads(x: Tensor, heads: int) -> Tensor:
    """``[N, L, heads·d]`` → ``[N, heads, L, d]``."""
    n, length, _ = x.shape
    return x.view(n, length, heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


class Attention(nn.Module):
    """Multi-head (cross-)attention; with ``ip_dim > 0`` the last ``ip_dim`` context tokens are image
    tokens attended separately through ``to_k_ip``/``to_v_ip`` and added with weight ``ip_weight``."""

    def __init__(
        self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, ip_dim: int = 0, ip_weight: float = 1.0
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads, self.ip_dim, self.ip_weight = heads, ip_dim, ip_weight
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        if ip_dim > 0:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = _heads(self.to_q(x), self.heads)
        text = context[:, : context.shape[1] - self.ip_dim]
        out = F.scaled_dot_product_attention(q, _heads(self.to_k(text), self.heads), _heads(self.to_v(text), self.heads))
        if self.ip_dim > 0:
            image = context[:, -self.ip_dim :]
            k_ip, v_ip = _heads(self.to_k_ip(image), self.heads), _heads(self.to_v_ip(image), self.heads)
            out = out + self.ip_weight * F.scaled_dot_product_attention(q, k_ip, v_ip)
        return self.to_out(_merge_heads(out))


class GEGLU(nn.Module):
    """Linear to 2·inner, then value · GELU(gate) with the value half first."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # index 1 is the (no-op) dropout slot of the checkpoint layout
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock3D(nn.Module):
    """Self-attention jointly over all views' tokens, then per-view cross-attention and a GEGLU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, ip_dim: int, ip_weight: float) -> None:
        super().__init__()
        self.attn1 = Attention(dim, None, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, ip_dim, ip_weight)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        n, length, c = x.shape
        joint = x.reshape(n // num_frames, num_frames * length, c)  # (b f) l c -> b (f l) c
        x = (self.attn1(self.norm1(joint)) + joint).reshape(n, length, c)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer3D(nn.Module):
    """GroupNorm → tokens → linear in → transformer blocks → linear out → residual."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, depth: int, ip_dim: int,
                 ip_weight: float) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, heads * head_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock3D(heads * head_dim, heads, head_dim, context_dim, ip_dim, ip_weight)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(heads * head_dim, channels)

    def forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        n, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context, num_frames)
        return self.proj_out(tokens).transpose(1, 2).reshape(n, c, h, w) + x


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose members take what they need: embedding (ResBlock), context (transformer) or neither."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer3D):
                x = layer(x, context, num_frames)
            else:
                x = layer(x)
        return x


class PerceiverAttention(nn.Module):
    """Learned queries attend to the image features concatenated with themselves (softmax in at least fp32)."""

    def __init__(self, dim: int, head_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, features: Tensor, queries: Tensor) -> Tensor:
        features, queries = self.norm1(features), self.norm2(queries)
        q = _heads(self.to_q(queries), self.heads)
        k, v = self.to_kv(torch.cat([features, queries], dim=1)).chunk(2, dim=-1)
        k, v = _heads(k, self.heads), _heads(v, self.heads)
        out = F.scaled_dot_product_attention(_at_least_float32(q), _at_least_float32(k), _at_least_float32(v)).to(q.dtype)
        return self.to_out(_merge_heads(out))


class Resampler(nn.Module):
    """IP-Adapter-Plus style Perceiver: CLIP image features ``[N, L, E]`` → ``[N, num_queries, output_dim]``."""

    def __init__(self, dim: int, depth: int, head_dim: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))  # learned queries, from the checkpoint
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, head_dim, heads),
                nn.Sequential(
                    nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                    nn.Linear(ff_mult * dim, dim, bias=False),
                ),
            ])
            for _ in range(depth)
        )

    def forward(self, features: Tensor) -> Tensor:
        x = self.proj_in(features)
        queries = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            queries = attn(x, queries) + queries
            queries = ff(queries) + queries
        return self.norm_out(self.proj_out(queries))


class MultiViewUNet(nn.Module):
    """Epsilon prediction for ``B·F`` latents, the F views of each object contiguous (spec §2.4)."""

    def __init__(self, config: MultiViewUNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.camera_embed = nn.Sequential(nn.Linear(cfg.camera_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.ip_dim > 0:
            self.image_embed = Resampler(
                dim=cfg.context_dim, depth=cfg.ip_resampler_depth, head_dim=cfg.ip_resampler_head_dim,
                heads=cfg.ip_resampler_heads, num_queries=cfg.ip_dim, embedding_dim=cfg.ip_embedding_dim,
                output_dim=cfg.context_dim,
            )

        def transformer(ch: int) -> SpatialTransformer3D:
            return SpatialTransformer3D(ch, ch // cfg.num_head_channels, cfg.num_head_channels, cfg.context_dim,
                                        cfg.transformer_depth, cfg.ip_dim, cfg.ip_weight)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * mc, emb_dim)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, emb_dim), transformer(ch), ResBlock(ch, ch, emb_dim)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * mc, emb_dim)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        camera: Tensor | None = None,
        num_frames: int = 1,
        ip: Tensor | None = None,
        ip_img: Tensor | None = None,
    ) -> Tensor:
        """Epsilon ``[B·F, C, h, w]``.

        x ``[B·F, C, h, w]``; timesteps ``[B·F]``; context ``[B·F, 77, context_dim]`` text tokens;
        camera ``[B·F, camera_dim]`` (spec §2.7) or None; ImageDream only: ``ip`` CLIP image features
        ``[B·F, 257, ip_embedding_dim]`` and ``ip_img`` reference latents ``[B, C, h, w]`` that replace
        the last view of every object (whatever ``x`` holds there is ignored).
        """
        n = x.shape[0]
        if n % num_frames:
            raise ValueError(f"batch {n} is not a multiple of num_frames {num_frames}")
        emb = self.time_embed(timestep_embedding(timesteps.reshape(-1).expand(n), self.config.model_channels).to(x.dtype))
        if camera is not None:
            emb = emb + self.camera_embed(camera.to(emb.dtype))
        if self.config.ip_dim > 0:
            if ip is None or ip_img is None:
                raise ValueError("the ImageDream UNet needs both ip (image features) and ip_img (reference latents)")
            views = x.reshape(n // num_frames, num_frames, *x.shape[1:])
            x = torch.cat([views[:, :-1], ip_img.to(x.dtype)[:, None]], dim=1).reshape(x.shape)
            context = torch.cat([context, self.image_embed(ip.to(x.dtype))], dim=1)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)
        return self.out(h)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> "MultiViewUNet":
        """Load a checkpoint's ``unet/`` folder (``config.json`` + safetensors weights), strictly."""
        folder = Path(folder)
        config = MultiViewUNetConfig.from_dict(read_json(folder / "config.json"))
        return load_module(lambda: cls(config), weights_file(folder), device=device, dtype=dtype)
