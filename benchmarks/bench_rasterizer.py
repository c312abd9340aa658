"""Forward+backward time and peak memory of the Gaussian rasterizer backends.

The scene is the issue's acceptance case: N Gaussians uniform in a ball of radius 0.5, log-scales
around -4.5, opacities in [0.1, 0.9], random colours and rotations, seen by B cameras at radius 2
(fovy 49.1°, azimuths evenly spaced, elevations in [-30°, 30°), as CameraSampler draws them). One
step is render → L1 loss against a fixed target (rgb and alpha) → backward.

Each (backend, N) runs in its own subprocess so that memory peaks do not mix. Memory on CPU is the
process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``): reported both as
the absolute peak and as the rise over the peak reached before the first render (scene, cameras,
imports, compiled kernel). On CUDA it is ``torch.cuda.max_memory_allocated``. Times are wall-clock
medians (and minima) over ``--repeats`` steps after ``--warmup`` steps, plus the median process CPU
time per step (all threads). The machine's load average is printed alongside: on a shared machine
wall time depends on idle cores, and with one thread (``--threads 1``) CPU time measures the work.

    python benchmarks/bench_rasterizer.py --sizes 5000 20000 50000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def make_scene(n: int, views: int, resolution: int, device: str, seed: int = 0):
    import torch

    from microdreamer.sir.cameras import CameraSampler

    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    d = torch.randn(n, 3, generator=g)
    means = d / d.norm(dim=-1, keepdim=True) * 0.5 * u[:, None] ** (1 / 3)
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(-4.5 + 0.3 * torch.randn(n, 3, generator=g))
    opacities = 0.1 + 0.8 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    params = [t.to(device).requires_grad_() for t in (means, quats, scales, opacities, colors)]
    cameras = CameraSampler(views=views, radius=2.0, resolution=resolution, fovy=49.1).sample(g).to(device)
    target = torch.rand(views, 4, resolution, resolution, generator=g).to(device)
    return params, cameras, target


def child(backend: str, n: int, args: argparse.Namespace) -> dict:
    """One (backend, N) measurement in this process; returns a JSON-able record."""
    import torch

    from microdreamer.render.gaussians import rasterize_gaussians, resolve_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if backend == "gsplat" else "cpu"
    resolve_backend(backend, device)  # builds the C++ kernel before any measurement
    params, cameras, target = make_scene(n, args.views, args.resolution, device)
    background = torch.ones(3, device=device)

    def step() -> None:
        out = rasterize_gaussians(*params, cameras, background, backend=backend)
        loss = (out.rgb - target[:, :3]).abs().mean() + (out.alpha - target[:, 3:]).abs().mean()
        loss.backward()
        for p in params:
            p.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    record = {
        "backend": backend, "n": n, "median_s": statistics.median(times), "min_s": min(times),
        "cpu_s": statistics.median(cpu_times), "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        record["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        record["memory"] = "cuda max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record.update(peak_mib=peak, rise_mib=peak - rss_before, memory="ru_maxrss")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000], help="Gaussian counts")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="torch, cpu, gsplat (default: every available one)")
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0: torch's default)")
    parser.add_argument("--torch-max", type=int, default=5000,
                        help="largest N for the plain-torch backend (it is slow; larger sizes are skipped)")
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return

    from microdreamer.render.gaussians import available_backends

    available = available_backends()
    backends = args.backends or [name for name in ("torch", "cpu", "gsplat") if available[name]]
    print(f"{args.views} views at {args.resolution}², forward+backward; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    header = (f"{'backend':8} {'N':>7} {'median ms':>10} {'min ms':>8} {'cpu ms':>8} {'threads':>7} "
              f"{'peak MiB':>9} {'rise MiB':>9}  memory")
    print(header)
    print("-" * len(header))
    for backend in backends:
        for n in args.sizes:
            if backend == "torch" and n > args.torch_max:
                print(f"{backend:8} {n:>7} {'skipped (N > --torch-max)':>30}")
                continue
            if not available.get(backend, False):
                print(f"{backend:8} {n:>7} {'unavailable here':>30}")
                continue
            cmd = [sys.executable, __file__, "--child", backend, str(n), "--views", str(args.views),
                   "--resolution", str(args.resolution), "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{backend:8} {n:>7} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rise = f"{r['rise_mib']:>9.0f}" if "rise_mib" in r else f"{'':>9}"
            print(f"{backend:8} {n:>7} {r['median_s'] * 1e3:>10.1f} {r['min_s'] * 1e3:>8.1f} "
                  f"{r['cpu_s'] * 1e3:>8.1f} {r['threads']:>7} {r['peak_mib']:>9.0f} {rise}  {r['memory']}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
