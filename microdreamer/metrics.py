"""Image metrics for evaluation: PSNR and SSIM per image, for batches ``[B,C,H,W]`` with values in [0,1].

SSIM is the standard definition of Wang et al. (2004): an 11-tap Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, data range 1, population (not sample) statistics, averaged over the positions
where the window fits inside the image and over channels. Both metrics are computed in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        shapes = f"{tuple(a.shape)} and {tuple(b.shape)}"
        raise ValueError(f"expected two image batches [B,C,H,W] of one shape, got {shapes}")


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image ``[B]`` (data range 1; identical images give inf)."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(device: torch.device) -> Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    w = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return w / w.sum()


def _blur(x: Tensor, window: Tensor) -> Tensor:
    """Separable Gaussian filter over H and W of ``[N,1,H,W]``, keeping only fully covered positions."""
    x = F.conv2d(x, window.view(1, 1, -1, 1))
    return F.conv2d(x, window.view(1, 1, 1, -1))


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Structural similarity per image ``[B]`` (mean over valid window positions and channels)."""
    _check_pair(a, b)
    B, C, H, W = a.shape
    if min(H, W) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {H}x{W}")
    window = _gaussian_window(a.device)
    x = a.double().reshape(B * C, 1, H, W)
    y = b.double().reshape(B * C, 1, H, W)
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x**2
    var_y = _blur(y * y, window) - mu_y**2
    cov = _blur(x * y, window) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.reshape(B, C, -1).mean(dim=(1, 2))
