"""Tiny checkpoints in the real diffusers folder layout, built from the same classes as the real models.

They load through the same code path as the published weights (model_index.json, per-component
config.json, safetensors) but run in milliseconds on a CPU. Weights are random with a fixed seed.
"""

from __future__ import annotations

import functools
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


def tiny_unet(in_channels: int = 8, cross_attention_dim: int = TINY_CONTEXT, **options) -> nn.Module:
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
        **options,
    )


def tiny_clip_vision_config(projection_dim: int = TINY_CONTEXT, image_size: int = TINY_CLIP_IMAGE, patch_size: int = 8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
    )


def tiny_clip_vision(projection_dim: int = TINY_CONTEXT, with_projection: bool = True) -> nn.Module:
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    config = tiny_clip_vision_config(projection_dim)
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


def write_feature_extractor(root: Path, size: int = TINY_CLIP_IMAGE, folder: str = "feature_extractor") -> None:
    """The CLIP preprocessor config in the older style the published checkpoints use (size as an int), in
    ``root/folder``."""
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
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def write_image_processor(root: Path, folder: str, size: int, mean: list[float], std: list[float], resample: int) -> None:
    """A CLIPImageProcessor config in the newer style (shortest edge, crop height/width, explicit rescale)."""
    config = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": mean,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": std,
        "resample": resample,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


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
    return write_zero123(root, unet, vae, encoder, projection, clip_image_size=TINY_CLIP_IMAGE)


def write_zero123(
    root: Path, unet: nn.Module, vae: nn.Module, encoder: nn.Module, projection: nn.Module, clip_image_size: int
) -> Path:
    """A Zero123 pipeline folder (spec §1.1) holding these modules, of any size."""
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
        "embedding_dim": projection.proj.out_features,
        "additional_embeddings": projection.proj.in_features - projection.proj.out_features,
    }
    save_component(root, "clip_camera_projection", projection, projection_config, "diffusion_pytorch_model.safetensors")
    write_scheduler(root)
    write_feature_extractor(root, clip_image_size)
    return root


# ---------------------------------------------------------------------------------------------------------
# MVDream / ImageDream (spec §2, §3): multi-view UNet, SD-2.1 text encoder + CLIP tokenizer, ImageDream's
# CLIP vision tower

#: the tiny multi-view UNet: SD-2.1 layout at 2 levels, 16-channel heads, text context 32
TINY_MV_UNET = {
    "_class_name": "MultiViewUNetModel",
    "_diffusers_version": "0.25.0",
    "image_size": TINY_LATENT,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": 1,
    "attention_resolutions": [1, 2],
    "channel_mult": [1, 2],
    "num_head_channels": 16,
    "context_dim": TINY_CONTEXT,
    "transformer_depth": 1,
    "camera_dim": 16,
}
#: ImageDream adds image-prompt tokens; the resampler reads the tiny CLIP vision tower's hidden states
TINY_IP_UNET = {
    **TINY_MV_UNET,
    "ip_dim": 4,
    "ip_embedding_dim": 32,
    "ip_resampler_depth": 1,
    "ip_resampler_heads": 2,
    "ip_resampler_head_dim": 8,
}
#: a few BPE merges so that common letter pairs become single tokens
TINY_MERGES = ("t h", "o r", "th e</w>", "a t</w>", "c at</w>")


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes that byte-level BPE uses, in byte order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, …) are shifted to
    code points 256 and up, in increasing byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiny_tokenizer(root: Path, folder: str = "tokenizer") -> int:
    """``root/folder``: a byte-level CLIP BPE vocabulary (single bytes, their word-final forms, a few
    merges, the two special tokens) with the SD-2.1 settings (77 tokens, pad "!"). Returns the vocab size."""
    symbols = byte_symbols()
    symbols = [s for s in symbols if ord(s) < 256] + [s for s in symbols if ord(s) >= 256]  # "!" gets id 0
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    folder = root / folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def tiny_clip_text(vocab_size: int) -> nn.Module:
    from transformers import CLIPTextModel

    return CLIPTextModel(tiny_clip_text_config(vocab_size))


