"""The NeRF volume renderer: the torch reference against closed forms, the C++ kernels against the
reference (values and gradients), occupancy-grid skipping, the grid's update rule, backend choice."""

import math

import pytest
import torch

from microdreamer.errors import UserError
from microdreamer.render.backends import choose_backend
from microdreamer.render.occupancy import OccupancyGrid, OccupancyRule
from microdreamer.render.volume import (
    MarchSettings,
    available_volume_backends,
    composite,
    march_rays,
    render_rays,
    resolve_volume_backend,
    visible,
)
from microdreamer.sir.cameras import Cameras

CPU = available_volume_backends()["cpu"]
needs_cpu = pytest.mark.skipif(not CPU, reason="the C++ volume kernel does not build here")
F32 = torch.finfo(torch.float32).eps


def _rays(n: int, seed: int, distance: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays from a sphere of radius ``distance`` aimed near the origin, some missing the unit box."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(n, 3, generator=g)
    o = o / o.norm(dim=-1, keepdim=True) * distance
    d = -o + torch.randn(n, 3, generator=g) * 0.6
    return o, d / d.norm(dim=-1, keepdim=True)


def _random_grid(resolution: int, seed: int, radius: float = 1.0) -> OccupancyGrid:
    grid = OccupancyGrid(radius, resolution)
    grid.binaries = torch.rand(resolution**3, generator=torch.Generator().manual_seed(seed)) > 0.5
    return grid


def test_constant_density_slab_has_the_closed_form_opacity_and_colour():
    """Axis-aligned rays through a box of constant density: n = ⌊2r/dt⌋ samples, opacity 1 − exp(−σ·n·dt)."""
    settings = MarchSettings(radius=1.0, step=0.01)
    o = torch.tensor([[0.1, 0.2, 3.0], [5.0, 0.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])
    samples = march_rays(o, d, settings)
    assert samples.packed_info[:, 1].tolist() == [200, 200]
    assert torch.allclose(samples.t_starts[:200], 2.0 + 0.01 * torch.arange(200.0), atol=4 * F32 * 4)
    sigma, colour = 0.7, torch.tensor([0.2, 0.5, 0.9])
    rgb, opacity, depth = composite(samples, torch.full((400,), sigma), colour.expand(400, 3))
    expected = 1 - math.exp(-sigma * 200 * 0.01)
    # the stored ends t ≈ 2..7 carry float32 rounding: each dt is off by up to ulp(t)/2 <= 2·eps
    tol = sigma * 200 * 2 * F32
    assert opacity.tolist() == pytest.approx([expected] * 2, abs=tol)
    assert torch.allclose(rgb, colour * expected, atol=tol)
    # depth: Σ w_i t_i with w_i = e^{-σ dt i}(1 − e^{-σ dt}), t_i = t0 + dt (i + ½)
    i = torch.arange(200, dtype=torch.float64)
    w = torch.exp(-sigma * 0.01 * i) * (1 - math.exp(-sigma * 0.01))
    assert depth[0].item() == pytest.approx(float((w * (2.0 + 0.01 * (i + 0.5))).sum()), abs=4 * tol)


def test_visibility_stops_where_transmittance_falls_below_eps_and_drops_faint_samples():
    o, d = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    samples = march_rays(o, d, MarchSettings(radius=1.0, step=0.1))
    sigmas = torch.full((20,), 10.0)
    sigmas[0] = 0.01  # alpha 1e-3: below the threshold, but still in front of the stop
    keep = visible(samples, sigmas, early_stop_eps=1e-3, alpha_thre=0.01)
    # after the faint sample, transmittance e^{-0.001 - k} >= 1e-3 holds for k <= 6
    assert keep.tolist() == [False] + [True] * 7 + [False] * 12


@needs_cpu
@pytest.mark.parametrize("seed", [0, 1])
def test_cpu_marching_and_visibility_equal_the_reference(seed):
    o, d = _rays(3000, seed)
    grid = _random_grid(8, seed)
    settings = MarchSettings(radius=1.0, step=0.03, near=2.5)
    offsets = torch.rand(3000, generator=torch.Generator().manual_seed(seed + 10))
    a = march_rays(o, d, settings, grid, offsets, backend="torch")
    b = march_rays(o, d, settings, grid, offsets, backend="cpu")
    assert len(a) > 10_000 and torch.equal(a.packed_info, b.packed_info) and torch.equal(a.ray_indices, b.ray_indices)
    # t = t_entry + (k + offset)·dt: a few float32 roundings of numbers up to |t| <= 5
    torch.testing.assert_close(b.t_starts, a.t_starts, rtol=0, atol=8 * F32 * 5)
    torch.testing.assert_close(b.t_ends, a.t_ends, rtol=0, atol=8 * F32 * 5)
    sigmas = torch.rand(len(a), generator=torch.Generator().manual_seed(seed)) * 30
    assert torch.equal(visible(a, sigmas, 1e-2, 0.2, "torch"), visible(a, sigmas, 1e-2, 0.2, "cpu"))


@needs_cpu
def test_cpu_compositing_values_and_gradients_equal_the_reference():
    o, d = _rays(1500, 3)
    samples = march_rays(o, d, MarchSettings(radius=1.0, step=0.02), _random_grid(8, 3))
    g = torch.Generator().manual_seed(4)
    sigmas = torch.rand(len(samples), generator=g) * 40
    rgbs = torch.rand(len(samples), 3, generator=g)
    weights = [torch.randn(1500, 3, generator=g), torch.randn(1500, generator=g), torch.randn(1500, generator=g)]
    results = {}
    for backend in ("torch", "cpu"):
        s, c = sigmas.clone().requires_grad_(), rgbs.clone().requires_grad_()
        out = composite(samples, s, c, backend)
        sum((x * w).sum() for x, w in zip(out, weights)).backward()
        results[backend] = (*(x.detach() for x in out), s.grad, c.grad)
    # both accumulate in float64 from the same float32 inputs and round once: a couple of float32 ulps
    # of each value, plus the float64 cancellation in the suffix sums (negligible)
    for ref, got in zip(results["torch"], results["cpu"]):
        torch.testing.assert_close(got, ref, rtol=4 * F32, atol=4 * F32 * float(ref.abs().max()))


@needs_cpu
def test_unused_outputs_get_no_gradient_in_the_kernel():
    """Only ``rgb`` is used: the kernel receives no opacity/depth gradients and must treat them as zero."""
    samples = march_rays(*_rays(50, 5), MarchSettings(radius=1.0, step=0.05))
    g = torch.Generator().manual_seed(5)
    sigmas, rgbs = torch.rand(len(samples), generator=g) * 10, torch.rand(len(samples), 3, generator=g)
    grads = []
    for backend in ("torch", "cpu"):
        s = sigmas.clone().requires_grad_()
        composite(samples, s, rgbs, backend)[0].sum().backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=4 * F32, atol=4 * F32 * float(grads[0].abs().max()))


def _ball_field(points, directions):
    """Density 5 inside the ball of radius 0.45 around (0.1, 0, 0), zero outside; colour from position."""
    inside = ((points - torch.tensor([0.1, 0.0, 0.0])).norm(dim=-1) < 0.45).float()
    return 5.0 * inside, torch.sigmoid(points * 3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
def test_a_conservative_occupancy_grid_changes_nothing(backend):
    """Cells that can hold density stay occupied: skipping the rest must not change the render."""
    o, d = _rays(2000, 6)
    settings = MarchSettings(radius=1.0, step=0.01, alpha_thre=0.0)
    grid = OccupancyGrid(1.0, 16)
    centres = grid._coords.float()
    lo, hi = centres / 16 * 2 - 1, (centres + 1) / 16 * 2 - 1
    nearest = torch.maximum(torch.minimum(torch.tensor([0.1, 0.0, 0.0]), hi), lo)
    grid.binaries = (nearest - torch.tensor([0.1, 0.0, 0.0])).norm(dim=-1) < 0.45  # cells touching the ball
    full = OccupancyGrid(1.0, 16)
    full.fill()
    skipped = render_rays(o, d, _ball_field, settings, grid, lambda p: _ball_field(p, p)[0], backend=backend)
    dense = render_rays(o, d, _ball_field, settings, full, lambda p: _ball_field(p, p)[0], backend=backend)
    assert skipped.samples < dense.samples / 3
    torch.testing.assert_close(skipped.rgb, dense.rgb, rtol=0, atol=1e-6)
    torch.testing.assert_close(skipped.opacity, dense.opacity, rtol=0, atol=1e-6)
    assert float(dense.opacity.max()) > 0.9
    # a grid that drops occupied cells does change it
    grid.binaries[grid.binaries.nonzero()[::2, 0]] = False
    assert (render_rays(o, d, _ball_field, settings, grid, backend=backend).opacity - dense.opacity).abs().max() > 0.1


def test_occupancy_grid_update_rule_follows_nerfacc():
    grid = OccupancyGrid(2.0, 4)
    rule = OccupancyRule(interval=16, threshold=0.01, ema_decay=0.95, warmup_steps=32)
    g = torch.Generator().manual_seed(0)
    seen = []

    def occupancy(points):
        seen.append(points)
        return (points.norm(dim=-1) < 1.0).float() * 0.5  # occupied near the centre

    assert not grid.update(5, occupancy, g, rule) and not seen
    assert grid.update(16, occupancy, g, rule)
    pts = seen[-1]
    assert pts.shape == (64, 3) and pts.abs().max() <= 2.0  # warmup: every cell, one point inside each
    cells = ((pts + 2.0) / 4.0 * 4).floor().long()
    assert torch.equal(cells, grid._coords)
    assert torch.equal(grid.binaries, grid.occs > 0.01) and grid.occupied_cells == int((grid.occs > 0).sum())
    before = grid.occs.clone()
    assert grid.update(32, lambda p: torch.zeros(len(p)), g, rule)  # after warmup: 1/4 uniform + occupied
    n = 64 // 4
    touched = before != grid.occs
    assert 0 < int(touched.sum()) <= 2 * n
    torch.testing.assert_close(grid.occs[touched], before[touched] * 0.95)  # EMA: max(0.95·old, 0)


def test_camera_rays_go_through_pixel_centres():
    cams = Cameras.orbit([-20.0, 10.0], [30.0, 200.0], 2.5, (24, 16), fovy=40.0)
    o, d = cams.rays()
    assert o.shape == d.shape == (2, 24 * 16, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2, 384))
    # a point along each ray projects back onto its pixel centre
    points = o + 1.7 * d
    cam = torch.einsum("bij,bpj->bpi", cams.viewmats()[:, :3, :3], points) + cams.viewmats()[:, None, :3, 3]
    pix = torch.einsum("bij,bpj->bpi", cams.intrinsics(), cam)
    pix = pix[..., :2] / pix[..., 2:]
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(24.0), indexing="ij")
    expected = torch.stack([xs.flatten() + 0.5, ys.flatten() + 0.5], -1).expand(2, -1, -1)
    torch.testing.assert_close(pix, expected, rtol=0, atol=1e-4)
    chosen = torch.tensor([[5, 100], [383, 0]])
    torch.testing.assert_close(cams.rays(chosen)[1], torch.stack([d[0, [5, 100]], d[1, [383, 0]]]))


