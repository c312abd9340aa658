"""What running a batch on Ray costs against a plain local batch: Ray's start-up, the workers' start (actor,
imports, teacher load), and the overhead per input once they run.

The batch is ``--inputs`` RGBA renders of the bundled Spot cow, through ``preprocess`` (64 px, no background
removal: milliseconds of work per input, so its time per input is nearly all the executor's) and through
``image2gs`` with the reference teacher (no weights), tiny settings by default (``--full``: the reference
preset as it is). The local batch runs on ``--threads`` torch threads, each Ray worker on as many
(``cpus_per_worker``), so both do the same work; the files of every run are checked equal to the local
run's, byte for byte.

- *per input*: the mean of the manifest's attempt times (local: prepare + run; Ray: dispatch to result on
  the driver), without each worker's first input (which also builds or loads the C++ kernels);
- *overhead per input*: Ray's per-input time minus the local one, with one worker;
- *throughput*: inputs per second of the whole batch once Ray runs (worker start included).

    python benchmarks/bench_executors.py [--inputs 16] [--commands preprocess image2gs] [--workers 1 2]
        [--threads 1] [--device cuda --gpus-per-worker 1 0.5] [--full] [--json FILE]

Not a test: it prints numbers. On a GPU machine ``--device cuda --gpus-per-worker 1 0.5`` gives the throughput
with one and two workers per GPU.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import microdreamer
from microdreamer import Pipeline
from microdreamer.api import preprocess_images
from microdreamer.batch import Manifest
from microdreamer.executors import Executor, LocalExecutor
from microdreamer.executors.ray import RayExecutor
from microdreamer.pipeline import PreprocessOptions
from microdreamer.sir.cameras import Cameras
from microdreamer.teachers.reference import ReferenceTeacher

SPOT = Path(microdreamer.__file__).parent / "assets" / "spot" / "spot.obj"
TINY = dict(iters=1, steps=2, views=2, res=32)
TINY_CONFIG = {"gaussians": {"num_points": 300}}


def make_inputs(folder: Path, count: int) -> None:
    teacher = ReferenceTeacher(SPOT, resolution=128)
    for index in range(count):
        out = teacher.render(Cameras.orbit([0.0], [360.0 * index / count], 2.0, 128))
        rgba = torch.cat([out.rgb, out.alpha], 1)[0].permute(1, 2, 0).numpy()
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8)).save(folder / f"cow{index:03d}.png")


def per_input(manifest: Manifest) -> float:
    """Mean attempt time without each worker's first input."""
    seen, times = set(), []
    for entry in manifest.entries:
        for attempt in entry.attempts:
            if (attempt["worker"], attempt["pid"]) in seen:
                times.append(attempt["seconds"])
            seen.add((attempt["worker"], attempt["pid"]))
    return statistics.mean(times) if times else float("nan")


def same_files(a: Path, b: Path) -> bool:
    names = [p.name for p in a.iterdir() if p.suffix in (".ply", ".png")]
    return bool(names) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def batch(command: str, pipe: Pipeline, photos: Path, out: Path, executor: Executor) -> tuple[Manifest, float]:
    """The batch and its wall time."""
    start = time.perf_counter()
    if command == "preprocess":
        options = PreprocessOptions(remove_background="none", size=64)
        manifest = preprocess_images([photos], out, options=options, executor=executor)
    else:
        manifest = pipe.run_batch([photos], out, executor=executor)
    return manifest, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--commands", nargs="*", default=["preprocess", "image2gs"], choices=["preprocess", "image2gs"])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--gpus-per-worker", type=float, nargs="*", default=[], help="with --device cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local run and of each worker")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the reference preset's own settings, not tiny ones")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import ray

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = root / "photos"
        photos.mkdir()
        make_inputs(photos, args.inputs)
        settings = {} if args.full else dict(TINY, overrides=TINY_CONFIG)
        pipe = Pipeline.from_preset(teacher="reference", model=str(SPOT), device=args.device, seed=0, **settings)
        for command in args.commands:
            manifest, wall = batch(command, pipe, photos, root / f"{command}-local", LocalExecutor())
            rows.append({"command": command, "executor": "local", "workers": 1, "gpus_per_worker": 0, "wall_s": wall,
                         "per_input_s": per_input(manifest), "inputs_per_s": args.inputs / wall})

        start = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        startup = time.perf_counter() - start
        layouts = [(w, None) for w in args.workers] + [(None, g) for g in args.gpus_per_worker]
        for command in args.commands:
            for workers, gpus in layouts:
                out = root / f"{command}-ray-{workers}-{gpus}"
                executor = RayExecutor(workers=workers, gpus_per_worker=gpus, cpus_per_worker=args.threads)
                manifest, wall = batch(command, pipe, photos, out, executor)
                used = len({a["worker"] for e in manifest.entries for a in e.attempts})
                rows.append({"command": command, "executor": "ray", "workers": used, "gpus_per_worker": gpus or 0,
                             "wall_s": wall, "per_input_s": per_input(manifest), "inputs_per_s": args.inputs / wall,
                             "same_files_as_local": same_files(root / f"{command}-local", out)})
        ray.shutdown()

    print(f"{args.inputs} inputs, {'reference preset' if args.full else 'tiny settings'}, device {args.device}, "
          f"{args.threads} thread(s) per worker; Ray start-up {startup:.1f} s (not in the walls below)")
    print(f"{'command':10} {'executor':8} {'workers':>7} {'gpu/worker':>10} {'wall s':>8} {'per input s':>11} "
          f"{'overhead s':>10} {'inputs/s':>8}  same files")
    local = {r["command"]: r["per_input_s"] for r in rows if r["executor"] == "local"}
    for r in rows:
        print(f"{r['command']:10} {r['executor']:8} {r['workers']:>7} {r['gpus_per_worker']:>10g} {r['wall_s']:>8.2f} "
              f"{r['per_input_s']:>11.3f} {r['per_input_s'] - local[r['command']]:>10.3f} {r['inputs_per_s']:>8.2f}  "
              f"{r.get('same_files_as_local', '')}")
    if args.json is not None:
        args.json.write_text(json.dumps({"ray_startup_s": startup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
