"""Checkpoint loading: model folders and the Hugging Face cache, strict safetensors loading, schedules, catalog."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from microdreamer.errors import UserError
from microdreamer.teachers import catalog
from microdreamer.teachers.loading import (
    build_model,
    load_weights,
    missing_files,
    noise_schedule,
    resolve_dtype,
    resolve_model_dir,
    weights_file,
)
from tiny_models import build_tiny_zero123, save_transformers, tiny_clip_vision, write_scheduler
from tolerances import ALPHAS32_RTOL, printed

REPO = "someone/tiny-zero123"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_zero123(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def model_copy(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def _fake_cache(root: Path, model: Path, repo: str = REPO) -> Path:
    """A Hugging Face hub cache holding ``model`` as the snapshot of ``repo``'s main branch."""
    storage = root / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    (storage / "blobs").mkdir()
    shutil.copytree(model, storage / "snapshots" / COMMIT)
    return storage / "snapshots" / COMMIT


@pytest.fixture()
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_dtype_defaults_and_overrides():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cuda")) == torch.float32
    with pytest.raises(UserError, match="unknown dtype 'half'"):
        resolve_dtype("half", "cpu")


def test_local_folder_resolves_and_bad_folders_are_user_errors(tiny_dir, tmp_path):
    assert resolve_model_dir(tiny_dir, allow_download=False) == tiny_dir
    assert resolve_model_dir(str(tiny_dir), allow_download=True) == tiny_dir
    with pytest.raises(UserError, match="model folder not found"):
        resolve_model_dir(tmp_path / "absent", allow_download=True)
    with pytest.raises(UserError, match="no model_index.json"):
        resolve_model_dir(tmp_path, allow_download=True)


def test_uncached_hub_id_without_download_names_the_fixes(tmp_path):
    with pytest.raises(UserError) as info:
        resolve_model_dir("nobody/not-a-model", allow_download=False, cache_dir=tmp_path)
    message = str(info.value)
    assert "--model" in message and "HF_HUB_CACHE" in message and "models download" in message
    assert "\n" not in message


def test_uncached_hub_id_offline_is_a_user_error(tmp_path, offline):
    with pytest.raises(UserError, match="cannot download model 'nobody/not-a-model'.*--model"):
        resolve_model_dir("nobody/not-a-model", allow_download=True, cache_dir=tmp_path)


def test_cached_snapshot_resolves_without_network(tiny_dir, tmp_path, offline):
    snapshot = _fake_cache(tmp_path / "hub", tiny_dir)
    assert resolve_model_dir(REPO, allow_download=False, cache_dir=tmp_path / "hub") == snapshot
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="is incomplete in the Hugging Face cache"):
        resolve_model_dir(REPO, allow_download=False, cache_dir=tmp_path / "hub")


def test_missing_files_lists_weights_configs_and_processors(model_copy):
    assert missing_files(model_copy) == []
    (model_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (model_copy / "image_encoder" / "config.json").unlink()
    shutil.rmtree(model_copy / "feature_extractor")
    assert sorted(missing_files(model_copy)) == ["feature_extractor/", "image_encoder/config.json", "vae/*.safetensors"]


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 1, bias=False)


def test_strict_loading_names_missing_unexpected_and_misshapen_keys(tmp_path):
    source = _Two()
    state = source.state_dict()
    path = tmp_path / "w.safetensors"

    save_file({k: v for k, v in state.items() if k != "a.bias"}, str(path))
    with pytest.raises(UserError, match=r"missing keys 'a\.bias'") as info:
        load_weights(_Two(), path)
    assert str(path) in str(info.value)

    save_file({**state, "c.weight": torch.zeros(1)}, str(path))
    with pytest.raises(UserError, match=r"unexpected keys 'c\.weight'"):
        load_weights(_Two(), path)

    save_file({**state, "b.weight": torch.zeros(1, 3)}, str(path))
    with pytest.raises(UserError, match=r"'b\.weight' has shape \[1, 3\], expected \[1, 2\]"):
        load_weights(_Two(), path)

    save_file(state, str(path))
    target = load_weights(_Two().double(), path)
    assert target.a.weight.dtype == torch.float64
    assert torch.equal(target.a.weight.float(), source.a.weight)


def test_saved_non_persistent_buffers_are_ignored(tmp_path):
    """Older CLIP exports carry ``position_ids``, a buffer that current transformers rebuilds itself."""
    model = tiny_clip_vision()
    folder = save_transformers(tmp_path, "image_encoder", model)
    weights = load_file(str(folder / "model.safetensors"))
    weights["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(weights, str(folder / "model.safetensors"))
    loaded = load_weights(tiny_clip_vision(), folder / "model.safetensors")
    assert torch.equal(loaded.visual_projection.weight, model.visual_projection.weight)


def test_pickle_weights_are_refused(model_copy):
    unet = model_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match=r"only has diffusion_pytorch_model\.bin: only \.safetensors"):
        weights_file(unet)
    with pytest.raises(UserError, match="only .safetensors weights are loaded"):
        build_model(model_copy, "unet", device="cpu", dtype=torch.float32)


