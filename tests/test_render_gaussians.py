"""The Gaussian rasterizer: torch reference (dense/tiled), C++ kernel, gsplat adapter, public API."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
import warnings

import pytest
import torch

from microdreamer import cli
from microdreamer.errors import UserError
from microdreamer.render import gaussians as gaussians_api
from microdreamer.render.gaussians import available_backends, rasterize_gaussians, resolve_backend
from microdreamer.render.gaussians_cpu import project_cpu, rasterize_cpu, unavailable_reason
from microdreamer.render.gaussians_gsplat import gsplat_unavailable_reason, rasterize_gsplat
from microdreamer.render.gaussians_torch import EPS2D, project_gaussians, rasterize_dense, rasterize_tiled
from microdreamer.sir.cameras import Cameras
from tolerances import assert_within, calibrated_bound, rounding_bound

needs_cpu_kernel = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"C++ kernel unavailable: {unavailable_reason()}"
)


def scene(n: int, seed: int = 0, radius: float = 0.5, log_scale: float = -3.0, dtype=torch.float32):
    """Random Gaussians in a ball: means, quats, scales, opacities, colors (leaf tensors)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    d = torch.randn(n, 3, generator=g, dtype=torch.float64)
    means = d / d.norm(dim=-1, keepdim=True) * radius * u[:, None] ** (1 / 3)
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    scales = torch.exp(log_scale + 0.4 * torch.randn(n, 3, generator=g, dtype=torch.float64))
    opacities = 0.1 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (means, quats, scales, opacities, colors)]


def loss_weights(outputs, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]


def weighted_loss(outputs, seed: int = 1) -> torch.Tensor:
    """A fixed random linear functional of rgb, alpha and depth (exercises every output gradient)."""
    return sum((o * w).sum() for o, w in zip(outputs, loss_weights(outputs, seed)))


def float64_reference(params, cams, bg):
    """The dense torch rasterizer in float64 on the same (float32) values: its outputs and the
    gradients of :func:`weighted_loss` with respect to ``params`` and ``bg``, the reference that every
    float32 path is held to (:func:`tolerances.calibrated_bound`)."""
    p64 = [p.detach().double().requires_grad_() for p in [*params, bg]]
    out = rasterize_dense(project_gaussians(*p64[:3], cams), p64[3], p64[4], p64[5])
    grads = torch.autograd.grad(weighted_loss(out), p64)
    return [o.detach() for o in out], list(grads)


CAMS = Cameras.orbit([0.0, -25.0, 15.0], [0.0, 100.0, 230.0], 1.3, (50, 37))  # W=50, H=37: partial tiles
BG = torch.tensor([0.9, 0.4, 0.1])


def test_tiled_matches_dense():
    params = scene(250, log_scale=-2.6)
    dense = rasterize_dense(project_gaussians(*params[:3], CAMS), params[3], params[4], BG)
    proj = project_gaussians(*params[:3], CAMS)
    tiled = rasterize_tiled(proj, params[3], params[4], BG, chunk_elements=400_000)  # 4 chunks
    assert dense[1].max() > 0.9 and dense[1].min() < 0.1  # a scene with opaque and empty pixels
    ref_out, ref_grads = float64_reference(params, CAMS, BG)
    for name, a, b, ref in zip(["rgb", "alpha", "depth"], dense, tiled, ref_out):
        assert_within(b, ref, calibrated_bound(a, ref), name)
    grads_dense = torch.autograd.grad(weighted_loss(dense), params)
    grads_tiled = torch.autograd.grad(weighted_loss(tiled), params)
    for name, a, b, ref in zip(["means", "quats", "scales", "opacities", "colors"], grads_dense, grads_tiled, ref_grads):
        assert_within(b, ref, calibrated_bound(a, ref), name)