def test_cuda_without_the_library_falls_back_to_torch_and_says_why():
    heard = []
    missing = lambda: "the nerfacc package is not installed (pip install nerfacc)"  # noqa: E731
    assert choose_backend("volume", "auto", "cuda", lambda: None, "nerfacc", missing, heard.append) == "torch"
    assert heard == [missing()]
    assert choose_backend("volume", "auto", "cuda", lambda: None, "nerfacc", lambda: None) == "nerfacc"
    with pytest.raises(UserError, match="'nerfacc' is unavailable .*pip install nerfacc"):
        choose_backend("volume", "nerfacc", "cuda", lambda: None, "nerfacc", missing)
    with pytest.raises(UserError, match="'cpu' runs on CPU tensors only"):
        choose_backend("volume", "cpu", "cuda", lambda: None, "nerfacc", missing)


def test_backend_choice():
    assert resolve_volume_backend("auto", "cpu") == ("cpu" if CPU else "torch")
    assert resolve_volume_backend("torch", "cpu") == "torch"
    with pytest.raises(UserError, match="unknown volume backend"):
        resolve_volume_backend("optix", "cpu")
    with pytest.raises(UserError, match="nerfacc"):
        resolve_volume_backend("nerfacc", "cpu")


@pytest.mark.skipif(not available_volume_backends()["nerfacc"], reason="nerfacc needs CUDA and the nerfacc package")
def test_nerfacc_renders_as_the_reference_on_cuda():
    o, d = (t.cuda() for t in _rays(2000, 7))
    settings = MarchSettings(radius=1.0, step=0.01)
    grid = _random_grid(8, 7)
    grid.binaries = grid.binaries.cuda()
    grid.occs = grid.binaries.float().cuda()

    def field(points, directions):
        return 20 * torch.sigmoid(points.sum(-1) * 4), torch.sigmoid(points * 2)

    outs = {b: render_rays(o, d, field, settings, grid, lambda p: field(p, p)[0], backend=b) for b in ("torch", "nerfacc")}
    assert abs(outs["torch"].samples - outs["nerfacc"].samples) <= 0.001 * outs["torch"].samples
    torch.testing.assert_close(outs["nerfacc"].rgb, outs["torch"].rgb, rtol=0, atol=2e-3)
    torch.testing.assert_close(outs["nerfacc"].opacity, outs["torch"].opacity, rtol=0, atol=2e-3)
