"""`eval --protocol geco`: GECO's 21 views (six Zero123++ viewpoints, 15 azimuths at elevation 0, the input
camera fixed at azimuth 0), PSNR, SSIM and LPIPS per view, per set and over all, on the bundled Spot mesh."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from microdreamer.api import evaluate_geco
from microdreamer.cli import main
from microdreamer.evaluate import reference_renders
from microdreamer.evaluate_geco import geco_cameras
from microdreamer.io.mesh import load_mesh
from microdreamer.metrics import psnr
from tiny_models import write_lpips_weights

pytestmark = pytest.mark.usefixtures("one_thread")

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"


def test_the_views_are_the_six_zero123plus_viewpoints_then_15_azimuths_at_elevation_0():
    cams = geco_cameras(radius=2.0, resolution=32, fovy=49.1)
    assert cams.elevation.tolist() == [-30.0, 20.0] * 3 + [0.0] * 15  # 30° above, 20° below by turns
    assert cams.azimuth.tolist() == [30.0 + 60.0 * k for k in range(6)] + [24.0 * k for k in range(15)]
    front = geco_cameras(radius=2.0, resolution=32).c2w[6]  # the input view: azimuth 0, elevation 0
    assert torch.allclose(front[:3, 3].double(), torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), atol=1e-6)


def test_a_mesh_scores_perfectly_against_itself_in_albedo_and_lower_lit_with_lpips(tmp_path):
    vgg, heads = write_lpips_weights(tmp_path / "lpips")
    same = evaluate_geco(SPOT, SPOT, lpips_vgg=vgg, lpips_heads=heads, device="cpu", resolution=32, shading="albedo")
    assert [v.set for v in same.views] == ["zero123plus"] * 6 + ["azimuths"] * 15
    assert all(math.isinf(v.psnr) and v.ssim == pytest.approx(1.0, abs=1e-6) and v.lpips == 0.0 for v in same.views)
    lit = evaluate_geco(SPOT, SPOT, lpips_vgg=vgg, lpips_heads=heads, device="cpu", resolution=32, shading="lit")
    # the unlit result against the lit reference: the PSNR of exactly those renders, and LPIPS above 0
    pred, _ = reference_renders(load_mesh(SPOT), geco_cameras(resolution=32), (1.0, 1.0, 1.0), "albedo")
    gt, _ = reference_renders(load_mesh(SPOT), geco_cameras(resolution=32), (1.0, 1.0, 1.0), "lit")
    assert [v.psnr for v in lit.views] == pytest.approx(psnr(pred, gt).tolist(), rel=1e-9)
    assert all(v.lpips > 0 for v in lit.views)
    means = lit.means("zero123plus")
    assert means["psnr"] == pytest.approx(sum(v.psnr for v in lit.views[:6]) / 6, rel=1e-12)
    assert means["lpips"] == pytest.approx(sum(v.lpips for v in lit.views[:6]) / 6, rel=1e-12)


def test_the_command_line_writes_per_set_means_and_leaves_lpips_out_without_weights(tmp_path, capsys):
    out = tmp_path / "scores.json"
    args = ["eval", str(SPOT), "--protocol", "geco", "--reference", str(SPOT), "--res", "32", "--device", "cpu",
            "--shading", "lit", "--json", str(out)]
    assert main(args) == 0
    assert "GECO's views" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["protocol"] == "geco" and len(data["views"]) == 21 and data["mean"]["lpips"] is None
    ring = [v["psnr"] for v in data["views"] if v["set"] == "azimuths"]
    assert data["mean_azimuths"]["psnr"] == pytest.approx(sum(ring) / 15, rel=1e-12)
    assert data["mean"]["psnr"] == pytest.approx(sum(v["psnr"] for v in data["views"]) / 21, rel=1e-12)
