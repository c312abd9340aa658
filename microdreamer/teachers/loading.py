"""Checkpoint loading for teachers stored in the diffusers folder layout.

A model folder holds ``model_index.json`` and one sub-folder per component (``unet/``, ``vae/``, …) with a
``config.json`` and its weights. We read every config ourselves, build the modules from a small whitelist of
diffusers / transformers classes (never remote code), and load their weights from ``*.safetensors`` only,
checking the key set strictly so that a wrong or truncated checkpoint fails with the offending key named.
Single-file repositories (LGM) are folders that hold named safetensors files at the top instead.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import UserError

#: what we fetch from the Hugging Face Hub: configs, safetensors weights and the small processor files
ALLOW_PATTERNS = (
    "model_index.json",
    "*/config.json",
    "*/*.safetensors",
    "scheduler/*.json",
    "tokenizer/*",
    "feature_extractor*/*",  # feature_extractor/, or Zero123++'s feature_extractor_clip/ and _vae/
)
#: weight formats that can execute code when unpickled: never loaded
REFUSED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
#: preferred weight file names, by library
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
#: how a checkpoint split into shards names them: ``<weight name>.index.json`` maps each tensor to its shard
SHARD_INDEX = ".index.json"
#: model classes we build, by (library, class name) as written in model_index.json
MODEL_CLASSES = {
    ("diffusers", "UNet2DConditionModel"),
    ("diffusers", "AutoencoderKL"),
    ("transformers", "CLIPVisionModelWithProjection"),
    ("transformers", "CLIPVisionModel"),
    ("transformers", "CLIPTextModel"),
}
_PROCESSOR_SUFFIXES = ("Scheduler", "Tokenizer", "TokenizerFast", "ImageProcessor", "FeatureExtractor")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _missing_model_help() -> str:
    return (
        "download it on a connected machine and pass --model /path/to/folder, point HF_HOME or HF_HUB_CACHE "
        "at a cache that holds it, or run `microdreamer models download NAME` (see `microdreamer models list`)"
    )


#: what to do when ``microdreamer models download`` itself cannot fetch a model
DOWNLOAD_HELP = (
    "check the network (and that HF_HUB_OFFLINE is not set) and try again; on a machine without network, "
    "run the download on a connected one and copy its Hugging Face cache (HF_HOME) or the model folder here"
)


def require(package: str) -> ModuleType:
    """Import an optional dependency of the model teachers, or explain how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"the diffusion teachers need the '{package}' package: pip install 'microdreamer[models]'"
        ) from None


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``auto`` is fp16 on CUDA and fp32 elsewhere; ``fp16``/``bf16``/``fp32`` are taken as given."""
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}' (use auto, fp16, bf16 or fp32)")
    return _DTYPES[dtype]


def resolve_model_dir(
    model_id_or_path: str | Path,
    *,
    allow_download: bool,
    cache_dir: str | Path | None = None,
    files: tuple[str, ...] = (),
    advice: str | None = None,
    fetch_also: tuple[str, ...] = (),
) -> Path:
    """A local model folder, or a Hugging Face id resolved to its cached snapshot.

    The folder is in the diffusers layout, or, when ``files`` names them, holds just those files (a
    single-file repository such as LGM's, of which only the named files are fetched, with whatever the
    globs ``fetch_also`` match). The local cache is tried first (no network); a missing or incomplete
    snapshot is downloaded when ``allow_download``, limited to :data:`ALLOW_PATTERNS` or ``files`` and
    ``fetch_also``. Anything that cannot be resolved is a :class:`UserError` saying how to provide the
    model (``advice``, by default the ways to get it here).
    """
    advice = advice or _missing_model_help()
    text = str(model_id_or_path)
    local = local_model_dir(text, files)
    if local is not None:
        return local
    hub = require("huggingface_hub")
    patterns = list(files or ALLOW_PATTERNS) + list(fetch_also)
    snapshot = _cached_snapshot(hub, text, cache_dir, patterns)
    missing = missing_files(snapshot, files) if snapshot is not None else []
    if snapshot is not None and not missing:
        return snapshot
    if not allow_download:
        state = (f"is incomplete in the Hugging Face cache (missing {', '.join(missing[:3])})" if snapshot is not None
                 else "is not in the Hugging Face cache")
        raise UserError(f"model '{text}' {state} and downloads are disabled; {advice}")
    try:
        snapshot = Path(hub.snapshot_download(text, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as exc:  # network, offline mode, missing or gated repository: all end the same way
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        raise UserError(f"cannot download model '{text}' ({reason}); {advice}") from None
    missing = missing_files(snapshot, files)
    if missing:
        raise UserError(
            f"model '{text}' is incomplete in the cache and the download did not complete it "
            f"(missing {', '.join(missing[:3])}); {advice}"
        )
    return snapshot


def model_files(
    model_id_or_path: str | Path, parts: tuple[str, ...], *, allow_download: bool, cache_dir: str | Path | None = None
) -> Path | None:
    """A folder holding ``parts`` of a model (files, or whole folders written ``name/``, relative to the
    model folder) without its weights: the local folder, the cached snapshot, or with ``allow_download``
    a snapshot of those parts alone (which the full download later completes). None when they cannot be had."""
    def complete(folder: Path) -> bool:
        return all((folder / p).is_dir() and any((folder / p).iterdir()) if p.endswith("/") else (folder / p).is_file()
                   for p in parts)

    text = str(model_id_or_path)
    try:
        local = local_model_dir(text)
    except UserError:
        return None
    if local is not None:
        return local if complete(local) else None
    hub = require("huggingface_hub")
    patterns = [p + "*" if p.endswith("/") else p for p in parts]
    for offline in (True, False) if allow_download else (True,):
        try:
            folder = Path(hub.snapshot_download(text, allow_patterns=patterns, cache_dir=cache_dir,
                                                local_files_only=offline))
        except Exception:  # not cached; no network, offline mode, unknown repository
            continue
        if complete(folder):
            return folder
    return None


def local_model_dir(text: str, files: tuple[str, ...] = ()) -> Path | None:
    """``text`` as a local model folder (checked to be one: the diffusers layout, or holding ``files``), or
    None when it is a Hugging Face id that names no local path."""
    path = Path(text).expanduser()
    if not path.exists() and _REPO_ID.match(text):
        return None
    layout = f"a folder holding {files[0]}" if files else "a folder in the diffusers layout"
    if not path.is_dir():
        raise UserError(f"model folder not found: {path} (pass {layout}, or a Hugging Face id)")
    if files and missing_files(path, files):
        raise UserError(f"{path} has no {missing_files(path, files)[0]}; is this the right model folder?")
    if not files and not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers model folder: it has no model_index.json")
    return path


def _cached_snapshot(hub: ModuleType, repo_id: str, cache_dir: str | Path | None, patterns: list[str]) -> Path | None:
    try:
        return Path(
            hub.snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=True)
        )
    except require("huggingface_hub.errors").LocalEntryNotFoundError:  # also an incomplete snapshot
        return None


def missing_files(model_dir: Path, files: tuple[str, ...] = ()) -> list[str]:
    """Files a complete model folder must have but ``model_dir`` lacks (relative paths): ``files``
    when given, else those of the diffusers layout."""
    if files:
        return [name for name in files if not (model_dir / name).is_file()]
    if not (model_dir / "model_index.json").is_file():
        return ["model_index.json"]
    missing = []
    for name, (_, class_name) in read_model_index(model_dir).items():
        folder = model_dir / name
        if class_name.endswith(_PROCESSOR_SUFFIXES):
            if not folder.is_dir() or not any(folder.iterdir()):
                missing.append(f"{name}/")
            continue
        if not (folder / "config.json").is_file():
            missing.append(f"{name}/config.json")
        if not any(folder.glob("*.safetensors")):
            missing.append(f"{name}/*.safetensors")
    return missing


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def read_model_index(model_dir: Path) -> dict[str, tuple[str, str]]:
    """Components named in ``model_index.json`` as ``{name: (library, class name)}``; null entries are dropped."""
    index = read_json(model_dir / "model_index.json")
    components = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or None in value:
            continue
        components[name] = (str(value[0]), str(value[1]))
    return components


def expect_components(model_dir: Path, expected: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Check that ``model_index.json`` names each component with the expected class."""
    index = read_model_index(model_dir)
    for name, class_name in expected.items():
        if name not in index:
            raise UserError(f"{model_dir / 'model_index.json'} has no '{name}' component; is this the right model?")
        if index[name][1] != class_name:
            raise UserError(
                f"{model_dir / 'model_index.json'}: component '{name}' is {index[name][1]}, expected {class_name}"
            )
    return index


