"""PSNR and SSIM against scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microdreamer.metrics import psnr, ssim

skm = pytest.importorskip("skimage.metrics")


def _pair(seed: int, b: int = 3, h: int = 24, w: int = 20):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(b, 3, h, w, generator=g)
    # a structured image plus noise of different strength per image
    noise = torch.randn(b, 3, h, w, generator=g) * torch.tensor([0.02, 0.1, 0.3]).view(b, 1, 1, 1)
    return a, (a + noise).clamp(0, 1)


def _sk_ssim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([
        skm.structural_similarity(
            x.permute(1, 2, 0).double().numpy(), y.permute(1, 2, 0).double().numpy(), gaussian_weights=True,
            sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1,
        )
        for x, y in zip(a, b)
    ])


def test_ssim_matches_skimage():
    a, b = _pair(0)
    ours = ssim(a, b)
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours.numpy(), _sk_ssim(a, b), atol=1e-4)
    assert ours[0] > ours[1] > ours[2]


def test_ssim_smooth_images_and_identity():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    a = torch.stack([xx, yy, xx * yy]).unsqueeze(0)
    b = (a * 0.8 + 0.1).clamp(0, 1)
    np.testing.assert_allclose(ssim(a, b).numpy(), _sk_ssim(a, b), atol=1e-4)
    assert torch.allclose(ssim(a, a), torch.ones(1, dtype=torch.float64))


def test_psnr_matches_skimage():
    a, b = _pair(1)
    expected = [
        skm.peak_signal_noise_ratio(x.double().numpy(), y.double().numpy(), data_range=1.0) for x, y in zip(a, b)
    ]
    np.testing.assert_allclose(psnr(a, b).numpy(), expected, atol=1e-4)
    assert psnr(a, a).isinf().all()


def test_errors():
    a, b = _pair(2)
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, b[:2])
    with pytest.raises(ValueError, match="at least"):
        ssim(a[..., :8, :8], b[..., :8, :8])