def test_build_model_matches_the_saved_module(tiny_dir):
    from tiny_models import tiny_vae

    vae = build_model(tiny_dir, "vae", device="cpu", dtype=torch.float32)
    reference = tiny_vae()
    reference.load_state_dict(load_file(str(tiny_dir / "vae" / "diffusion_pytorch_model.safetensors")))
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(vae.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean)
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(UserError, match="component 'scheduler' .* is DDIMScheduler; supported"):
        build_model(tiny_dir, "scheduler", device="cpu", dtype=torch.float32)


def test_noise_schedule_matches_spec_and_diffusers(tiny_dir):
    from diffusers import DDIMScheduler

    config, alphas = noise_schedule(tiny_dir)
    assert alphas.dtype == torch.float64 and alphas.shape == (1000,)
    spot = {0: 0.999150, 1: 0.998296, 51: 0.950524, 101: 0.892981, 501: 0.274999, 901: 0.014005, 999: 0.004660}
    for t, value in spot.items():
        assert alphas[t].item() == pytest.approx(value, abs=printed(6))
    reference = DDIMScheduler.from_config(config).alphas_cumprod
    assert torch.allclose(alphas, reference.double(), rtol=ALPHAS32_RTOL, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prediction_type": "v_prediction"}, "prediction_type"),
        ({"beta_schedule": "linear"}, "beta_schedule"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ],
)
def test_noise_schedule_rejects_other_parameterisations(model_copy, change, message):
    write_scheduler(model_copy, **change)
    with pytest.raises(UserError, match=f"unsupported {message}"):
        noise_schedule(model_copy)


def test_catalog_entries_and_licences():
    names = [e.name for e in catalog.CATALOG]
    assert names == ["stable-zero123", "zero123-xl", "mvdream", "imagedream", "lgm", "zero123plus"]
    stable = catalog.find_entry("stable-zero123")
    assert stable.repo_id == "ashawkey/stable-zero123-diffusers"
    assert not stable.commercial_use and "Non-Commercial" in stable.license
    assert catalog.find_entry("zero123-xl").repo_id == "ashawkey/zero123-xl-diffusers"
    with pytest.raises(UserError, match="unknown model 'sd15'.*stable-zero123"):
        catalog.find_entry("sd15")


def test_cache_status_reads_the_cache_only(tiny_dir, tmp_path, offline):
    entry = catalog.CatalogEntry("tiny", REPO, "test", True, 0.0, "test")
    hub = tmp_path / "hub"
    assert catalog.cache_status(entry, hub) == (False, None)
    snapshot = _fake_cache(hub, tiny_dir)
    size = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())
    assert catalog.cache_status(entry, hub) == (True, size)
    assert catalog.download(entry, hub) == snapshot
    (snapshot / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    cached, _ = catalog.cache_status(entry, hub)
    assert not cached
    with pytest.raises(UserError, match=r"did not complete it \(missing vae/\*\.safetensors\); check the network"):
        catalog.download(entry, hub)


def test_single_file_repository_resolves_from_cache_and_folder(tmp_path, offline):
    """LGM's layout: a repository of loose safetensors files, of which only the named ones are needed."""
    folder = tmp_path / "lgm"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "model_fp16_fixrot.safetensors"))
    files = ("model_fp16_fixrot.safetensors",)
    assert resolve_model_dir(folder, allow_download=False, files=files) == folder
    assert missing_files(folder, files) == [] and missing_files(folder, ("model_fixrot.safetensors",)) == [
        "model_fixrot.safetensors"]
    with pytest.raises(UserError, match="has no model_fixrot.safetensors"):
        resolve_model_dir(folder, allow_download=False, files=("model_fixrot.safetensors",))
    entry = catalog.CatalogEntry("lgm-like", "someone/lgm-like", "test", True, 0.0, "test", files=files)
    hub = tmp_path / "hub"
    assert catalog.cache_status(entry, hub) == (False, None)
    snapshot = _fake_cache(hub, folder, repo=entry.repo_id)
    assert catalog.cache_status(entry, hub)[0] and catalog.download(entry, hub) == snapshot
    (snapshot / files[0]).unlink()
    assert not catalog.cache_status(entry, hub)[0]
    with pytest.raises(UserError, match=r"did not complete it \(missing model_fp16_fixrot.safetensors\)"):
        catalog.download(entry, hub)


def test_lgm_catalog_entry_fetches_one_file():
    entry = catalog.find_entry("lgm")
    assert entry.repo_id == "ashawkey/LGM" and entry.files == ("model_fp16_fixrot.safetensors",)
    assert not entry.commercial_use and "model card" in entry.license


@pytest.mark.parametrize("component", ["unet", "vae", "image_encoder"])
def test_models_are_built_without_random_initialisation(tiny_dir, component):
    """Construction skips the random init (the checkpoint overwrites it), yet the CLIP position ids (a buffer
    the checkpoint does not hold) are still built and every weight is the file's.

    The diffusers models then draw no random numbers at all (CLIP's class embedding is a ``torch.randn``
    in its constructor, outside any init function)."""
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    model = build_model(tiny_dir, component, device="cpu", dtype=torch.float32)
    if component != "image_encoder":
        assert torch.equal(torch.random.get_rng_state(), before)
    saved = load_file(str(weights_file(tiny_dir / component)))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    if component == "image_encoder":
        ids = model.vision_model.embeddings.position_ids
        assert torch.equal(ids, torch.arange(ids.shape[-1])[None])
