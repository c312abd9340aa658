"""Tolerances for comparing floating-point results, derived from rounding error, not picked to pass.

Two results of one mathematical computation evaluated along different paths (a batch of 8 against two
batches of 4, views in another order, a C++ kernel against the PyTorch reference, another CPU) differ by
rounding alone, and the rounding depends on the path: BLAS and oneDNN choose kernels by shape and CPU
(AVX2 or AVX-512 blocking, FMA contraction), PyTorch switches convolution algorithms with the batch size
(Winograd in NNPACK from a batch of 16 without oneDNN). The error one path shows on one machine is no bound
for another. The tests therefore bound each result's distance from the exact value and compare two
results with the sum of their bounds (:func:`assert_within`), using one of:

* :func:`rounding_bound`, a priori. Probabilistic rounding-error analysis (Higham & Mary, SIAM J. Sci.
  Comput. 2019): a sum of ``n`` terms computed with unit roundoff ``u`` is off by at most
  ``λ·√n·u·Σ|terms|`` except with probability about ``2·exp(−λ²/2)``; with ``λ = 6`` (3·10⁻⁸ per
  element) no comparison in the suite expects to see a single violation. ``ops`` dependent roundings in
  sequence add up.
* :func:`network_bound`, the same for a network of linear and convolution layers with normalised
  activations: every layer is a sum over its longest reduction (``C_in·k_h·k_w`` or ``in_features``) and
  the errors of the ``L`` layers add in quadrature (normalisation keeps each layer's gain near 1), so
  ``λ·u·√(reduction·L)·max|output|``. On the suite's tiny UNets this is ≈ 1100·eps32 of the output's
  magnitude; measured float32 errors are 6–14 eps32 with oneDNN and up to 41 eps32 with NNPACK's
  Winograd convolutions.
* :func:`calibrated_bound`, for computations without a useful a priori count (the rasterizer's
  compositing, its gradients): :data:`PATHS` times the float32 reference path's own distance from its
  float64 evaluation, measured on the same data.

Classifier-free guidance ``eps_u + s·(eps_c − eps_u) = (1 − s)·eps_u + s·eps_c`` multiplies the
branches' errors by :func:`guidance_gain`. Comparisons of *structure* (does this code compute that
formula?) run in float64 where the code allows it, with the same bounds at ``u = 2⁻⁵³``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

EPS32 = torch.finfo(torch.float32).eps  # 2⁻²³, the float32 unit roundoff is EPS32 / 2
LAMBDA = 6.0  # confidence of the probabilistic bound: 2·exp(−λ²/2) ≈ 3·10⁻⁸ per compared element
PATHS = 16  # another kernel path's error over the measured one: ≤ 9× seen (Winograd vs oneDNN convolutions)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def guidance_gain(scale: float) -> float:
    """How much ``eps_u + s·(eps_c − eps_u)`` amplifies errors of its branches: ``|1 − s| + |s|``."""
    return abs(1 - scale) + abs(scale)


def rounding_bound(magnitude: float, n: int = 1, ops: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Rounding error of ``ops`` dependent steps, each a sum of ``n`` terms whose absolute values add up to
    at most ``magnitude``: ``ops·λ·√n·u·magnitude``."""
    return ops * LAMBDA * math.sqrt(n) * unit_roundoff(dtype) * magnitude


def network_shape(module: nn.Module) -> tuple[int, int]:
    """(longest reduction of one layer, number of linear/convolution layers) of ``module``."""
    reduction, layers = 1, 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            reduction = max(reduction, m.in_channels // m.groups * math.prod(m.kernel_size))
        elif isinstance(m, nn.Linear):
            reduction = max(reduction, m.in_features)
        else:
            continue
        layers += 1
    return reduction, layers


def network_bound(magnitude: float, *modules: nn.Module, dtype: torch.dtype = torch.float32) -> float:
    """Rounding error of one forward pass through ``modules`` (in sequence) whose output is at most
    ``magnitude``: ``λ·u·√(reduction·layers)·magnitude`` (module docstring)."""
    shapes = [network_shape(m) for m in modules]
    reduction, layers = max(r for r, _ in shapes), sum(n for _, n in shapes)
    return LAMBDA * unit_roundoff(dtype) * math.sqrt(reduction * layers) * magnitude


def calibrated_bound(reference32: Tensor, reference64: Tensor) -> float:
    """:data:`PATHS` times the float32 reference path's distance from its float64 evaluation (at least
    one rounding of the largest value, so that an exact reference does not give a zero bound)."""
    measured = (reference32.double() - reference64).abs().max().item()
    return PATHS * max(measured, rounding_bound(reference64.abs().max().item()))


def to_float64(value):
    """Floating tensors (also inside dicts, lists and tuples) as float64, anything else as it is."""
    if torch.is_tensor(value):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_float64(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float64(v) for v in value)
    return value


def assert_within(actual: Tensor, expected: Tensor, bound: float, what: str = "") -> None:
    """``max|actual − expected| ≤ bound``, the failure saying by how much (in units of the bound)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert error <= bound, f"{what}: max error {error:.3g} is {error / bound:.3g}× the bound {bound:.3g}"


def printed(decimals: int) -> float:
    """How far a value quoted to ``decimals`` decimals (a spec's table) can be from the exact one."""
    return 0.5 * 10.0**-decimals


#: relative error of diffusers' float32 ᾱ table: a product of up to 1000 factors 1 − β, β a float32
#: linspace squared: 3 roundings per factor
ALPHAS32_RTOL = rounding_bound(1.0, n=1000, ops=3)
