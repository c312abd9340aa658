"""The representation seam: what the SIR loop needs from a 3D representation.

The loop only renders, back-propagates an image loss and calls ``step``; a representation owns its
parameters, optimiser, learning-rate schedule and any structural updates (densification for
Gaussians, occupancy-grid updates for a NeRF).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from ..render.types import RenderOutput
from ..sir.cameras import Cameras

if TYPE_CHECKING:
    from ..export.extract import DensityGrid


class Representation(ABC):
    #: the most pixels one optimisation step should render (0: whole images); a representation with a
    #: budget renders random pixel subsets through :meth:`render_pixels`
    pixel_budget: int = 0
    #: whether :meth:`colour` gives the colour renders show at a surface point (a NeRF's colour field); an
    #: exported mesh's texture is sampled from it, else baked from renders
    colour_field: bool = False

    @abstractmethod
    def render(self, cameras: Cameras, background: Tensor) -> RenderOutput:
        """Differentiable renders of ``cameras`` over ``background`` ([3] in [0,1])."""

    def render_pixels(self, cameras: Cameras, background: Tensor, pixels: Tensor) -> RenderOutput:
        """Renders of the pixels ``pixels [B,P]`` (row-major flat indices per camera) as ``[B,C,1,P]`` images."""
        raise NotImplementedError(f"{type(self).__name__} renders whole images only")

    def new_iteration(self, cameras: Cameras, background: Tensor) -> Tensor | None:
        """An SIR iteration begins: all its renders of ``cameras`` fit one target, so anything random in how
        they are composited (a NeRF's background augmentation) is drawn here, once. Returns the backgrounds
        ``[B,3,H,W]`` those renders are composited over when they are not ``background`` (a learned
        environment map, a random colour), else None."""
        return None

    @abstractmethod
    def step(self, step: int, output: RenderOutput) -> None:
        """After ``loss.backward()``: optimiser step, zero grads, schedules and structure updates.

        ``step`` is the global optimisation-step counter; ``output`` is the render the loss came from.
        """

    @abstractmethod
    def finalize(self) -> None:
        """Clean-up after training (e.g. the final prune)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the representation in its standard file format."""

    @abstractmethod
    def density(self, points: Tensor) -> Tensor:
        """Density (opacity field) at world ``points [P,3]`` for mesh extraction."""

    @abstractmethod
    def density_grid(self, resolution: int, threshold: float) -> DensityGrid:
        """:meth:`density` on ``resolution³`` points spanning a cube around the object, for marching cubes
        at ``threshold``."""

    def colour(self, points: Tensor) -> Tensor:
        """Colour ``[P,3]`` in [0,1] at world ``points [P,3]`` (with :attr:`colour_field`)."""
        raise NotImplementedError(f"{type(self).__name__} has no colour field: its colours exist in renders")

    @property
    @abstractmethod
    def num_primitives(self) -> int:
        """Gaussians, grid cells, …: reported in run summaries."""
