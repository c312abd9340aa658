"""Tiny checkpoints in the real diffusers folder layout, built from the same classes as the real models.

They load through the same code path as the published weights (model_index.json, per-component
config.json, safetensors) but run in milliseconds on a CPU. Weights are random with a fixed seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

#: spec §0.2, the DDIM config shipped with the Zero123 / MVDream / ImageDream checkpoints
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.24.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: tiny sizes: latents 4×8×8 ↔ images 16×16 (one VAE downsampling), CLIP 32² with projection 32
TINY_LATENT = 8
TINY_CONTEXT = 32
TINY_CLIP_IMAGE = 32


def tiny_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * TINY_LATENT,
        scaling_factor=0.18215,
    )


def tiny_unet(in_channels: int = 8, cross_attention_dim: int = TINY_CONTEXT) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_LATENT,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_clip_vision(projection_dim: int = TINY_CONTEXT, with_projection: bool = True) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_CLIP_IMAGE,
        patch_size=8,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
    )
    return (CLIPVisionModelWithProjection if with_projection else CLIPVisionModel)(config)


def tiny_camera_projection(dim: int = TINY_CONTEXT) -> nn.Module:
    from microdreamer.teachers.zero123 import CameraProjection

    return CameraProjection(dim, 4)


def write_model_index(root: Path, pipeline: str, components: dict[str, object]) -> None:
    """``model_index.json``: (library, class) pairs become lists, other values are written as given."""
    index = {"_class_name": pipeline, "_diffusers_version": "0.24.0"}
    index.update({name: list(v) if isinstance(v, tuple) else v for name, v in components.items()})
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def save_component(root: Path, name: str, module: nn.Module, config: dict, weights: str) -> Path:
    """``root/name/config.json`` and ``root/name/<weights>`` (safetensors) for one module."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(folder / weights))
    return folder


def save_diffusers(root: Path, name: str, module: nn.Module) -> Path:
    config = {"_class_name": type(module).__name__, "_diffusers_version": "0.24.0", **dict(module.config)}
    config = {k: v for k, v in config.items() if not k.startswith("_use_default")}
    return save_component(root, name, module, config, "diffusion_pytorch_model.safetensors")


def save_transformers(root: Path, name: str, module: nn.Module) -> Path:
    return save_component(root, name, module, module.config.to_dict(), "model.safetensors")


def write_scheduler(root: Path, **changes) -> None:
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER_CONFIG, **changes}, indent=2))


def write_feature_extractor(root: Path, size: int = TINY_CLIP_IMAGE) -> None:
    """The CLIP preprocessor config in the older style the published checkpoints use (size as an int)."""
    config = {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": size,
    }
    (root / "feature_extractor").mkdir(parents=True, exist_ok=True)
    (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def build_tiny_zero123(root: Path, seed: int = 0, projection_scale: float = 4.0) -> Path:
    """A tiny Zero123 pipeline folder with the layout and class names of spec §1.1.

    ``projection_scale`` enlarges the camera projection's weights so that the view embedding T visibly
    changes the UNet's output despite the random initialisation.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, encoder, projection = tiny_unet(), tiny_vae(), tiny_clip_vision(), tiny_camera_projection()
        with torch.no_grad():
            projection.proj.weight.mul_(projection_scale)
    write_model_index(
        root,
        "Zero123Pipeline",
        {
            "clip_camera_projection": ("zero123", "CLIPCameraProjection"),
            "feature_extractor": ("transformers", "CLIPImageProcessor"),
            "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
            "requires_safety_checker": False,
            "safety_checker": (None, None),
            "scheduler": ("diffusers", "DDIMScheduler"),
            "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
        },
    )
    save_diffusers(root, "unet", unet)
    save_diffusers(root, "vae", vae)
    save_transformers(root, "image_encoder", encoder)
    projection_config = {
        "_class_name": "CLIPCameraProjection",
        "_diffusers_version": "0.24.0",
        "embedding_dim": TINY_CONTEXT,
        "additional_embeddings": 4,
    }
    save_component(root, "clip_camera_projection", projection, projection_config, "diffusion_pytorch_model.safetensors")
    write_scheduler(root)
    write_feature_extractor(root)
    return root
