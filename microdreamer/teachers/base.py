"""The teacher seam: what the SIR refiner needs from a diffusion model (or a ground-truth stand-in).

A teacher works in its own space (a VAE latent space, or pixels for the reference teacher):
``encode`` maps renders there, ``decode`` maps back, and ``predict_noise`` gives epsilon for B views
at one timestep. The refiner never looks inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..sir.cameras import Cameras

Branch = Literal["cond", "uncond", "guided"]


@dataclass
class Condition:
    """What a run is conditioned on: a reference image (with its camera), a prompt, or both."""

    image: Tensor | None = None  # [1,3,H,W] in [0,1], composited on the background
    mask: Tensor | None = None  # [1,1,H,W]
    prompt: str | None = None
    negative_prompt: str = ""
    elevation: float = 0.0  # the reference view's elevation (spec §0.4 convention)


@dataclass
class EvaluationCounter:
    """Network evaluations: one per forward pass; a guided pass evaluates both CFG branches at once."""

    guided: int = 0
    single: int = 0
    views: int = 0  # view-evaluations summed over passes (a guided pass of B views counts 2B)

    @property
    def total(self) -> int:
        return self.guided + self.single

    def add(self, branch: Branch, views: int) -> None:
        if branch == "guided":
            self.guided += 1
            self.views += 2 * views
        else:
            self.single += 1
            self.views += views

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "guided": self.guided, "single_branch": self.single, "view_evaluations": self.views}


class Teacher(ABC):
    """A (multi-view) diffusion model that predicts noise for B views of one object."""

    #: side of the square images the teacher works at (renders are resized to it)
    resolution: int = 256
    #: azimuth of the reference (input) view in the world convention of spec §0.4
    reference_azimuth: float = 0.0

    def __init__(self) -> None:
        self.evaluations = EvaluationCounter()

    @property
    @abstractmethod
    def alphas_cumprod(self) -> Tensor:
        """The training noise schedule ᾱ_t, t = 0..T-1 (float64)."""

    @abstractmethod
    def prepare(self, condition: Condition, generator: torch.Generator | None = None) -> None:
        """Compute and cache what the condition gives (embeddings, reference latents) for one run.

        ``generator`` is the run's: teachers that draw (e.g. a VAE posterior sample) draw from it.
        """

    @abstractmethod
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B,3,H,W]`` in [0,1], any size → teacher space at ``resolution`` (float32).

        Each teacher resizes the way its reference implementation does.
        """

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Teacher space → images ``[B,3,H,W]`` in [0,1]."""

    @abstractmethod
    def _eps(self, latents: Tensor, t: int, cameras: Cameras, branch: Branch, guidance_scale: float) -> Tensor:
        """Epsilon for ``latents`` at timestep ``t``; subclasses run their network here."""

    def set_backdrop(self, backdrop: Tensor | None) -> None:
        """The backgrounds ``[B,3,H,W]`` of the renders the next targets are for, when they are not the run's
        colour (None: they are). A diffusion model sees them in the renders it refines; only a teacher whose
        targets do not come from the renders (the reference stand-in) needs to be told."""

    def predict_noise(
        self, latents: Tensor, t: int, cameras: Cameras, branch: Branch = "guided", guidance_scale: float = 1.0
    ) -> Tensor:
        """Epsilon for B views (``cond``, ``uncond`` or classifier-free ``guided``), counted."""
        self.evaluations.add(branch, latents.shape[0])
        return self._eps(latents, t, cameras, branch, guidance_scale)

    @abstractmethod
    def latent_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of a batch in teacher space (for sampling from pure noise)."""


def guide(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: eps_u + s (eps_c − eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