def tiny_clip_text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_CONTEXT,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=TINY_CONTEXT,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=0,
    )


#: the published CLIP checkpoints' input size; a tiny CLIP reads it in 7×7 patches
CLIP_IMAGE = 224


def build_tiny_clip(root: Path, seed: int = 0, shard_size: str | None = None) -> Path:
    """A tiny ``transformers.CLIPModel`` in the layout of the Hugging Face CLIP repositories: ``config.json`` and
    ``model.safetensors`` as ``save_pretrained`` writes them (``shard_size``: split into shards with their
    ``model.safetensors.index.json``), the published ``preprocessor_config.json`` (224 pixels) and the
    tokenizer files beside them."""
    from transformers import CLIPConfig, CLIPModel

    vocab_size = write_tiny_tokenizer(root, folder="")
    config = CLIPConfig(
        text_config=tiny_clip_text_config(vocab_size).to_dict(),
        vision_config=tiny_clip_vision_config(image_size=CLIP_IMAGE, patch_size=32).to_dict(),
        projection_dim=TINY_CONTEXT,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(root, **({} if shard_size is None else {"max_shard_size": shard_size}))
    write_feature_extractor(root, CLIP_IMAGE, folder="")
    return root


def tiny_mv_unet(config: dict) -> nn.Module:
    from microdreamer.teachers.mv_unet import MultiViewUNet, MultiViewUNetConfig

    return MultiViewUNet(MultiViewUNetConfig.from_dict(config))


def build_tiny_mvdream(root: Path, seed: int = 0, image_prompt: bool = False) -> Path:
    """A tiny MVDream (or, with ``image_prompt``, ImageDream) pipeline folder in the layout of spec §2.1 / §3.1.

    The camera embedding's first layer is enlarged so that the view visibly changes the output.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_mv_unet(TINY_IP_UNET if image_prompt else TINY_MV_UNET)
        with torch.no_grad():
            unet.camera_embed[0].weight.mul_(4.0)
        vae = tiny_vae()
        vocab_size = write_tiny_tokenizer(root)
        text_encoder = tiny_clip_text(vocab_size)
        image_encoder = tiny_clip_vision(with_projection=False) if image_prompt else None
    return write_mvdream(root, unet, TINY_IP_UNET if image_prompt else TINY_MV_UNET, vae, text_encoder,
                         image_encoder, clip_image_size=TINY_CLIP_IMAGE)


def write_mvdream(
    root: Path,
    unet: nn.Module,
    unet_config: dict,
    vae: nn.Module,
    text_encoder: nn.Module,
    image_encoder: nn.Module | None,
    clip_image_size: int,
) -> Path:
    """An MVDream (ImageDream with an ``image_encoder``) pipeline folder (spec §2.1 / §3.1) holding these
    modules, of any size; the tokenizer is written separately (:func:`write_tiny_tokenizer`)."""
    image_prompt = image_encoder is not None
    image_components = (
        {"feature_extractor": ("transformers", "CLIPImageProcessor"), "image_encoder": ("transformers", "CLIPVisionModel")}
        if image_prompt
        else {"feature_extractor": (None, None), "image_encoder": (None, None)}
    )
    write_model_index(
        root,
        "MVDreamPipeline",
        {
            **image_components,
            "requires_safety_checker": False,
            "scheduler": ("diffusers", "DDIMScheduler"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "unet": ("mv_unet", "MultiViewUNetModel"),
            "vae": ("diffusers", "AutoencoderKL"),
        },
    )
    save_component(root, "unet", unet, unet_config, "diffusion_pytorch_model.safetensors")
    save_diffusers(root, "vae", vae)
    save_transformers(root, "text_encoder", text_encoder)
    if image_prompt:
        save_transformers(root, "image_encoder", image_encoder)
        write_feature_extractor(root, clip_image_size)
    write_scheduler(root)
    return root


#: an LGM small enough for CPU tests: 32² views → 16² splatter images, attention in the lowest level
TINY_LGM = dict(
    input_size=32, down_channels=(32, 32, 64), down_attention=(False, False, True),
    up_channels=(64, 32), up_attention=(True, False),
)


def write_lgm(folder: Path, network: nn.Module, filename: str = "model_fp16_fixrot.safetensors",
              dtype: torch.dtype = torch.float16) -> Path:
    """The published ``ashawkey/LGM`` layout: one safetensors file (fp16 by default) at the folder's top."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(folder / filename))
    return folder / filename


def build_tiny_lgm(folder: Path, seed: int = 0) -> Path:
    """A folder holding a tiny LGM in the published file's layout and the ``config.json`` that describes it
    (the published repository has none: its network is "big")."""
    from microdreamer.reconstructors.lgm_unet import LGMConfig, LGMNetwork

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = LGMNetwork(LGMConfig(**TINY_LGM)).eval()
    write_lgm(folder, network)
    (folder / "config.json").write_text(json.dumps(TINY_LGM))
    return folder


# ---------------------------------------------------------------------------------------------------------
# Zero123++ v1.1 (spec §4): SD-2-style UNet with linear projections, SD-2 text encoder + tokenizer, CLIP
# vision tower with projection, two image processors, the Euler-ancestral v-prediction scheduler and the
# ramping coefficients in model_index.json

#: spec §4.2, the scheduler config shipped with Zero123++ v1.1
ZERO123PLUS_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.17.1",
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
#: the tiny VAE processor's crop (reference latents 8×8); the real one crops 512² (spec §4.1)
TINY_VAE_IMAGE = 16


def tiny_ramp(seed: int = 0, tokens: int = 77) -> list[float]:
    """Ramping coefficients of the tiny model: 0 for the start token (as in v1.1), then draws in [0.1, 0.6)."""
    g = torch.Generator().manual_seed(seed)
    return [0.0] + (0.1 + 0.5 * torch.rand(tokens - 1, generator=g, dtype=torch.float64)).tolist()


def build_tiny_zero123plus(root: Path, seed: int = 0) -> Path:
    """A tiny Zero123++ v1.1 folder with the layout and class names of spec §4.1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_unet(in_channels=4, use_linear_projection=True)
        vae = tiny_vae()
        vocab_size = write_tiny_tokenizer(root)
        text_encoder = tiny_clip_text(vocab_size)
        vision_encoder = tiny_clip_vision()
    return write_zero123plus(root, unet, vae, text_encoder, vision_encoder, tiny_ramp(seed),
                             clip_image_size=TINY_CLIP_IMAGE, vae_image_size=TINY_VAE_IMAGE)


def write_zero123plus(
    root: Path,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    vision_encoder: nn.Module,
    ramp: list[float],
    clip_image_size: int,
    vae_image_size: int,
) -> Path:
    """A Zero123++ v1.1 folder (spec §4.1) holding these modules, of any size; the tokenizer is written
    separately (:func:`write_tiny_tokenizer`)."""
    write_model_index(
        root,
        "Zero123PlusPipeline",
        {
            "feature_extractor_clip": ("transformers", "CLIPImageProcessor"),
            "feature_extractor_vae": ("transformers", "CLIPImageProcessor"),
            "ramping_coefficients": list(ramp),
            "safety_checker": (None, None),
            "scheduler": ("diffusers", "EulerAncestralDiscreteScheduler"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            "vision_encoder": ("transformers", "CLIPVisionModelWithProjection"),
        },
    )
    save_diffusers(root, "unet", unet)
    save_diffusers(root, "vae", vae)
    save_transformers(root, "text_encoder", text_encoder)
    save_transformers(root, "vision_encoder", vision_encoder)
    write_image_processor(root, "feature_extractor_clip", clip_image_size, CLIP_MEAN, CLIP_STD, resample=3)
    write_image_processor(root, "feature_extractor_vae", vae_image_size, [0.5] * 3, [0.8] * 3, resample=2)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(ZERO123PLUS_SCHEDULER, indent=2))
    return root


# ---------------------------------------------------------------------------------------------------------
# LPIPS: torchvision's vgg16 state dict and lpips' v0.1 heads (full-size VGG16 features; random weights)


def lpips_vgg16() -> dict[str, torch.Tensor]:
    """A vgg16 state dict as torchvision names it: features.<i>.weight/bias at the convolutions' indices, and
    classifier.* tensors (small here: the loader must ignore them). A fresh dict of the same tensors each call."""
    return dict(_vgg16_tensors())


@functools.lru_cache(maxsize=1)
def _vgg16_tensors() -> dict[str, torch.Tensor]:
    from microdreamer.metrics_lpips import VGG16

    g = torch.Generator().manual_seed(0)
    state, index, channels = {}, 0, 3
    for width in VGG16:
        if width == "M":
            index += 1
            continue
        fan_in = channels * 9
        state[f"features.{index}.weight"] = torch.randn(width, channels, 3, 3, generator=g) * (2 / fan_in) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(width, generator=g) * 0.01
        index += 2
        channels = width
    for i in (0, 3, 6):
        state[f"classifier.{i}.weight"], state[f"classifier.{i}.bias"] = torch.zeros(2, 2), torch.zeros(2)
    return state


def lpips_heads(seed: int = 1) -> dict[str, torch.Tensor]:
    """lpips' v0.1 VGG heads (non-negative, as the published ones)."""
    from microdreamer.metrics_lpips import CHANNELS

    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS)}