def test_dense_gradients_match_finite_differences():
    cams = Cameras.orbit([0.0, 20.0], [0.0, 70.0], 1.0, (12, 10), fovy=60.0)
    params = scene(5, seed=3, radius=0.15, log_scale=-2.5, dtype=torch.float64)
    bg = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)

    def loss(*p):
        proj = project_gaussians(p[0], p[1], p[2], cams)
        return weighted_loss(rasterize_dense(proj, p[3], p[4], bg))

    analytic = torch.autograd.grad(loss(*params), params)
    # The loss is a sum over 1200 outputs × weights, each output about 20 dependent float64 roundings
    # deep (projection, conic, exp, compositing): its rounding r; a central difference with step h is
    # off by r/h from rounding and by h²·f'''/6 from truncation, which D(h) − D(2h) estimates (×3).
    with torch.no_grad():
        outputs = rasterize_dense(project_gaussians(*params[:3], cams), params[3], params[4], bg)
        magnitude = sum((o * w).abs().sum().item() for o, w in zip(outputs, loss_weights(outputs)))
    r = rounding_bound(magnitude, n=sum(o.numel() for o in outputs), ops=20, dtype=torch.float64)
    h = 1e-6

    def central(k: int, i: int, step: float) -> float:
        shifted = [q.detach().clone() for q in params]
        shifted[k].view(-1)[i] += step
        plus = loss(*shifted)
        shifted[k].view(-1)[i] -= 2 * step
        return float((plus - loss(*shifted)) / (2 * step))

    with torch.no_grad():
        for k, (p, g) in enumerate(zip(params, analytic)):
            numeric = torch.tensor([central(k, i, h) for i in range(p.numel())], dtype=torch.float64)
            coarse = torch.tensor([central(k, i, 2 * h) for i in range(p.numel())], dtype=torch.float64)
            truncation = (numeric - coarse).abs()
            assert truncation.max() <= 2 * r / h, "a threshold (alpha 1/255, a tile edge) lies within 2h"
            assert g.abs().max() > 1e3 * r / h
            assert_within(g.reshape(-1), numeric, r / h + truncation.max().item(), f"parameter {k}")


@needs_cpu_kernel
def test_cpu_projection_matches_torch():
    params = scene(400, seed=5, radius=0.9)  # some Gaussians near the camera and off-screen
    ref = project_gaussians(*params[:3], CAMS)
    out = project_cpu(*params[:3], CAMS)
    ref64 = project_gaussians(*[p.detach().double() for p in params[:3]], CAMS)
    assert torch.equal(ref.radii, out.radii) and torch.equal(ref.tile_rects, out.tile_rects)
    assert torch.equal(ref64.radii, out.radii)  # no radius is within rounding of an integer
    vis = ref.radii > 0
    assert 0 < vis.sum() < vis.numel()
    for name in ("means2d", "conics", "depths"):
        a, b, exact = (getattr(x, name)[vis] for x in (ref, out, ref64))
        assert_within(b, exact, calibrated_bound(a, exact), name)


@needs_cpu_kernel
def test_cpu_matches_torch_forward_and_gradients():
    params = scene(400, seed=2, log_scale=-2.8, radius=1.1)  # some beside/near the cameras
    with torch.no_grad():
        params[2][:40] *= 6  # large footprints from outside the field of view (clamped Jacobian)
        params[3][-30:] = 0.995  # centres above the 0.99 alpha clamp
    bg = BG.clone().requires_grad_()
    results = []
    for project, raster in [(project_gaussians, rasterize_dense), (project_cpu, rasterize_cpu)]:
        outputs = raster(project(*params[:3], CAMS), params[3], params[4], bg)
        grads = torch.autograd.grad(weighted_loss(outputs), [*params, bg])
        results.append(([o.detach() for o in outputs], grads))
    (torch_out, torch_grads), (out, grads) = results
    exact_out, exact_grads = float64_reference(params, CAMS, bg)
    for name, a, b, exact in zip(["rgb", "alpha", "depth"], torch_out, out, exact_out):
        assert_within(b, exact, calibrated_bound(a, exact), name)
    for name, a, b, exact in zip(["means", "quats", "scales", "opacities", "colors", "background"], torch_grads, grads, exact_grads):
        assert exact.abs().max() > 0, name
        assert_within(b, exact, calibrated_bound(a, exact), name)


