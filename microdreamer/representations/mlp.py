"""threestudio's ``VanillaMLP``: bias-free linear layers with ReLU between them, weights drawn from a generator.

The layers sit in ``layers`` (``nn.Sequential``: linear, ReLU, linear, …), so state-dict names are
``layers.0.weight``, ``layers.2.weight``, … as in threestudio checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class VanillaMLP(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, width: int, hidden_layers: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        dims = [dim_in] + [width] * hidden_layers + [dim_out]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b, bias=False))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default ``nn.Linear`` initialisation, U(±1/√fan_in), drawn from ``generator``."""
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                draw = torch.rand(layer.weight.shape, generator=generator, device=generator.device)
                layer.weight.copy_((draw * 2 - 1) * bound)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
