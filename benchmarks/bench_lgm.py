"""Time of one LGM reconstruction with the real-size "big" network and random weights (no downloads).

One object: 4 views of 256² → input tensor (ImageNet normalisation + Plücker rays) → network →
splatter images [1, 4, 14, 128, 128] → up to 65,536 Gaussians in our frame (those above LGM's 0.005 opacity).
Stages are timed apart; the FLOPs of one network call (torch's counter on the meta device) give the
throughput reached. fp32 on the CPU, fp16 on CUDA (``--dtype`` overrides); on CUDA the peak allocated
memory is printed too. Not a test: it prints numbers.

    python benchmarks/bench_lgm.py [--device cpu|cuda] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_teachers import _sync, add_run_options, randomize, run_settings
from microdreamer.reconstructors.lgm import LGMReconstructor, lgm_to_world, splatter_to_gaussians
from microdreamer.reconstructors.lgm_unet import LGMConfig, LGMNetwork


def tflop_per_call(config: LGMConfig) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        network = LGMNetwork(config)
        x = torch.empty(1, 4, 9, config.input_size, config.input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(x)
    return counter.get_total_flops() / 1e12


def bench(device: torch.device, dtype: torch.dtype, repeats: int, warmup: int) -> dict:
    config = LGMConfig()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.device("meta"):
        network = LGMNetwork(config)
    model = LGMReconstructor(randomize(network, device, dtype))
    build = time.perf_counter() - start
    g = torch.Generator(device=device).manual_seed(1)
    images = torch.rand(4, 3, 256, 256, generator=g, device=device)
    stages: dict[str, list[float]] = {"input": [], "network": [], "gaussians": []}
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        inputs = model.prepare(images)
        _sync(device)
        t1 = time.perf_counter()
        splats = model.splatter_images(inputs)
        _sync(device)
        t2 = time.perf_counter()
        gaussians = lgm_to_world(config).apply(splatter_to_gaussians(splats[0]))
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
                stages[name].append(seconds)
    if not torch.isfinite(splats).all():
        raise RuntimeError("non-finite splatter images")
    tflop = tflop_per_call(config)
    row = {
        "params": sum(p.numel() for p in model.network.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "splatter_shape": list(splats.shape),
        "gaussians_kept": gaussians.num_points,
        **{f"s_{name}_min": round(min(times), 3) for name, times in stages.items()},
        "s_network_mean": round(sum(stages["network"]) / repeats, 3),
        "tflop_per_call": round(tflop, 3),
        "tflop_per_s": round(tflop / min(stages["network"]), 2),
        "repeats": repeats,
        "build_s": round(build, 1),
    }
    if device.type == "cuda":
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, cpu_repeats=2)
    args = parser.parse_args()
    row = bench(*run_settings(args, cpu_repeats=2))
    print(json.dumps(row))
    if args.json is not None:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