def weights_file(component_dir: Path) -> Path:
    """The component's safetensors file, or the index of its shards; pickle-based formats are refused."""
    for name in WEIGHT_NAMES:
        for candidate in (component_dir / name, component_dir / f"{name}{SHARD_INDEX}"):
            if candidate.is_file():
                return candidate
    candidates = sorted(component_dir.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise UserError(f"{component_dir} holds several weight files ({names}); keep one")
    refused = sorted(p.name for p in component_dir.glob("*") if p.suffix in REFUSED_SUFFIXES)
    if refused:
        raise UserError(
            f"{component_dir} only has {', '.join(refused)}: only .safetensors weights are loaded "
            "(pickle files can run code); convert them to safetensors or download the safetensors version"
        )
    raise UserError(f"no weights in {component_dir} (expected {WEIGHT_NAMES[0]} or {WEIGHT_NAMES[1]})")


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or of every shard a ``*.safetensors.index.json`` names."""
    files = [path]
    if path.name.endswith(SHARD_INDEX):
        shards = read_json(path).get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise UserError(f"{path} has no weight_map: not the index of a sharded safetensors checkpoint")
        files = [path.parent / name for name in sorted(set(map(str, shards.values())))]
    state: dict[str, Tensor] = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"{path} names the shard {file.name}, which is missing; download the whole checkpoint")
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"cannot read {file}: {exc}") from None
    return state


def load_weights(module: nn.Module, path: Path) -> nn.Module:
    """Load a safetensors state dict (one file, or the shards of an index) into ``module`` with strict key
    and shape checks.

    Keys of non-persistent buffers (which older exports sometimes saved) are ignored: the module
    computes those itself. Tensors are cast to each parameter's dtype and device.
    """
    state = read_weights(path)
    expected = module.state_dict()
    ignorable = {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        for name in sub._non_persistent_buffers_set
    }
    check_state(state, expected, path, type(module).__name__, ignorable)
    module.load_state_dict({k: state[k] for k in expected}, strict=True)
    return module


def check_state(state: dict[str, Tensor], expected: dict[str, Tensor], path: Path, owner: str,
                ignorable: set[str] = frozenset()) -> None:
    """Raise :class:`UserError` naming the missing, unexpected or mis-shaped keys of ``state``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(ignorable))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise UserError(f"{path} does not match {owner}: {'; '.join(parts)}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise UserError(
                f"{path}: key '{key}' has shape {list(state[key].shape)}, expected {list(value.shape)}"
            )


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def skipped_init(library: str = "diffusers") -> AbstractContextManager[None]:
    """The library's own switch that skips random initialisation while a model is constructed.

    Every parameter is overwritten from the checkpoint right after, so drawing random weights first
    only costs time (≈7 s for a Stable Diffusion UNet on a CPU). The diffusers switch covers any module
    built from ``torch.nn`` layers; transformers models also need their ``init_weights`` skipped.
    """
    if library == "transformers":
        require("transformers")
        try:
            from transformers.initialization import no_init_weights  # transformers >= 5
        except ImportError:
            from transformers.modeling_utils import no_init_weights  # transformers 4.x
        return no_init_weights()
    require("diffusers")
    from diffusers.models.modeling_utils import no_init_weights

    return no_init_weights()