@needs_cpu_kernel
def test_cpu_is_deterministic():
    params = scene(300, seed=4)
    runs = []
    for _ in range(2):
        out = rasterize_gaussians(*params, CAMS, BG, backend="cpu")
        runs.append([out.rgb, *torch.autograd.grad(weighted_loss([out.rgb, out.alpha, out.depth]), params)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def head_on_gaussian(scale: float, opacity: float):
    """One isotropic Gaussian projecting exactly onto the centre of pixel (16, 16) of a 32² view."""
    cams = Cameras.orbit([0.0], [0.0], 2.0, 32)
    fx, fy = cams.focal
    # camera at (0, 0, 2) looking at -z: world (X, Y, 0) → OpenCV (X, -Y, 2)
    means = torch.tensor([[1.0 / fx, -1.0 / fy, 0.0]])
    return cams, means, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.full((1, 3), scale), torch.tensor([opacity])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_single_gaussian_analytic(backend):
    if backend == "cpu" and unavailable_reason() is not None:
        pytest.skip("C++ kernel unavailable")
    scale, opacity, z = 0.05, 0.8, 2.0
    cams, means, quats, scales, opac = head_on_gaussian(scale, opacity)
    color = torch.tensor([[0.2, 0.6, 1.0]])
    bg = torch.tensor([1.0, 1.0, 1.0])
    out = rasterize_gaussians(means, quats, scales, opac, color, cams, bg, backend=backend)
    torch.testing.assert_close(out.extras["means2d"][0, 0], torch.tensor([16.5, 16.5]))
    assert out.alpha[0, 0, 16, 16].item() == pytest.approx(opacity, rel=1e-6)
    torch.testing.assert_close(out.rgb[0, :, 16, 16], opacity * color[0] + (1 - opacity) * bg)
    assert out.depth[0, 0, 16, 16].item() == pytest.approx(opacity * z, rel=1e-6)
    # EWA by hand: Σ2D = s²·J·Jᵀ + 0.3·I with J = [[f/z, 0, -f·x/z²], [0, f/z, -f·y/z²]]
    f = cams.focal[0]
    x, y = 1.0 / f, 1.0 / f  # camera-space offsets of the centre (OpenCV y down)
    jx, jy = torch.tensor([f / z, 0.0, -f * x / z**2]), torch.tensor([0.0, f / z, -f * y / z**2])
    a, b, c = scale**2 * jx @ jx + EPS2D, scale**2 * jx @ jy, scale**2 * jy @ jy + EPS2D
    det = a * c - b * b
    for dx, dy in [(1, 0), (0, 2), (1, 1), (-2, 1), (3, 0), (4, 0)]:
        power = 0.5 * (c * dx * dx + a * dy * dy) / det - b * dx * dy / det
        expected = opacity * math.exp(-power)
        expected = expected if expected >= 1 / 255 else 0.0  # (4, 0) falls below 1/255: skipped
        assert out.alpha[0, 0, 16 + dy, 16 + dx].item() == pytest.approx(expected, rel=1e-5)
    assert out.alpha[0, 0, 16, 20].item() == 0
    radius = math.ceil(3 * math.sqrt(0.5 * (a + c) + math.sqrt(max(0.01, (0.5 * (a - c)) ** 2 + b * b))))
    assert out.extras["radii"].tolist() == [[radius]]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_empty_and_culled_scenes_show_background(backend):
    if backend == "cpu" and unavailable_reason() is not None:
        pytest.skip("C++ kernel unavailable")
    bg = torch.tensor([0.3, 0.6, 0.9])
    empty = [torch.zeros(0, k) for k in (3, 4, 3)] + [torch.zeros(0), torch.zeros(0, 3)]
    out = rasterize_gaussians(*empty, CAMS, bg, backend=backend)
    assert out.rgb.shape == (3, 3, 37, 50) and out.extras["radii"].shape == (3, 0)
    torch.testing.assert_close(out.rgb, bg[None, :, None, None].expand(3, 3, 37, 50))
    assert out.alpha.abs().max() == 0 and out.depth.abs().max() == 0

    # camera at (0, 0, 2): one big Gaussian behind it (z = -1), one in front (z = 1.5)
    cams = Cameras.orbit([0.0], [0.0], 2.0, 32)
    means = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.5]], requires_grad=True)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    scales = torch.full((2, 3), 0.2)
    opac = torch.tensor([0.9, 0.5])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = rasterize_gaussians(means, quats, scales, opac, colors, cams, bg, backend=backend)
    assert out.extras["radii"][0, 0] == 0 and out.extras["radii"][0, 1] > 0
    assert 0.45 < out.alpha.max().item() < 0.5  # only the front one (opacity 0.5) shows
    assert out.rgb[0, 0].max() <= bg[0] + 1e-6  # no red anywhere
    out.rgb.sum().backward()
    assert torch.isfinite(means.grad).all() and means.grad[0].abs().max() == 0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_means2d_gradient_is_populated(backend):
    if backend == "cpu" and unavailable_reason() is not None:
        pytest.skip("C++ kernel unavailable")
    params = scene(60, seed=7)
    far = params[0].detach().clone()
    far[-1] = torch.tensor([0.0, 0.0, 50.0])  # behind the azimuth-0 camera: never drawn there
    params[0] = far.requires_grad_()
    out = rasterize_gaussians(*params, CAMS, BG, backend=backend)
    means2d = out.extras["means2d"]
    assert means2d.shape == (3, 60, 2) and not means2d.is_leaf
    means2d.retain_grad()
    out.rgb.mean().backward()
    visible = out.extras["radii"] > 0
    assert means2d.grad is not None
    assert (means2d.grad[visible].norm(dim=-1) > 0).float().mean() > 0.9
    assert means2d.grad[~visible].abs().max() == 0
    assert not visible[0, -1]


