"""Wall time and peak memory of whole CLI runs with the real-size teachers (random weights, no downloads).

The published checkpoints cannot be fetched here, so this writes a checkpoint folder of the real
architecture and sizes in the real layout (spec §1.1, §2.1, §3.1: same classes, configs and fp16
safetensors as on the Hub, random weights) and runs the command a user would, through ``--model FOLDER``:

- ``stable-zero123`` → ``image2gs photo.png`` (issue 3: target ≤ 10 s on an H100);
- ``mvdream`` → ``text2mesh "a corgi"`` (issue 5: aim < 30 s on an H100);
- ``imagedream`` → ``image2mesh photo.png --prompt ...``.

Each run is a fresh process, timed from start to exit, so the figure includes imports, model loading,
SIR and export; the stage timings, network evaluations and peak memory come from the run's own report.
The default preset of each teacher runs in full; ``--iters N`` shortens it (a CPU runs about 15 s per
guided UNet call at this size, so a full CPU run takes over an hour).

    python benchmarks/bench_pipeline.py [--teachers stable-zero123 mvdream] [--device cuda] [--iters N]
        [--checkpoints DIR] [--json FILE]

Not a test: it prints numbers. Checkpoints are written once to ``--checkpoints`` (≈ 2.5 / 2.4 / 3.6 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the checkpoint-layout writers the tests use

from bench_teachers import MVDREAM_UNET, ZERO123_UNET, randomize  # noqa: E402
from tiny_models import write_mvdream, write_tiny_tokenizer, write_zero123  # noqa: E402

#: spec §0.3, the VAE of every teacher here
VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "sample_size": 256, "scaling_factor": 0.18215,
}
#: spec §1.3: OpenAI CLIP ViT-L/14 vision tower with its 768-d projection
CLIP_L = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "patch_size": 14, "image_size": 224, "projection_dim": 768, "hidden_act": "quick_gelu",
}
#: spec §3.2: OpenCLIP ViT-H/14 vision tower
CLIP_H = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
    "patch_size": 14, "image_size": 224, "hidden_act": "gelu",
}
#: spec §2.5: the SD-2.1 text encoder (OpenCLIP ViT-H text tower, 23 layers kept)
TEXT_H = {
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
}
COMMANDS = {
    "stable-zero123": ["image2gs", "{image}"],
    "zero123-xl": ["image2gs", "{image}"],
    "mvdream": ["text2mesh", "a corgi wearing a top hat"],
    "imagedream": ["image2mesh", "{image}", "--prompt", "a ceramic cat statue"],
}


def _random(build, seed: int) -> torch.nn.Module:
    """``build()`` on the meta device, materialised with seeded random weights in fp16 (as published)."""
    with torch.device("meta"):
        module = build()
    return randomize(module, torch.device("cpu"), torch.float16, seed)


def write_checkpoint(teacher: str, root: Path) -> Path:
    """The teacher's pipeline folder at real size with random weights (skipped when already complete)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
    from transformers import CLIPVisionModelWithProjection

    from microdreamer.teachers.loading import missing_files
    from microdreamer.teachers.mv_unet import MultiViewUNet, MultiViewUNetConfig
    from microdreamer.teachers.zero123 import CameraProjection

    folder = root / f"{teacher}-random"
    if (folder / "model_index.json").is_file() and not missing_files(folder):
        return folder
    start = time.perf_counter()
    vae = _random(lambda: AutoencoderKL.from_config(VAE), 1)
    if teacher in ("stable-zero123", "zero123-xl"):
        write_zero123(
            folder,
            _random(lambda: UNet2DConditionModel.from_config(ZERO123_UNET), 0),
            vae,
            _random(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L)), 2),
            _random(lambda: CameraProjection(768, 4), 3),
            clip_image_size=224,
        )
    else:
        image_prompt = teacher == "imagedream"
        unet_config = {"_class_name": "MultiViewUNetModel", **MVDREAM_UNET, **({"ip_dim": 16} if image_prompt else {})}
        vocab = write_tiny_tokenizer(folder)  # the real BPE vocabulary is not reachable; sizes come from TEXT_H
        text = CLIPTextConfig(**TEXT_H, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)
        write_mvdream(
            folder,
            _random(lambda: MultiViewUNet(MultiViewUNetConfig.from_dict(unet_config)), 0),
            unet_config,
            vae,
            _random(lambda: CLIPTextModel(text), 2),
            _random(lambda: CLIPVisionModel(CLIPVisionConfig(**CLIP_H)), 3) if image_prompt else None,
            clip_image_size=224,
        )
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9
    print(f"# wrote {folder} ({size:.2f} GB) in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def write_photo(path: Path, size: int = 256) -> Path:
    """An RGBA photo stand-in: a shaded disc on a transparent background."""
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    inside = xx**2 + yy**2 < 0.6**2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., 0] = 200 * inside
    rgba[..., 1] = (120 + 100 * xx) * inside
    rgba[..., 2] = (120 + 100 * yy) * inside
    rgba[..., 3] = 255 * inside
    Image.fromarray(rgba).save(path)
    return path


def bench(teacher: str, model: Path, device: str, iters: int | None, seed: int, work: Path) -> dict:
    image = write_photo(work / "photo.png")
    out = work / f"out-{teacher}"
    command = [arg.format(image=image) for arg in COMMANDS[teacher]]
    argv = [sys.executable, "-m", "microdreamer", *command, "--teacher", teacher, "--model", str(model),
            "--device", device, "--seed", str(seed), "--out", str(out), "--json", "-q"]
    if iters is not None:
        argv += ["--iters", str(iters)]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{teacher}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    entry = json.loads(done.stdout)["entries"][0]
    timings = entry["timings"]
    iterations = json.loads(Path(entry["outputs"]["report"]).read_text())["iterations"]
    return {
        "teacher": teacher,
        "command": command[0],
        "device": device,
        "iterations": entry["config"]["schedule"]["iterations"],
        "wall_s": round(wall, 1),
        "load_teacher_s": round(timings.get("load_teacher", 0.0), 1),
        "sir_s": round(timings["sir"], 1),
        "sir_teacher_s": round(timings.get("sir.teacher", 0.0), 1),
        "mesh_s": round(sum(v for k, v in timings.items() if k.startswith("mesh.")), 1),
        "network_evaluations": entry["evaluations"].get("total"),
        "guided": entry["evaluations"].get("guided"),
        "s_per_evaluation": round(timings.get("sir.teacher", 0.0) / max(entry["evaluations"].get("total", 1), 1), 2),
        "iteration_s": [round(it["seconds"], 1) for it in iterations],  # [init, 1, 2, …]
        **entry["peak_memory"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="*", default=["stable-zero123", "mvdream"], choices=list(COMMANDS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=None, help="SIR iterations (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoints", type=Path, default=Path.home() / ".cache" / "microdreamer" / "bench-checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    from microdreamer.pipeline import resolve_device

    device = str(resolve_device(args.device))
    cuda = device.startswith("cuda")
    info = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# device {device} ({info}), torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for teacher in args.teachers:
            model = write_checkpoint(teacher, args.checkpoints)
            row = bench(teacher, model, device, args.iters, args.seed, Path(work))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