def load_module(
    build: Callable[[], nn.Module],
    weights: Path,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    library: str = "diffusers",
) -> nn.Module:
    """Construct ``build()`` on ``device`` without random initialisation, then load ``weights`` strictly.

    Returns the module cast to ``dtype``, in eval mode and frozen.
    """
    with torch.device(device), skipped_init(library):
        module = build()
    # torch's own cast: diffusers' ModelMixin.to logs a warning on every dtype cast
    module = nn.Module.to(module, device=device, dtype=dtype)
    load_weights(module, weights)
    return module.eval().requires_grad_(False)


def build_model(
    model_dir: Path, component: str, *, device: torch.device | str, dtype: torch.dtype
) -> nn.Module:
    """Build a whitelisted diffusers/transformers model from its config and load its safetensors weights."""
    library, class_name = read_model_index(model_dir).get(component, ("", ""))
    if (library, class_name) not in MODEL_CLASSES:
        known = ", ".join(sorted(c for _, c in MODEL_CLASSES))
        raise UserError(f"component '{component}' of {model_dir} is {class_name or 'absent'}; supported: {known}")
    folder = model_dir / component
    config = read_json(folder / "config.json")
    weights = weights_file(folder)
    cls = getattr(require(library), class_name)
    if library == "diffusers":
        build = lambda: cls.from_config(config)  # noqa: E731
    else:
        build = lambda: cls(cls.config_class.from_dict(config))  # noqa: E731
    return load_module(build, weights, device=device, dtype=dtype, library=library)


