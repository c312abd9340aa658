"""Forward+backward time of the hash-grid encoding backends, per million samples.

threestudio's grid (16 levels × 2 features, 2^19 entries, resolutions 16 … 4096; 12.6 M floats),
``--points`` uniform random points in [0,1]³, one step = encode → a fixed random linear loss →
backward to the parameters (and to the points with ``--x-grad``, as analytic normals need). Times
are wall-clock medians (and minima) over ``--repeats`` steps after ``--warmup`` steps, plus the
median process CPU time per step (all threads). The load average is printed alongside: on a shared
machine wall time depends on idle cores, and with ``--threads 1`` CPU time measures the work.

    python benchmarks/bench_hashgrid.py --points 262144
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def measure(backend: str, args: argparse.Namespace) -> dict:
    import torch

    from microdreamer.render.hashgrid import HashGridConfig, hash_grid_encode, init_params, resolve_backend

    device = "cuda" if backend == "tcnn" else "cpu"
    resolve_backend(backend, device)  # builds the C++ kernel before any measurement
    cfg = HashGridConfig()
    g = torch.Generator().manual_seed(0)
    params = init_params(cfg, g).to(device).requires_grad_()
    x = torch.rand(args.points, 3, generator=g).to(device).requires_grad_(args.x_grad)
    weights = torch.randn(args.points, cfg.n_output_dims, generator=g).to(device)

    def step() -> None:
        (hash_grid_encode(x, params, cfg, backend=backend) * weights).sum().backward()
        params.grad = x.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    repeats = args.torch_repeats if backend == "torch" else args.repeats
    for _ in range(args.warmup):
        step()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    per_million = 1e6 / args.points
    return {
        "median": statistics.median(times) * per_million, "min": min(times) * per_million,
        "cpu": statistics.median(cpu_times) * per_million, "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=2**18)
    parser.add_argument("--backends", nargs="+", default=None, help="torch, cpu, tcnn (default: every available one)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-repeats", type=int, default=3, help="repeats for the (slow) torch backend")
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0: torch's default)")
    parser.add_argument("--x-grad", action="store_true", help="also differentiate w.r.t. the points")
    args = parser.parse_args()

    import torch

    from microdreamer.render.hashgrid import available_backends

    if args.threads:
        torch.set_num_threads(args.threads)
    available = available_backends()
    backends = args.backends or [name for name in ("torch", "cpu", "tcnn") if available[name]]
    grads = "params and points" if args.x_grad else "params"
    print(f"threestudio hash grid, {args.points} random points, forward+backward ({grads}), "
          f"{torch.get_num_threads()} threads; load average before: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
    header = f"{'backend':8} {'median s/M':>11} {'min s/M':>9} {'cpu s/M':>9} {'repeats':>8}"
    print(header)
    print("-" * len(header))
    results = {}
    for backend in backends:
        if not available.get(backend, False):
            print(f"{backend:8} unavailable here")
            continue
        r = results[backend] = measure(backend, args)
        print(f"{backend:8} {r['median']:>11.3f} {r['min']:>9.3f} {r['cpu']:>9.3f} {r['repeats']:>8}")
    if "torch" in results and "cpu" in results:
        print(f"cpu speed-up over torch: {results['torch']['median'] / results['cpu']['median']:.1f}× (median wall), "
              f"{results['torch']['cpu'] / results['cpu']['cpu']:.1f}× (CPU time)")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
