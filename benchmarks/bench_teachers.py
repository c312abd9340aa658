"""Time per network call of each real-size teacher UNet, with random weights (no downloads).

One call is what the SIR refiner asks for at every guided sampling step: a classifier-free-guided batch
(both halves in one forward pass) at 32² latents (256² images).

- ``zero123``: the Zero123 UNet (spec §1.2, 8 input channels, 1-token context), B = 6 views → batch 12;
- ``mvdream``: the multi-view UNet (spec §2.2), 4 views with text context → batch 8;
- ``imagedream``: with the image-prompt layers (spec §3.1), 4 + 1 reference frames → batch 10;
- ``zero123plus``: one guided step of the Zero123++ v1.1 generator (spec §4): the reference pass on the
  condition latent (64², batch 2) then the sample pass on the 3×2 grid of six views (120×80 latents, batch 2)
  whose self-attention also reads the reference tokens. Not an SIR teacher: its 28 steps make one grid.

fp32 on the CPU, fp16 on CUDA (``--dtype`` overrides); on CUDA the peak allocated memory is printed too.
The FLOPs of one call (torch's counter, on the meta device) give the throughput reached, to compare devices.
Not a test: it prints numbers.

    python benchmarks/bench_teachers.py [--device cpu|cuda] [--only mvdream ...] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from microdreamer.pipeline import resolve_device
from microdreamer.teachers.loading import resolve_dtype
from microdreamer.teachers.mv_unet import MultiViewUNet, MultiViewUNetConfig

LATENT = 32
#: unet/config.json of ashawkey/mvdream-sd2.1-diffusers (spec §2.2); ImageDream adds ip_dim 16 (§3.1)
MVDREAM_UNET = {
    "image_size": LATENT, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": 2,
    "attention_resolutions": [4, 2, 1], "channel_mult": [1, 2, 4, 4], "num_head_channels": 64,
    "context_dim": 1024, "transformer_depth": 1, "camera_dim": 16,
}
#: the Zero123 UNet2DConditionModel config (spec §1.2)
ZERO123_UNET = {
    "sample_size": LATENT, "in_channels": 8, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

#: the Zero123++ v1.1 UNet: SD-2 (768-v) layout, linear projections, 1024-d context (spec §4.1)
ZERO123PLUS_UNET = {
    "sample_size": 96, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
}

Call = Callable[[], Tensor]


def randomize(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Materialise a meta-device model with seeded weights ~ N(0, 1/fan_in), unit norm scales, small biases
    (on the meta device itself it stays empty: enough to count FLOPs)."""
    if device.type == "meta":
        return model.eval().requires_grad_(False)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    # torch's own cast: diffusers' ModelMixin.to warns on every dtype cast
    return nn.Module.to(model, dtype=dtype).eval().requires_grad_(False)


def _randn(g: torch.Generator | None, device: torch.device, dtype: torch.dtype, *shape: int) -> Tensor:
    if g is None:  # meta device
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=g, device=device).to(dtype)


def _generator(device: torch.device) -> torch.Generator | None:
    return None if device.type == "meta" else torch.Generator(device=device).manual_seed(1)