def write_lpips_weights(folder: Path) -> tuple[Path, Path]:
    """The two files LPIPS reads, in their published names and formats (torch pickles of tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(lpips_vgg16(), folder / "vgg16-397923af.pth")
    torch.save(lpips_heads(), folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth"


def prepare_tiny_conditions(root: Path) -> Path:
    """``root/data``: three condition images `distill prepare` made from RGBA pictures (``root/pictures``) of
    coloured boxes."""
    import numpy as np

    from microdreamer.distill.data import prepare_conditions
    from microdreamer.io.images import save_image

    g = np.random.default_rng(0)
    for i in range(3):
        rgba = np.zeros((40, 40, 4), np.uint8)
        rgba[8 + i : 30, 10 : 28 + i, :3] = g.integers(0, 256, 3)
        rgba[8 + i : 30, 10 : 28 + i, 3] = 255
        save_image(root / "pictures" / f"p{i}.png", rgba)
    prepare_conditions([root / "pictures"], root / "data")
    return root / "data"


# ---------------------------------------------------------------------------------------------------------
# GECO: a tiny Stage I run and a small LGM

#: an LGM for 16² inputs: 8² splatter images per view
SMALL_LGM = dict(input_size=16, down_channels=(32, 32, 64), down_attention=(False, False, True),
                 up_channels=(64, 32), up_attention=(True, False))


def build_tiny_stage1_world(root: Path) -> dict[str, Path]:
    """Condition images (``data``), a tiny Zero123++, a one-step Stage I run on it (``stage1``, views of 8²) and a
    small LGM (``lgm``: :data:`SMALL_LGM`, weights from seed 0, its config.json beside them)."""
    from microdreamer.distill.config import Stage1Config
    from microdreamer.distill.stage1 import run_stage1
    from microdreamer.reconstructors.lgm_unet import LGMConfig, LGMNetwork

    prepare_tiny_conditions(root)
    zero123plus = build_tiny_zero123plus(root / "zero123plus")
    run_stage1(Stage1Config(data=str(root / "data"), model=str(zero123plus), view_size=8, steps=1, validate_every=0,
                            device="cpu", lr_generator=1e-3, lr_student=1e-3), root / "stage1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        write_lgm(root / "lgm", LGMNetwork(LGMConfig(**SMALL_LGM)))
    (root / "lgm" / "config.json").write_text(json.dumps(SMALL_LGM))
    return {"data": root / "data", "stage1": root / "stage1", "lgm": root / "lgm", "root": root}
