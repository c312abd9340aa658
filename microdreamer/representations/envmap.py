"""threestudio's ``neural-environment-map-background``: a learned colour per viewing direction.

Directions go through real spherical harmonics up to band 2 (tiny-cuda-nn's ``SphericalHarmonics`` of
degree 3: 9 values, same constants and signs), then a bias-free MLP 9 → 16 → 16 → 3 and a sigmoid.
During training, with probability ``random_aug`` the whole batch's background is one random colour
instead (threestudio's ``random_aug`` with ``share_aug_bg``), so the foreground cannot hide in it.
Directions are in our world frame (y up); threestudio's is z up, so its weights would see rotated inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .mlp import VanillaMLP


def spherical_harmonics(d: Tensor) -> Tensor:
    """The 9 real SH basis values of bands 0–2 at unit directions ``d [...,3]`` (tiny-cuda-nn's order)."""
    x, y, z = d.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y,
        0.48860251190291987 * z,
        -0.48860251190291987 * x,
        1.0925484305920792 * x * y,
        -1.0925484305920792 * y * z,
        0.94617469575755997 * zz - 0.31539156525251999,
        -1.0925484305920792 * x * z,
        0.54627421529603959 * xx - 0.54627421529603959 * yy,
    ], -1)


class EnvironmentMap(nn.Module):
    """Background colour ``[...,3]`` in (0, 1) for unit view directions ``[...,3]``."""

    def __init__(self, generator: torch.Generator | None = None, width: int = 16, hidden_layers: int = 2) -> None:
        super().__init__()
        self.network = VanillaMLP(9, 3, width, hidden_layers, generator)

    def forward(self, directions: Tensor) -> Tensor:
        return torch.sigmoid(self.network(spherical_harmonics(directions)))