def load_image_processor(model_dir: Path, component: str = "feature_extractor") -> Any:
    """The CLIP image processor from its JSON config (PIL-based, as the reference pipelines use)."""
    transformers = require("transformers")
    if not (model_dir / component / "preprocessor_config.json").is_file():
        raise UserError(f"missing file {model_dir / component / 'preprocessor_config.json'}")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls.from_pretrained(str(model_dir / component))


def noise_schedule(model_dir: Path) -> tuple[dict[str, Any], Tensor]:
    """The scheduler config and its ᾱ_t (float64), validated to be a discrete ε-prediction schedule.

    Only ``scaled_linear`` betas with epsilon prediction are accepted: that is what every supported
    teacher was trained with and what the DDIM sampler and inversion of the SIR loop assume.
    """
    path = model_dir / "scheduler" / "scheduler_config.json"
    config = read_json(path)
    checks = [
        (config.get("beta_schedule") == "scaled_linear", f"beta_schedule {config.get('beta_schedule')!r}"),
        (config.get("prediction_type", "epsilon") == "epsilon", f"prediction_type {config.get('prediction_type')!r}"),
        (not config.get("trained_betas"), "trained_betas"),
        (not config.get("rescale_betas_zero_snr", False), "rescale_betas_zero_snr"),
        (str(config.get("_class_name", "DDIMScheduler")).endswith("Scheduler"), f"class {config.get('_class_name')!r}"),
    ]
    for ok, what in checks:
        if not ok:
            raise UserError(f"{path}: unsupported {what} (need a DDIM-compatible scaled_linear epsilon schedule)")
    return config, schedule_alphas_cumprod(config, path)


def schedule_alphas_cumprod(config: dict[str, Any], path: Path) -> Tensor:
    """ᾱ_t, t = 0..T-1 (float64), of a scheduler config's ``linear`` or ``scaled_linear`` betas.

    ``linear`` spaces beta itself evenly from beta_start to beta_end; ``scaled_linear`` spaces sqrt(beta)
    and squares (spec §0.1). Other schedules, trained betas and a zero-terminal-SNR rescale are refused.
    """
    schedule = config.get("beta_schedule", "linear")
    if schedule not in ("linear", "scaled_linear") or config.get("trained_betas"):
        raise UserError(f"{path}: unsupported beta_schedule {schedule!r} (need linear or scaled_linear betas)")
    if config.get("rescale_betas_zero_snr", False):
        raise UserError(f"{path}: unsupported rescale_betas_zero_snr")
    steps = int(config.get("num_train_timesteps", 1000))
    beta_start, beta_end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if steps < 2 or not 0.0 < beta_start < beta_end < 1.0:
        raise UserError(f"{path}: bad schedule (num_train_timesteps {steps}, betas {beta_start}..{beta_end})")
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    else:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)