def test_backend_resolution_and_errors():
    backends = available_backends()
    assert set(backends) == {"torch", "cpu", "gsplat"} and backends["torch"]
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == ("cpu" if backends["cpu"] else "torch")
    with pytest.raises(UserError, match="unknown rasterizer backend 'opengl'"):
        resolve_backend("opengl", "cpu")
    with pytest.raises(UserError, match="CPU tensors only"):
        resolve_backend("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="gsplat"):
            resolve_backend("gsplat", "cpu")
    params = scene(3)
    with pytest.raises(UserError):
        rasterize_gaussians(*params, CAMS, BG, backend="nope")


def test_cuda_without_gsplat_says_once_that_the_slow_path_is_used(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gsplat" else find_spec(name, *a))
    gsplat_unavailable_reason.cache_clear()
    gaussians_api._warn_slow_cuda_path.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert resolve_backend("auto", "cuda") == "torch"
            assert resolve_backend("auto", "cuda") == "torch"  # every render asks: still one warning
            assert resolve_backend("auto", "cpu") in ("cpu", "torch")
        assert [str(w.message) for w in seen] == [gaussians_api.SLOW_CUDA_PATH]
        assert "plain-PyTorch" in str(seen[0].message) and 'pip install "microdreamer[cuda]"' in str(seen[0].message)
        with pytest.raises(UserError, match=r"gsplat package is not installed \(pip install \"microdreamer\[cuda\]\"\)"):
            resolve_backend("gsplat", "cuda")
        # the command line prints it as one line
        with cli._one_line_warnings():
            warnings.warn(gaussians_api.SLOW_CUDA_PATH, RuntimeWarning)
        assert capsys.readouterr().err == f"warning: {gaussians_api.SLOW_CUDA_PATH}\n"
    finally:
        gsplat_unavailable_reason.cache_clear()
        gaussians_api._warn_slow_cuda_path.cache_clear()


@pytest.mark.parametrize("per_axis_radii", [False, True])  # gsplat 1.4: [C,N]; 1.5: [C,N,2]
def test_gsplat_adapter_layout(monkeypatch, per_axis_radii):
    """The adapter against a stand-in gsplat that honours gsplat's documented contract."""
    params = scene(40, seed=6)
    reference = rasterize_gaussians(*params, CAMS, BG, backend="torch")

    def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kw):
        assert kw["packed"] is False and kw["render_mode"] == "RGB+D" and kw["eps2d"] == 0.3
        assert kw["rasterize_mode"] == "classic" and kw["near_plane"] == CAMS.near
        torch.testing.assert_close(viewmats, CAMS.viewmats())
        torch.testing.assert_close(Ks, CAMS.intrinsics())
        assert (width, height) == (CAMS.width, CAMS.height) and kw["backgrounds"].shape == (3, 3)
        radii = reference.extras["radii"]
        meta = {"means2d": reference.extras["means2d"],
                "radii": torch.stack([radii, radii - 1], -1) if per_axis_radii else radii}
        colors_depth = torch.cat([reference.rgb, reference.depth], 1).permute(0, 2, 3, 1)
        return colors_depth, reference.alpha.permute(0, 2, 3, 1), meta

    monkeypatch.setitem(sys.modules, "gsplat", types.SimpleNamespace(rasterization=rasterization))
    out = rasterize_gsplat(*params, CAMS, BG)
    for a, b in [(reference.rgb, out.rgb), (reference.alpha, out.alpha), (reference.depth, out.depth)]:
        assert torch.equal(a, b)
    assert torch.equal(out.extras["radii"], reference.extras["radii"])
    assert out.extras["means2d"] is reference.extras["means2d"]


@pytest.mark.skipif(not available_backends()["gsplat"], reason="needs CUDA and the gsplat package")
def test_gsplat_matches_torch():
    dev = torch.device("cuda")
    # opacities <= 0.3: no alpha reaches gsplat's/our different clamps, nothing beyond 3σ reaches 1/255
    params = [p.detach().to(dev) for p in scene(300, seed=9, log_scale=-2.8)]
    params[3] = params[3] * 0.3
    params = [p.requires_grad_() for p in params]
    cams, bg = CAMS.to(dev), BG.to(dev)
    ref = rasterize_gaussians(*params, cams, bg, backend="torch")
    out = rasterize_gaussians(*params, cams, bg, backend="gsplat")
    for a, b in [(ref.rgb, out.rgb), (ref.alpha, out.alpha), (ref.depth, out.depth)]:
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    vis = (ref.extras["radii"] > 0) & (out.extras["radii"] > 0)
    torch.testing.assert_close(ref.extras["means2d"][vis], out.extras["means2d"][vis], atol=1e-3, rtol=1e-5)
    g_ref = torch.autograd.grad(weighted_loss([ref.rgb, ref.alpha, ref.depth]), params)
    g_out = torch.autograd.grad(weighted_loss([out.rgb, out.alpha, out.depth]), params)
    for a, b in zip(g_ref, g_out):
        torch.testing.assert_close(a, b, atol=2e-3 * a.abs().max().item(), rtol=0)