def tflop_per_call(name: str) -> float:
    """Floating-point operations of one call (torch's FLOP counter on the meta device: no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    call, _ = BUILDERS[name](torch.device("meta"), torch.float32)
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops() / 1e12


def zero123_call(device: torch.device, dtype: torch.dtype, views: int = 6) -> tuple[Call, int]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ZERO123_UNET)
    unet = randomize(unet, device, dtype)
    g = _generator(device)
    n = 2 * views  # [cond ; uncond]
    x = _randn(g, device, dtype, n, 8, LATENT, LATENT)
    context = _randn(g, device, dtype, n, 1, 768)
    t = torch.full((n,), 501, device=device)
    return (lambda: unet(x, t, encoder_hidden_states=context).sample), _params(unet)


def zero123plus_call(device: torch.device, dtype: torch.dtype) -> tuple[Call, int]:
    from diffusers import UNet2DConditionModel

    from microdreamer.generators.reference_attention import install_reference_attention, reference_call

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ZERO123PLUS_UNET)
    unet = randomize(unet, device, dtype)
    bank = install_reference_attention(unet)
    g = _generator(device)
    reference = _randn(g, device, dtype, 2, 4, 64, 64)  # [negative ; condition] latents of the 512² input
    sample = _randn(g, device, dtype, 2, 4, 120, 80)  # [uncond ; cond] grid of six 320² views
    context = _randn(g, device, dtype, 2, 77, 1024)
    t = torch.full((2,), 999.0, device=device)

    return (lambda: reference_call(unet, bank, sample, t, context, reference, t)), _params(unet)


def multiview_call(device: torch.device, dtype: torch.dtype, image_prompt: bool) -> tuple[Call, int]:
    config = MultiViewUNetConfig.from_dict({**MVDREAM_UNET, **({"ip_dim": 16} if image_prompt else {})})
    with torch.device("meta"):
        unet = MultiViewUNet(config)
    unet = randomize(unet, device, dtype)
    g = _generator(device)
    frames = 5 if image_prompt else 4
    n = 2 * frames  # [uncond ; cond], one object each
    inputs = {
        "x": _randn(g, device, dtype, n, 4, LATENT, LATENT),
        "timesteps": torch.full((n,), 501, device=device),
        "context": _randn(g, device, dtype, n, 77, 1024),
        "camera": _randn(g, device, dtype, n, 16),
        "num_frames": frames,
    }
    if image_prompt:
        inputs["ip"] = _randn(g, device, dtype, n, 257, 1280)
        inputs["ip_img"] = _randn(g, device, dtype, 2, 4, LATENT, LATENT)
    return (lambda: unet(**inputs)), _params(unet)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


BUILDERS = {
    "zero123": lambda d, t: zero123_call(d, t),
    "mvdream": lambda d, t: multiview_call(d, t, image_prompt=False),
    "imagedream": lambda d, t: multiview_call(d, t, image_prompt=True),
    "zero123plus": zero123plus_call,
}
#: batch of one guided call: (views rendered, frames through the UNet)
BATCH = {"zero123": (6, 12), "mvdream": (4, 8), "imagedream": (4, 10), "zero123plus": (6, 4)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    call, params = BUILDERS[name](device, dtype)
    build = time.perf_counter() - start
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            out = call()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    if not torch.isfinite(out.float()).all():
        raise RuntimeError(f"{name}: non-finite output")
    views, frames = BATCH[name]
    tflop = tflop_per_call(name)
    row = {
        "teacher": name,
        "params_m": round(params / 1e6, 1),
        "views": views,
        "unet_batch": frames,
        "dtype": str(dtype).removeprefix("torch."),
        "s_per_call_mean": round(sum(times) / len(times), 3),
        "s_per_call_min": round(min(times), 3),
        "tflop_per_call": round(tflop, 3),
        "tflop_per_s": round(tflop / min(times), 2),
        "repeats": repeats,
        "build_s": round(build, 1),
    }
    if device.type == "cuda":
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del call
    return row


def add_run_options(parser: argparse.ArgumentParser, cpu_repeats: int) -> None:
    """--device, --dtype, --repeats, --warmup and --json, as every network benchmark takes them."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 elsewhere), fp16, bf16, fp32")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed calls (default: 10 on CUDA, {cpu_repeats} on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3 on CUDA, 0 on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def run_settings(args: argparse.Namespace, cpu_repeats: int) -> tuple[torch.device, torch.dtype, int, int]:
    """Device, dtype, repeats and warmup from :func:`add_run_options`' options; prints the device line."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (10 if cuda else cpu_repeats)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    info = f"{torch.cuda.get_device_name(device)}" if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# device {device} ({info}), torch {torch.__version__}")
    return device, dtype, repeats, warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(BUILDERS), choices=list(BUILDERS))
    add_run_options(parser, cpu_repeats=1)
    args = parser.parse_args()
    device, dtype, repeats, warmup = run_settings(args, cpu_repeats=1)
    rows = []
    for name in args.only:
        row = bench(name, device, dtype, repeats, warmup)
        rows.append(row)
        print(json.dumps(row))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
