"""CLIP similarity (Radford et al. 2021) with a checkpoint the user points to, as MicroDreamer scores its results
(Table III): images and texts are embedded by a ``transformers.CLIPModel``, the embeddings L2-normalised, and two
are compared by their dot product (cosine similarity, 1 for identical inputs).

No weights ship with microdreamer (the paper's are ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``, 10 GB). A model is a
folder in the Hugging Face transformers layout, or a Hugging Face id resolved through the local cache and downloaded
on first use when allowed, as the teachers are (:func:`~microdreamer.teachers.loading.resolve_model_dir`). It holds
``config.json`` (model_type ``clip``), ``model.safetensors`` or shards named by ``model.safetensors.index.json``,
``preprocessor_config.json`` and, to read prompts, the tokenizer (``vocab.json`` and ``merges.txt``, or
``tokenizer.json``). The model is built from its config and loaded from safetensors only, strictly; pickled weights
(``pytorch_model.bin``, open_clip's ``.bin``) are refused and nothing from the checkpoint runs.

Images go through the checkpoint's image processor, the image half of ``CLIPProcessor`` (PIL, no torchvision):
8-bit RGB resized so that its shortest edge is 224 (bicubic), centre-cropped to 224², scaled to [0, 1] and
normalised by the OpenAI mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258, 0.27577711),
the numbers its ``preprocessor_config.json`` holds. Prompts are tokenised up to the text encoder's length (77).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .errors import UserError
from .teachers.loading import (
    load_image_processor, load_module, read_json, require, resolve_dtype, resolve_model_dir, weights_file,
)

#: the checkpoint MicroDreamer's evaluation used
PAPER_MODEL = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
#: files a CLIP folder must hold; what else is fetched with them (tokenizer and processor JSON, the weights)
REQUIRED = ("config.json", "preprocessor_config.json")
FETCHED = ("*.json", "merges.txt", "model*.safetensors")
#: the tokenizer's files, either set
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
ADVICE = (
    f"download a CLIP checkpoint in the transformers layout (the paper's: {PAPER_MODEL}) on a connected machine "
    "and pass its folder, or point HF_HOME at a Hugging Face cache that holds it"
)


def find_clip(
    model: str | Path, *, text: bool, allow_download: bool = True, cache_dir: str | Path | None = None
) -> Path:
    """The folder of CLIP checkpoint ``model`` (a folder or a Hugging Face id), checked to hold what the similarity
    reads (the tokenizer too when ``text``) before anything loads; a one-line :class:`UserError` otherwise."""
    folder = resolve_model_dir(model, allow_download=allow_download, cache_dir=cache_dir, files=REQUIRED,
                               advice=ADVICE, fetch_also=FETCHED)
    kind = read_json(folder / "config.json").get("model_type")
    if kind != "clip":
        raise UserError(f"{folder} holds a {kind or 'model without a model_type'!r} model, not CLIP (config.json "
                        f"model_type 'clip'); {ADVICE}")
    weights_file(folder)  # the safetensors weights are there (pickles are refused)
    if text and not any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES):
        raise UserError(f"{folder} has no tokenizer (vocab.json and merges.txt, or tokenizer.json) to read the "
                        "prompt; use the whole checkpoint")
    return folder


class ClipSimilarity:
    """A loaded CLIP model: unit image and text embeddings (float32) and their cosine similarities."""

    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any | None) -> None:
        self.model = model  # transformers.CLIPModel
        self.processor = processor
        self.tokenizer = tokenizer

    @classmethod
    def load(
        cls, folder: Path, device: torch.device | str, *, text: bool = False, dtype: str = "auto"
    ) -> "ClipSimilarity":
        """The checkpoint in ``folder`` (see :func:`find_clip`); ``text`` loads its tokenizer too. ``auto`` dtype is
        fp16 on CUDA, fp32 elsewhere."""
        transformers = require("transformers")
        config = transformers.CLIPConfig.from_dict(read_json(folder / "config.json"))
        model = load_module(lambda: transformers.CLIPModel(config), weights_file(folder), device=device,
                            dtype=resolve_dtype(dtype, device), library="transformers")
        processor = load_image_processor(folder, "")
        crop, size = processor.crop_size, config.vision_config.image_size
        if (crop["height"], crop["width"]) != (size, size):
            raise UserError(f"{folder / 'preprocessor_config.json'} crops {crop['height']}x{crop['width']} but the "
                            f"model reads {size}x{size} images; the files are from different checkpoints")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder)) if text else None
        return cls(model, processor, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def pixel_values(self, images: np.ndarray) -> Tensor:
        """The model's input ``[B,3,S,S]`` (float32, on the CPU) of RGB images ``uint8 [B,H,W,3]``."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB images [B,H,W,3], got {images.dtype} {images.shape}")
        pixels = self.processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
        return torch.as_tensor(np.asarray(pixels["pixel_values"]), dtype=torch.float32)

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray) -> Tensor:
        """Unit embeddings ``[B,D]`` of RGB images, ``uint8 [B,H,W,3]``."""
        pixels = self.pixel_values(images).to(self.device, self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> Tensor:
        """The unit embedding ``[1,D]`` of ``prompt`` (cut at the text encoder's length)."""
        if self.tokenizer is None:
            raise ValueError("this CLIP model was loaded without its tokenizer (load it with text=True)")
        length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer([prompt], truncation=True, max_length=length, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)


def load_clip(
    model: str | Path, device: torch.device | str, *, text: bool, allow_download: bool = True
) -> ClipSimilarity:
    """:func:`find_clip`, then :meth:`ClipSimilarity.load`."""
    return ClipSimilarity.load(find_clip(model, text=text, allow_download=allow_download), device, text=text)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities ``[B]`` of unit embeddings ``a [B,D]`` with one unit embedding ``b [1,D]``."""
    return (a * b).sum(-1)
