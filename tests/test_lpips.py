"""LPIPS without torchvision: random weights written in torchvision's vgg16 and lpips' v0.1 layouts load
strictly, and the distance equals a plain functional computation of LPIPS from the same tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from microdreamer.errors import UserError
from microdreamer.metrics_lpips import LPIPS, SCALE, SHIFT
from tiny_models import lpips_heads, lpips_vgg16, write_lpips_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    return write_lpips_weights(tmp_path_factory.mktemp("lpips"))


def _reference(vgg: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written out: scaling layer on [−1, 1] inputs, VGG16 convolutions by index, taps after relu1_2,
    relu2_2, relu3_3, relu4_3, relu5_3, channel normalisation, weighted squared differences, spatial mean."""
    shift, scale = torch.tensor(SHIFT).view(1, 3, 1, 1), torch.tensor(SCALE).view(1, 3, 1, 1)

    def taps(image):
        h = ((2 * image - 1) - shift) / scale
        out, index = [], 0
        for block in ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)):
            if index:
                h = F.max_pool2d(h, 2)
            for i in block:
                h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            index += 1
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        total = total + ((a - b) ** 2 * heads[f"lin{k}.model.1.weight"]).sum(1).mean(dim=(1, 2))
    return total


def test_published_layouts_load_strictly_and_the_distance_is_lpips(files):
    model = LPIPS.from_files(*files)
    assert sorted(model.state_dict()) == sorted(
        [f"vgg.{k}" for k in lpips_vgg16() if k.startswith("features.")] + list(lpips_heads())
    )
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        d = model(x, y)
        expected = _reference(lpips_vgg16(), lpips_heads(), x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, expected, rtol=1e-4, atol=1e-6)  # the same float32 ops in another order
    assert torch.equal(model(x, x), torch.zeros(2))
    torch.testing.assert_close(model(y, x), d)
    x.requires_grad_(True)
    model(x, y).sum().backward()  # usable as a loss
    assert x.grad.abs().max() > 0


def test_wrong_weight_files_are_one_line(files, tmp_path):
    vgg, heads = files
    with pytest.raises(UserError, match="LPIPS needs torchvision's VGG16 ImageNet weights.*not found"):
        LPIPS.from_files(tmp_path / "missing.pth", heads)
    broken = lpips_vgg16()
    del broken["features.28.bias"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"missing torchvision's vgg16 features.28.bias") as info:
        LPIPS.from_files(tmp_path / "broken.pth", heads)
    assert "\n" not in str(info.value)
    wrong = {**lpips_heads(), "lin2.model.1.weight": torch.rand(1, 8, 1, 1)}
    torch.save(wrong, tmp_path / "heads.pth")
    with pytest.raises(UserError, match=r"lin2.model.1.weight has shape \(1, 8, 1, 1\), expected \(1, 256, 1, 1\)"):
        LPIPS.from_files(vgg, tmp_path / "heads.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a readable lpips heads weights file"):
        LPIPS.from_files(vgg, tmp_path / "junk.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # weights_only refuses objects
    with pytest.raises(UserError, match="not a readable"):
        LPIPS.from_files(vgg, tmp_path / "pickled.pth")
