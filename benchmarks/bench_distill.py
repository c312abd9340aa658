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

    python benchmarks/bench_distill.py [--device cpu|cuda] [--view-size 320] [--repeats 1] [--no-backward] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--view-size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
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
