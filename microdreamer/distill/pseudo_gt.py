"""Stage II's pseudo ground truth (GECO §3.2), cached per sample; renders are made from it on the fly.

A *sample* is a condition image and one noise draw z (``samples_per_image`` per image). Its pseudo ground
truth: Zero123++ v1.1 sampled deterministically from z (``teacher_steps`` trailing-spaced steps without
fresh noise, i.e. DDIM with η = 0; GECO: 75), its six views → the published LGM
(:class:`~microdreamer.distill.reconstruction.GECOReconstructor`) → Gaussians, and ``poses`` random viewpoints
(GECO: 50) to render them from. GECO stores the 50 renders; here the Gaussians and the poses are stored
and the renders made when needed, so an object takes at most 65,536 Gaussians × 14 half floats (1.8 MB)
instead of 50 images.

The generator must see the noise its target was made from: each sample has a ``noise_seed``; the sample's
own ``torch.Generator`` seeded with it draws, in this order, its conditioning's VAE latents (as
:func:`~microdreamer.distill.denoiser.condition_batch` draws them) and then z (:func:`sample_inputs`). The
teacher's sampling continues with that generator (the reference noise of each step); a training step
rebuilds the conditioning and z from the stored seed the same way.

Folder (``RUN_DIR/pseudo_gt`` by default, or any folder shared by runs with the same settings):

- ``index.json``: format, version and every setting that determines the samples (teacher, its steps and
  guidance, view size, LGM weights and input convention, poses, seed, the data's fingerprint); a folder made
  with other settings is refused, one made with the same ones is reused, missing samples are added;
- ``sample-XXXXXXXX.safetensors`` per sample: ``means``, ``quats``, ``scales``, ``opacities``, ``colors`` (the
  LGM Gaussians at least 0.005 opaque, activated, in LGM's frame, float16), ``elevation`` and ``azimuth``
  (the poses, degrees, float32, our orbit convention around the condition view: see
  :meth:`GECOReconstructor.cameras`); metadata ``sample``, a JSON object of ``image`` (index of the
  condition image), ``condition`` (its file) and ``noise_seed``. Each file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import UserError
from ..generators.zero123plus import Conditioning, Zero123PlusGenerator
from ..io.atomic import atomic_path
from .denoiser import condition_batch
from .distributed import World, all_agree, gather_to_main
from .runs import write_json

FORMAT = "microdreamer-geco-pseudo-gt"
VERSION = 1
INDEX = "index.json"
#: the stored Gaussians, keyed as :func:`~microdreamer.reconstructors.lgm.splatter_activations` gives them
GAUSSIANS = ("means", "quats", "scales", "opacities", "colors")


def sample_inputs(
    model: Zero123PlusGenerator, images: list[Tensor], noise_seeds: list[int], shape: tuple[int, ...]
) -> tuple[Conditioning, Tensor, list[torch.Generator]]:
    """The guided conditioning ``[uncond × B ; cond × B]`` and the noise z ``[B, *shape]`` of B samples, each
    drawn from its own generator seeded with its ``noise_seed`` (conditioning first, then z); the
    generators are returned where they stopped."""
    generators = [torch.Generator().manual_seed(seed) for seed in noise_seeds]
    conditioning = condition_batch(model, images, generators)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(model.device)
    return conditioning, noise, generators


@dataclass(frozen=True)
class Entry:
    """One sample's pseudo ground truth, as stored."""

    image: int
    noise_seed: int
    gaussians: dict[str, Tensor]  # float32
    elevation: Tensor  # [P] degrees
    azimuth: Tensor  # [P] degrees


class PseudoGroundTruth:
    """The cache folder of one set of settings (``spec``, JSON-serialisable)."""

    def __init__(self, folder: str | Path, spec: dict[str, Any]) -> None:
        self.folder = Path(folder).expanduser()
        self.spec = json.loads(json.dumps({"format": FORMAT, "version": VERSION, **spec}))  # as index.json holds it

    def path(self, sample: int) -> Path:
        return self.folder / f"sample-{sample:08d}.safetensors"

    def check(self) -> None:
        """Refuse in one line a folder that holds pseudo ground truth of other settings (or something else)."""
        index = self.folder / INDEX
        if not index.exists():
            if self.folder.is_dir() and any(p.name.startswith("sample-") for p in self.folder.iterdir()):
                raise UserError(f"{self.folder} holds samples but no {INDEX}; delete it or choose another --pseudo-gt")
            return
        try:
            stored = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{index} cannot be read ({exc}); delete the folder or choose another --pseudo-gt") from None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise UserError(f"{self.folder} is not a pseudo-ground-truth folder; choose another --pseudo-gt")
        differ = sorted(k for k in set(stored) | set(self.spec) if stored.get(k) != self.spec.get(k))
        if differ:
            listed = ", ".join(f"{k} {stored.get(k)!r} → {self.spec.get(k)!r}" for k in differ[:3])
            raise UserError(f"the pseudo ground truth in {self.folder} was made with other settings ({listed}); "
                            "choose another --pseudo-gt folder or delete it")

    def missing(self, count: int) -> list[int]:
        return [j for j in range(count) if not self.path(j).is_file()]

    def write(self, sample: int, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        """Store one sample (metadata as one JSON value, so that the file's bytes do not depend on the order
        in which safetensors writes several)."""
        try:
            with atomic_path(self.path(sample)) as tmp:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                          metadata={"sample": json.dumps(metadata, sort_keys=True)})
        except (OSError, SafetensorError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
            raise UserError(f"cannot write the pseudo ground truth of sample {sample} in {self.folder} ({reason}); "
                            "free space and run again: the samples made so far are kept") from None

    def entry(self, sample: int, device: torch.device) -> Entry:
        path = self.path(sample)
        if not path.is_file():
            raise UserError(f"the pseudo ground truth of sample {sample} is missing ({path}); run again to rebuild it")
        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["sample"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        return Entry(int(meta["image"]), int(meta["noise_seed"]),
                     {k: tensors[k].to(device, torch.float32) for k in GAUSSIANS},
                     tensors["elevation"], tensors["azimuth"])

    def build(
        self,
        count: int,
        make: Callable[[int], tuple[dict[str, Tensor], dict[str, Any]]],
        world: World,
        device: torch.device,
        progress: Callable[[int, int], None],
    ) -> int:
        """Make the samples of ``0..count−1`` the folder lacks with ``make`` (tensors and metadata of one
        sample), each process a share, rank 0 writing; ``progress(done, total)`` on rank 0. Returns how many
        were made."""
        self.check()
        if world.main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / INDEX).exists():
                write_json(self.folder / INDEX, self.spec)
        all_agree(True, world, device)  # the index exists before anyone looks for samples
        missing = self.missing(count)
        for first in range(0, len(missing), world.size):
            mine = first + world.rank
            made = (missing[mine], *make(missing[mine])) if mine < len(missing) else None
            for item in gather_to_main(made, world):
                if item is not None:
                    self.write(*item)
            if world.main:
                progress(min(first + world.size, len(missing)), len(missing))
        all_agree(True, world, device)
        return len(missing)
