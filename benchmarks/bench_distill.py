"""GECO Stage I at real size with random weights: time per network call and the memory of a full step.

A Stage I step (global batch 1, :mod:`microdreamer.distill.stage1`) runs the Zero123++ v1.1 UNet (865.9 M
parameters, spec teachers.md §4.1) as three networks, each call being a reference-attention call (the write
pass on the 64² condition latent, then the read pass on the 120 × 80 latents of the 3 × 2 grid):

- generator: forward and backward, guided (both halves) → 2 forward+backward units;
- teacher, guided, and student, unguided, at x_t, no gradients → 3 forward units;
- student update: forward and backward, unguided → 1 forward+backward unit.

This script times the two units at batch 1 (``forward`` without gradients, ``forward+backward``) on one
UNet at a time, measures the activations a backward pass keeps (the bytes of the distinct non-parameter
storages autograd saves, float32), counts FLOPs (torch's counter on the meta device), and adds up the memory
of a full step: the weights of all three UNets (float32, as the trainer keeps them), the generator's and the
student's gradients and Adam moments, the frozen VAE and CLIP vision encoder, and the activations of the
larger backward pass. It does not run a full step.

A Stage II step (:mod:`microdreamer.distill.stage2`, the README's defaults: batch 1, LGM "big" on views
0, 1, 3, 4, 8 renders of 256², λ = 1) trains the generator and LGM end to end: generator (guided, both
halves) → the frozen VAE decoder (gradients pass through it) → LGM → renders → MSE + LPIPS (frozen VGG16).
Its memory is estimated on the meta device (no weights, no compute): the saved activations of each part's
forward pass with gradients (the distinct non-parameter storages autograd keeps, float32), plus the
weights, gradients and Adam moments of generator and LGM and the frozen VAE, vision encoder and VGG16. The
rasteriser's own buffers (backend-specific) are not counted.

    python benchmarks/bench_distill.py [--device cpu|cuda] [--view-size 320] [--repeats 1] [--no-backward] [--json F]
    python benchmarks/bench_distill.py --stage2-memory [--view-size 320]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor

from bench_teachers import ZERO123PLUS_UNET, randomize
from microdreamer.generators.reference_attention import install_reference_attention, reference_call
from microdreamer.pipeline import resolve_device

#: parameters of the frozen parts (spec teachers.md §4.1): the SD VAE (encoder used) and the OpenCLIP ViT-H/14
#: vision tower with its projection; the text encoder runs once and is not kept
FROZEN_PARAMS = {"vae": 83.65e6, "vision_encoder": 632.1e6}
GIB = 2**30
#: units per Stage I step (see the module docstring)
STEP_UNITS = {"forward": 3, "forward_backward": 3}


def build(device: torch.device):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ZERO123PLUS_UNET)
    unet = randomize(unet, device, torch.float32)
    return unet, install_reference_attention(unet)


def inputs(device: torch.device, view_size: int, reference_size: int = 512) -> tuple[Tensor, ...]:
    g = None if device.type == "meta" else torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=g, device=device)  # noqa: E731
    f = 8  # the SD VAE's downsampling
    return (randn(1, 4, 3 * view_size // f, 2 * view_size // f), torch.full((1,), 999.0, device=device),
            randn(1, 77, 1024), randn(1, 4, reference_size // f, reference_size // f), torch.zeros(1, device=device))


def forward_tflop(view_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    unet, bank = build(torch.device("meta"))
    sample, t, context, reference, t_ref = inputs(torch.device("meta"), view_size)
    with FlopCounterMode(display=False) as counter:
        reference_call(unet, bank, sample, t, context, reference, t_ref)
    return counter.get_total_flops() / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(device: torch.device, view_size: int, repeats: int, backward: bool) -> dict:
    unet, bank = build(device)
    params = sum(p.numel() for p in unet.parameters())
    args = inputs(device, view_size)
    result: dict = {"device": str(device), "view_size": view_size, "unet_params": params,
                    "forward_tflop": forward_tflop(view_size)}
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            reference_call(unet, bank, *args)
            _sync(device)
            times.append(time.perf_counter() - start)
    result["forward_s"] = min(times)
    if backward:
        unet.requires_grad_(True)
        weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
        saved: dict[int, int] = {}

        def keep(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        times = []
        for _ in range(repeats):
            saved.clear()
            _sync(device)
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                out = reference_call(unet, bank, *args)
            out.float().square().mean().backward()
            _sync(device)
            times.append(time.perf_counter() - start)
            unet.zero_grad(set_to_none=True)
        result["forward_backward_s"] = min(times)
        result["activations_gib"] = sum(saved.values()) / GIB
    return result


def step_memory(params: int, activations_gib: float) -> dict[str, float]:
    """GiB held at the peak of a Stage I step (the generator's backward, guided: twice the unit's
    activations) with float32 weights and Adam state."""
    weight = 4 * params / GIB
    memory = {
        "weights (generator, student, teacher)": 3 * weight,
        "adam moments (generator, student)": 2 * 2 * weight,
        "gradients (generator)": weight,
        "frozen vae + vision encoder": 4 * sum(FROZEN_PARAMS.values()) / GIB,
        "activations (generator backward, 2 halves)": 2 * activations_gib,
    }
    memory["total"] = sum(memory.values())
    return memory


#: the SD VAE of Zero123++ v1.1 (diffusers AutoencoderKL, 4 latent channels, factor 8)
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
          "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32}
#: torchvision's VGG16 features (LPIPS' trunk; the classifier is not loaded)
VGG16_FEATURE_PARAMS = 14.71e6


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None) -> Tensor:
    """Scaled dot-product attention by the fused (flash) kernel, whose meta implementation saves what the CPU
    and GPU kernels save (output and log-sum-exp); the meta device's default, the math path, would also
    save the N × N probabilities (3.6× the generator's activations)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def saved_activations_gib(model: torch.nn.Module, forward: Callable[[], Tensor]) -> float:
    """GiB of the distinct non-parameter storages autograd saves while ``forward`` runs on the meta device
    (storages told apart by identity, not by address; attention as the fused kernels save it)."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    with (torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
          mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention)):
        forward()
    return sum(saved.values()) / GIB


def stage2_memory(view_size: int, lgm_views: int = 4, renders: int = 8, render_size: int = 256) -> dict[str, float]:
    """GiB held at the peak of a Stage II step (end of the forward pass, batch 1) at the README's defaults,
    counted on the meta device."""
    from diffusers import AutoencoderKL

    from microdreamer.metrics_lpips import LPIPS
    from microdreamer.reconstructors.lgm_unet import IN_CHANNELS, LGMConfig, LGMNetwork

    meta = torch.device("meta")
    unet, bank = build(meta)
    unet.requires_grad_(True)
    sample, t, context, reference, t_ref = inputs(meta, view_size)
    sample.requires_grad_(True)
    generator = 2 * saved_activations_gib(unet, lambda: reference_call(unet, bank, sample, t, context, reference, t_ref))
    with meta:
        vae = AutoencoderKL(**SD_VAE).requires_grad_(False)
        lgm = LGMNetwork(LGMConfig())
        lpips = LPIPS().requires_grad_(False)
        latents = torch.randn(1, 4, 3 * view_size // 8, 2 * view_size // 8, requires_grad=True)
        x = torch.randn(1, lgm_views, IN_CHANNELS, 256, 256, requires_grad=True)
        made = torch.randn(renders, 3, render_size, render_size, requires_grad=True)
        target = torch.randn(renders, 3, render_size, render_size)
    decoder = saved_activations_gib(vae, lambda: vae.decode(latents).sample)
    reconstructor = saved_activations_gib(lgm, lambda: lgm(x))
    lpips_gib = saved_activations_gib(lpips, lambda: lpips(made, target))
    params = {"generator": sum(p.numel() for p in unet.parameters()), "lgm": sum(p.numel() for p in lgm.parameters())}
    trained = 4 * (params["generator"] + params["lgm"]) / GIB
    frozen = 4 * (sum(p.numel() for p in vae.parameters()) + FROZEN_PARAMS["vision_encoder"] + VGG16_FEATURE_PARAMS)
    memory = {
        f"weights (generator {params['generator'] / 1e6:.0f} M, LGM {params['lgm'] / 1e6:.0f} M)": trained,
        "adam moments (generator, LGM)": 2 * trained,
        "gradients (generator, LGM)": trained,
        "frozen vae + vision encoder + vgg16": frozen / GIB,
        "activations: generator (2 halves)": generator,
        f"activations: vae decoder ({3 * view_size}x{2 * view_size})": decoder,
        f"activations: LGM big ({lgm_views} views)": reconstructor,
        f"activations: LPIPS VGG16 ({renders} renders of {render_size}²)": lpips_gib,
    }
    memory["total"] = sum(memory.values())
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--view-size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument("--stage2-memory", action="store_true",
                        help="only the memory of a Stage II step, counted on the meta device")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.stage2_memory:
        memory = stage2_memory(args.view_size)
        print(f"memory of a full Stage II step (GiB), views {args.view_size}², meta device:")
        for what, gib in memory.items():
            print(f"    {what:52s} {gib:7.2f}")
        if args.json:
            args.json.write_text(json.dumps({"view_size": args.view_size, "stage2_memory_gib": memory}, indent=2))
        return
    device = resolve_device(args.device)
    result = bench(device, args.view_size, args.repeats, not args.no_backward)
    print(f"Zero123++ UNet, {result['unet_params'] / 1e6:.1f} M parameters, {device}, views {args.view_size}²: "
          f"{result['forward_tflop']:.2f} TFLOP per forward unit")
    print(f"  forward (no gradients):  {result['forward_s']:8.2f} s")
    if "forward_backward_s" in result:
        print(f"  forward + backward:      {result['forward_backward_s']:8.2f} s, "
              f"{result['activations_gib']:.2f} GiB of saved activations (float32)")
        estimate = sum(STEP_UNITS[unit] * result[f"{unit}_s"] for unit in STEP_UNITS)
        result["step_estimate_s"] = estimate
        print(f"  one Stage I step (3 forward + 3 forward/backward units, batch 1): ~{estimate:.1f} s")
        result["step_memory_gib"] = step_memory(result["unet_params"], result["activations_gib"])
        print("  memory of a full step (GiB):")
        for what, gib in result["step_memory_gib"].items():
            print(f"    {what:44s} {gib:7.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
