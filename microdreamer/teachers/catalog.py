"""The known models (SIR teachers, the Zero123++ multi-view generator, the LGM reconstructor): where their
weights live, under which licence, and whether they are cached.

Licences are those stated on the Hugging Face model pages of the weights; the converted diffusers
ports inherit the terms of the original weights whatever their own card says. Where our sources do
not record a licence, the entry says so and is marked non-commercial until the card is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .loading import DOWNLOAD_HELP, expect_components, missing_files, require, resolve_dtype, resolve_model_dir


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # the model name used in configs and on the command line
    repo_id: str  # Hugging Face id of the repository we load
    license: str
    commercial_use: bool  # False: research / non-commercial use only (or not known to be allowed)
    approx_size_gb: float  # download size (fp16 safetensors)
    source: str  # the original weights
    files: tuple[str, ...] = ()  # single-file repositories: the files we fetch; empty: the diffusers layout


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="stable-zero123",
        repo_id="ashawkey/stable-zero123-diffusers",
        license=(
            "Stability AI Non-Commercial Research Community License (non-commercial research use only; "
            "the weights were trained on some CC-BY-NC objects)"
        ),
        commercial_use=False,
        approx_size_gb=2.5,
        source="stabilityai/stable-zero123 (stable_zero123.ckpt)",
    ),
    CatalogEntry(
        name="zero123-xl",
        repo_id="ashawkey/zero123-xl-diffusers",
        license=(
            "MIT according to the zero123 project's weight card (cvlab/zero123-weights) and the port; "
            "fine-tuned from lambdalabs/sd-image-variations-diffusers (CreativeML OpenRAIL-M use restrictions)"
        ),
        commercial_use=True,
        approx_size_gb=2.5,
        source="cvlab/zero123-weights (zero123-xl.ckpt)",
    ),
    CatalogEntry(
        name="mvdream",
        repo_id="ashawkey/mvdream-sd2.1-diffusers",
        license="OpenRAIL (model pages MVDream/MVDream and the port; derived from Stable Diffusion 2.1, CreativeML OpenRAIL++-M)",
        commercial_use=True,
        approx_size_gb=2.6,
        source="MVDream/MVDream (sd-v2.1-base-4view.pt)",
    ),
    CatalogEntry(
        name="imagedream",
        repo_id="ashawkey/imagedream-ipmv-diffusers",
        license="OpenRAIL (model page of the port; derived from Stable Diffusion 2.1, CreativeML OpenRAIL++-M)",
        commercial_use=True,
        approx_size_gb=4.0,
        source="Peng-Wang/ImageDream (sd-v2.1-base-4view-ipmv.pt)",
    ),
    CatalogEntry(
        name="lgm",
        repo_id="ashawkey/LGM",
        license=(
            "not recorded in our sources: see the model card at huggingface.co/ashawkey/LGM before any "
            "commercial use (the LGM code, 3DTopia/LGM, is MIT)"
        ),
        commercial_use=False,
        approx_size_gb=0.83,  # 830,126,160 B (geco spec §2.7)
        source="3DTopia/LGM, big configuration fine-tuned with the rotation fix (model_fp16_fixrot.safetensors)",
        files=("model_fp16_fixrot.safetensors",),
    ),
    CatalogEntry(  # a multi-view generator (microdreamer.generators), not an SIR teacher
        name="zero123plus",
        repo_id="sudo-ai/zero123plus-v1.1",
        license=(
            "CC-BY-NC 4.0 for the weights (non-commercial use only; generated images are free to use, per the "
            "Zero123++ README); the Zero123++ code is Apache-2.0"
        ),
        commercial_use=False,
        approx_size_gb=3.8,  # fp16 parameter count of UNet, VAE, text and vision encoders (spec §4.1)
        source="SUDO-AI-3D/zero123plus (v1.1, diffusers layout)",
    ),
)


def find_entry(name: str) -> CatalogEntry:
    for entry in CATALOG:
        if entry.name == name:
            return entry
    raise UserError(f"unknown model '{name}' (known: {', '.join(e.name for e in CATALOG)})")


def cache_status(entry: CatalogEntry, cache_dir: str | Path | None = None) -> tuple[bool, int | None]:
    """(complete snapshot cached, bytes the repository takes in the cache or None); never uses the network."""
    hub = require("huggingface_hub")
    if hub_cache(cache_dir).is_file():
        raise UserError(f"the Hugging Face cache {hub_cache(cache_dir)} is a file, not a folder; give the cache folder")
    try:
        info = hub.scan_cache_dir(cache_dir)
    except hub.CacheNotFound:
        return False, None
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id == entry.repo_id:
            complete = any(not missing_files(Path(rev.snapshot_path), entry.files) for rev in repo.revisions)
            return complete, int(repo.size_on_disk)
    return False, None


def hub_cache(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache that downloads go to: ``cache_dir``, else HF_HUB_CACHE (or its default)."""
    return Path(cache_dir) if cache_dir is not None else Path(require("huggingface_hub.constants").HF_HUB_CACHE)


def download(entry: CatalogEntry, cache_dir: str | Path | None = None) -> Path:
    """Fetch (or find in the cache) the entry's configs and safetensors weights; returns the snapshot folder."""
    return resolve_model_dir(entry.repo_id, allow_download=True, cache_dir=cache_dir, files=entry.files,
                             advice=DOWNLOAD_HELP)


def open_model(
    model_id_or_path: str | Path | None,
    name: str,
    components: dict[str, str],
    *,
    device: torch.device | str,
    dtype: str,
    allow_download: bool,
    cache_dir: str | Path | None,
) -> tuple[Path, torch.device, torch.dtype]:
    """The model folder (default: catalog entry ``name``'s weights) checked to hold ``components``, with the
    device and the resolved torch dtype to build them with."""
    if model_id_or_path is None:
        model_id_or_path = find_entry(name).repo_id
    device = torch.device(device)
    root = resolve_model_dir(model_id_or_path, allow_download=allow_download, cache_dir=cache_dir)
    expect_components(root, components)
    return root, device, resolve_dtype(dtype, device)
