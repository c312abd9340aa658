"""The hash-grid encoding: tcnn's level table and indexing, torch reference, C++ kernel, tcnn adapter."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from microdreamer.errors import UserError
from microdreamer.render.hashgrid import (
    THREESTUDIO_PARAMS_KEY,
    HashGridConfig,
    available_backends,
    hash_grid_encode,
    init_params,
    load_tcnn_params,
    resolve_backend,
)
from microdreamer.render.hashgrid_cpu import unavailable_reason
from microdreamer.render.hashgrid_tcnn import _encoding, encode_tcnn, encoding_config
from microdreamer.render.hashgrid_torch import encode_torch, level_corners

U = 2.0**-24  # float32 unit roundoff
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"C++ kernel unavailable: {unavailable_reason()}"))]
needs_cpu_kernel = pytest.mark.skipif(unavailable_reason() is not None, reason="C++ kernel unavailable")

THREESTUDIO = HashGridConfig()
# 4 levels with integer scales 3, 7, 15, 31 (per_level_scale 2: every float32 step is exact), resolutions
# 4, 8, 16, 32: levels 0-1 dense (64 and 512 entries), levels 2-3 hashed into 2^10.
SMALL = HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)


def random_params(cfg: HashGridConfig, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """O(1) distinct values, so that a wrong table entry changes a feature by O(1)."""
    return torch.randn(cfg.num_params, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_points(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))


def test_level_table_matches_threestudio():
    cfg = THREESTUDIO
    assert cfg.level_resolutions() == [16, 24, 34, 49, 71, 102, 148, 213, 308, 446, 646, 934, 1352, 1956, 2831, 4096]
    assert cfg.level_sizes() == [4096, 13824, 39304, 117656, 357912] + [2**19] * 11
    assert cfg.level_hashed() == [False] * 5 + [True] * 11
    assert cfg.level_offsets()[:6] == [0, 4096, 17920, 57224, 174880, 532792]
    assert cfg.num_params == 12_599_920 and cfg.n_output_dims == 32
    scales = cfg.level_scales()
    assert scales[0] == 15.0
    assert scales[-1] == np.float32(4094.9985) and scales[-1] != 4095.0  # 15·log2f(scale) = 7.9999995
    assert all(np.float32(s) == s for s in scales)  # float32 values

    assert SMALL.level_scales() == [3.0, 7.0, 15.0, 31.0] and SMALL.level_resolutions() == [4, 8, 16, 32]
    assert SMALL.level_sizes() == [64, 512, 1024, 1024] and SMALL.level_hashed() == [False, False, True, True]
    # res³ = 4913 is dense-indexed into 4920 entries (padded to 8) when the table allows it
    padded = HashGridConfig(n_levels=1, log2_hashmap_size=13, base_resolution=17)
    assert padded.level_sizes() == [4920] and padded.level_hashed() == [False]


def fused_pos(scale: float, x: float) -> np.float32:
    """fma(scale, x, 0.5) in float32: for float32 scale and x the product is exact in float64 and,
    when it is at least 2^-6 (all points below), so is the sum; one rounding to float32 follows."""
    return np.float32(float(scale) * float(x) + 0.5)


def hand_corners(point, cfg: HashGridConfig, level: int) -> list[tuple[int, np.float32]]:
    """(entry relative to the level, float32 weight) of the 8 corners, by tcnn's rules written out."""
    scale, res, size = cfg.level_scales()[level], cfg.level_resolutions()[level], cfg.level_sizes()[level]
    cell, frac = [], []
    for coord in point:
        pos = fused_pos(scale, coord)
        cell.append(int(np.floor(pos)))
        frac.append(np.float32(pos - np.floor(pos)))
    corners = []
    for c in range(8):
        x, y, z = (cell[d] + ((c >> d) & 1) for d in range(3))
        weight = np.float32(1.0)
        for d in range(3):
            weight = np.float32(weight * (frac[d] if (c >> d) & 1 else np.float32(1.0) - frac[d]))
        if cfg.level_hashed()[level]:  # CoherentPrime in uint32 arithmetic
            entry = ((x * 1) ^ ((y * 2654435761) & 0xFFFFFFFF) ^ ((z * 805459861) & 0xFFFFFFFF)) % size
        else:
            entry = (x + y * res + z * res * res) % size
        corners.append((entry, weight))
    return corners


def straddle(scale: float, k: int) -> tuple[float, float]:
    """The float32 neighbours around the cell boundary pos = k: (last x with pos < k, first with pos >= k)."""
    x = np.float32((k - 0.5) / scale)
    while fused_pos(scale, x) >= k:
        x = np.nextafter(x, np.float32(-1))
    while fused_pos(scale, np.nextafter(x, np.float32(2))) < k:
        x = np.nextafter(x, np.float32(2))
    return float(x), float(np.nextafter(x, np.float32(2)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [2, 5])  # dense (res 34, 39304 entries) and hashed (res 102, 2^19)
def test_indices_at_cell_boundaries_match_hand_computed(backend, level):
    cfg = THREESTUDIO
    scale, size, offset = cfg.level_scales()[level], cfg.level_sizes()[level], cfg.level_offsets()[level]
    lo7, hi7 = straddle(scale, 7)
    lo20, hi20 = straddle(scale, 20)
    points = [
        (1.0, 1.0, 1.0),  # the +1 corners lie at res (outside the grid): the index wraps
        (lo7, hi7, 1.0),
        (hi7, lo20, hi20),
        (lo20, 1.0, lo7),
        (0.0, hi20, 0.5),
    ]
    params = random_params(cfg)
    table = params.view(-1, 2).double()
    out = hash_grid_encode(torch.tensor(points), params, cfg, backend=backend)
    entries_torch, _ = level_corners(torch.tensor(points), cfg, level)
    for n, point in enumerate(points):
        corners = hand_corners(point, cfg, level)
        assert [e for e, _ in corners] == entries_torch[n].tolist()
        assert all(0 <= e < size for e, _ in corners)  # every corner inside its level's table
        expected = sum(float(w) * table[offset + e] for e, w in corners)
        bound = 16 * U * sum(float(w) * table[offset + e].abs() for e, w in corners)  # weights (3u), sum (8u)
        feature = out[n, 2 * level: 2 * level + 2].double()
        torch.testing.assert_close(feature, expected, atol=bound.max().item(), rtol=0)
    assert fused_pos(scale, lo7) < 7 <= fused_pos(scale, hi7)  # neighbours really straddle the boundary
    if level == 2:  # (34, 33, 33) → 34 + 33·34 + 33·34² = 39304 ≡ 0: the wrapped corner carries weight
        corner, weight = hand_corners((1.0, 1.0, 1.0), cfg, level)[1]
        assert corner == 0 and weight > 0.01


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [1, 3])  # dense and hashed
def test_position_is_one_fused_multiply_add(backend, level):
    """With y = z = 0 (frac 0.5) and one table value 1 at corner 1 (+1 along x), the feature is
    frac_x/4 exactly: it must be the fused position's, where rounding scale·x first differs."""
    cfg = SMALL
    scale, offset = cfg.level_scales()[level], cfg.level_offsets()[level]
    xs = np.random.default_rng(level).random(2000).astype(np.float32)
    unfused = np.float32(scale) * xs + np.float32(0.5)
    fused = np.array([fused_pos(scale, x) for x in xs])
    differ = xs[unfused != fused][:4]
    assert len(differ) == 4
    for x in differ:
        point = (float(x), 0.0, 0.0)
        corners = hand_corners(point, cfg, level)
        assert len({e for e, _ in corners}) == 8
        params = torch.zeros(cfg.num_params)
        params[(offset + corners[1][0]) * cfg.n_features_per_level] = 1.0
        feature = hash_grid_encode(torch.tensor([point]), params, cfg, backend=backend)[0, 2 * level].item()
        pos = fused_pos(scale, x)
        assert feature == (pos - np.floor(pos)) / 4
        wrong = np.float32(scale) * x + np.float32(0.5)
        assert feature != (wrong - np.floor(wrong)) / 4


def test_param_gradients_match_finite_differences():
    cfg = SMALL
    x = random_points(40, seed=2)
    params = random_params(cfg, dtype=torch.float64).requires_grad_()
    weights = torch.randn(40, cfg.n_output_dims, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(p):
        return (encode_torch(x, p, cfg) * weights).sum()

    (grad,) = torch.autograd.grad(loss(params), params)
    touched = grad.nonzero().flatten()
    assert 0 < len(touched) < cfg.num_params
    h = 1e-3
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        picks = touched[torch.randperm(len(touched), generator=g)[:12]].tolist() + [0]
        for i in picks:  # single entries (entry 0: a wrap target of the dense levels) ...
            e = torch.zeros_like(params)
            e[i] = h
            numeric = (loss(params + e) - loss(params - e)) / (2 * h)
            assert numeric.item() == pytest.approx(grad[i].item(), abs=1e-9)
        for _ in range(3):  # ... and random directions (the loss is linear in the parameters)
            d = torch.randn(cfg.num_params, generator=g, dtype=torch.float64)
            numeric = (loss(params + h * d) - loss(params - h * d)) / (2 * h)
            assert numeric.item() == pytest.approx((grad @ d).item(), rel=1e-9)
    assert torch.autograd.gradcheck(lambda p: encode_torch(x[:8], p, cfg), (params,), fast_mode=True)


def interior_dyadic_points(n: int, cfg: HashGridConfig, h: float, seed: int) -> torch.Tensor:
    """Points on a 2^-12 grid (so scale·x is exact for SMALL's integer scales) whose position stays
    inside one cell at every level when moved by ±h."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 4095, (8 * n, 3), generator=g).double() / 4096
    ok = torch.ones(len(x), dtype=torch.bool)
    for scale in cfg.level_scales():
        frac = torch.frac(x * scale + 0.5)
        ok &= (frac > scale * h + 1e-3).all(1) & (frac < 1 - scale * h - 1e-3).all(1)
    assert ok.sum() >= n
    return x[ok][:n].float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_point_gradients_match_finite_differences(backend):
    """Within a cell the encoding is multilinear in x, so a central difference is exact but for the
    float32 rounding of the features (16u·Σ|w||v| each, see below), divided by 2h."""
    cfg, h = SMALL, 2.0**-10
    x = interior_dyadic_points(30, cfg, h, seed=5).requires_grad_()
    params = random_params(cfg)
    weights = torch.randn(30, cfg.n_output_dims, generator=torch.Generator().manual_seed(6))
    (grad,) = torch.autograd.grad((hash_grid_encode(x, params, cfg, backend=backend) * weights).sum(), x)
    magnitude = (encode_torch(x.detach(), params.abs(), cfg) * weights.abs()).sum(1)  # Σ|w||v||g| per point
    with torch.no_grad():
        for d in range(3):
            step = torch.zeros_like(x)
            step[:, d] = h
            plus = (hash_grid_encode(x + step, params, cfg, backend=backend) * weights).double().sum(1)
            minus = (hash_grid_encode(x - step, params, cfg, backend=backend) * weights).double().sum(1)
            numeric = (plus - minus) / (2 * h)
            bound = 2 * 16 * U * magnitude.double() / (2 * h) + 1e-9
            assert ((grad[:, d].double() - numeric).abs() <= bound).all(), (grad[:, d], numeric)
    assert grad.abs().max() > 1


def entry_counts(x: torch.Tensor, cfg: HashGridConfig) -> torch.Tensor:
    """How many (point, corner) pairs add into each table entry."""
    offsets = cfg.level_offsets()
    entries = torch.cat([level_corners(x, cfg, level)[0].flatten() + offsets[level] for level in range(cfg.n_levels)])
    return torch.bincount(entries, minlength=cfg.level_offsets()[-1])


def corner_magnitudes(x: torch.Tensor, params: torch.Tensor, grad: torch.Tensor, cfg: HashGridConfig) -> torch.Tensor:
    """Per point Σ_l scale_l Σ_c Σ_f |v||g|: bounds each term of the gradient w.r.t. x."""
    tables = params.view(-1, cfg.n_features_per_level).abs().split(cfg.level_sizes())
    total = torch.zeros(len(x))
    for level, (scale, table) in enumerate(zip(cfg.level_scales(), tables)):
        entry, _ = level_corners(x, cfg, level)
        g = grad.view(len(x), cfg.n_levels, -1)[:, level].abs()
        total += scale * (table[entry] * g[:, None, :]).sum((1, 2))
    return total


def compare_cpu_with_torch(cfg: HashGridConfig, x: torch.Tensor, params: torch.Tensor, seed: int) -> None:
    """Forward and both gradients of the two backends within float32 rounding bounds.

    Each backend's feature is within 12u·Σ|w||v| of the exact one (3u in the weights, 8u summing 8
    corners, 1u the product), so they differ by at most 24u·Σ|w||v| = 24u·encode(x, |params|). A
    parameter's gradient sums k products w·g: each backend within (k+4)u·Σ|w||g|. The gradient
    w.r.t. x sums, over L levels and 8 corners, F-term products times two weights and the scale:
    each within (L + F + 12)u · Σ_l scale_l Σ_c Σ_f |v||g|.
    """
    x = x.clone().requires_grad_()
    g = torch.randn(len(x), cfg.n_output_dims, generator=torch.Generator().manual_seed(seed))
    results = []
    for backend in ("torch", "cpu"):
        p = params.clone().requires_grad_()
        out = hash_grid_encode(x, p, cfg, backend=backend)
        assert out.dtype == torch.float32 and out.shape == (len(x), cfg.n_output_dims)
        results.append((out.detach(), *torch.autograd.grad((out * g).sum(), [p, x])))
    (ref, ref_gp, ref_gx), (out, gp, gx) = results
    p = params.clone().requires_grad_()
    (abs_sum,) = torch.autograd.grad((encode_torch(x.detach(), p, cfg) * g.abs()).sum(), p)  # Σ|w||g| (w >= 0)
    with torch.no_grad():
        bound = 24 * U * encode_torch(x, params.abs(), cfg)
        assert ((out - ref).abs() <= bound).all()
        counts = entry_counts(x, cfg).repeat_interleave(cfg.n_features_per_level)
        assert ref_gp.abs().max() > 0
        assert ((gp - ref_gp).abs() <= 2 * (counts + 4) * U * abs_sum + 1e-30).all()
        x_bound = 2 * (cfg.n_levels + cfg.n_features_per_level + 12) * U * corner_magnitudes(x, params, g, cfg)
        assert ref_gx.abs().max() > 0
        assert ((gx - ref_gx).abs() <= x_bound[:, None]).all()


@needs_cpu_kernel
def test_cpu_matches_torch_small_grid():
    x = torch.cat([
        random_points(3000, seed=7),  # many points per entry: long gradient sums
        torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.5]]),  # wrapping corners
        torch.tensor([[-0.3, 0.5, 1.2], [-1.0, -0.01, 0.2]]),  # outside [0,1]: negative cells wrap as uint32
    ])
    compare_cpu_with_torch(SMALL, x, random_params(SMALL, seed=8), seed=9)


@needs_cpu_kernel
def test_cpu_matches_torch_threestudio_grid():
    outside = torch.tensor([[-0.2, -0.1, -0.3], [0.4, -0.05, 1.01]])  # negative indices, dense tables of 8·k
    x = torch.cat([random_points(500, seed=10), outside])
    compare_cpu_with_torch(THREESTUDIO, x, random_params(THREESTUDIO, seed=11), seed=12)


@needs_cpu_kernel
def test_cpu_is_deterministic_across_thread_counts():
    x = random_points(2000, seed=13).requires_grad_()
    params = random_params(SMALL, seed=14).requires_grad_()
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = hash_grid_encode(x, params, SMALL, backend="cpu")
            runs.append([out, *torch.autograd.grad(out.square().sum(), [x, params])])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input_and_params_only_gradient(backend):
    params = random_params(SMALL).requires_grad_()
    out = hash_grid_encode(torch.zeros(0, 3), params, SMALL, backend=backend)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert params.grad is not None and params.grad.abs().max() == 0
    x = random_points(5)  # x does not require grad: only the parameters get one
    hash_grid_encode(x, params, SMALL, backend=backend).sum().backward()
    assert x.grad is None and params.grad.abs().sum() > 0


def test_init_params():
    a = init_params(SMALL, torch.Generator().manual_seed(0))
    b = init_params(SMALL, torch.Generator().manual_seed(0))
    c = init_params(SMALL, torch.Generator().manual_seed(1))
    assert a.shape == (SMALL.num_params,) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1e-4 and a.abs().max() > 0.9e-4 and a.min() < 0 < a.max()


def test_load_tcnn_params():
    params = random_params(THREESTUDIO, seed=15)
    state = {THREESTUDIO_PARAMS_KEY: params, "geometry.density_network.layers.0.weight": torch.zeros(64, 32)}
    loaded = load_tcnn_params(state, THREESTUDIO)
    assert torch.equal(loaded, params) and loaded.data_ptr() != params.data_ptr()
    x = random_points(50, seed=16)
    assert torch.equal(hash_grid_encode(x, loaded, THREESTUDIO, backend="torch"),
                       hash_grid_encode(x, params, THREESTUDIO, backend="torch"))
    assert torch.equal(load_tcnn_params({"state_dict": state, "epoch": 3}, THREESTUDIO), params)  # Lightning file
    with pytest.raises(UserError, match=r"hold 5,248 floats but the grid configured needs 12,599,920") as err:
        load_tcnn_params({THREESTUDIO_PARAMS_KEY: random_params(SMALL)}, THREESTUDIO)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no hash-grid parameters 'geometry.encoding.encoding.encoding.params'"):
        load_tcnn_params({"other": params}, THREESTUDIO)


def test_backend_resolution_and_errors():
    backends = available_backends()
    assert set(backends) == {"torch", "cpu", "tcnn"} and backends["torch"]
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == ("cpu" if backends["cpu"] else "torch")
    with pytest.raises(UserError, match="unknown hash-grid backend 'cuda'"):
        resolve_backend("cuda", "cpu")
    with pytest.raises(UserError, match="CPU tensors only"):
        resolve_backend("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="'tcnn' needs CUDA"):
            resolve_backend("tcnn", "cpu")
    with pytest.raises(ValueError, match=r"params must have shape \[5248\]"):
        hash_grid_encode(random_points(2), random_params(SMALL)[:-1], SMALL)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 3\]"):
        hash_grid_encode(torch.zeros(4, 2), random_params(SMALL), SMALL)
    with pytest.raises(UserError, match="n_features_per_level must be 1, 2, 4 or 8"):
        HashGridConfig(n_features_per_level=3)


def test_tcnn_adapter(monkeypatch):
    """The adapter against a stand-in tinycudann that honours its documented contract: a module
    built from the JSON config, holding its own flat ``params``, whose forward encodes with them."""
    built = []

    class Encoding(nn.Module):
        def __init__(self, n_input_dims, encoding_config, seed=1337, dtype=None):
            super().__init__()
            assert n_input_dims == 3 and dtype == torch.float32
            fields = {k: v for k, v in encoding_config.items() if k not in ("otype", "interpolation")}
            self.cfg = HashGridConfig(**fields)
            self.params = nn.Parameter(torch.zeros(self.cfg.num_params))
            built.append(encoding_config)

        def forward(self, x):
            return encode_torch(x, self.params, self.cfg)

    monkeypatch.setitem(sys.modules, "tinycudann", types.SimpleNamespace(Encoding=Encoding))
    _encoding.cache_clear()
    try:
        x = random_points(20, seed=17)
        params = random_params(SMALL, seed=18).requires_grad_()
        out = encode_tcnn(x, params, SMALL)
        encode_tcnn(x, params, SMALL)
        assert built == [encoding_config(SMALL)] and built[0]["otype"] == "HashGrid"  # built once, cached
        assert torch.equal(out, encode_torch(x, params, SMALL))
        out.sum().backward()
        assert params.grad is not None and params.grad.abs().sum() > 0
    finally:
        _encoding.cache_clear()


@pytest.mark.skipif(not available_backends()["tcnn"], reason="needs CUDA and tinycudann")
def test_tcnn_matches_torch():
    dev = torch.device("cuda")
    for cfg in (SMALL, THREESTUDIO):
        # CUDA's fast-math exp2f may put a level's scale an ulp (2^-12 at 4095) off ours: features and
        # parameter gradients move continuously with it, but the gradient w.r.t. x jumps where a point
        # changes cell, so the points keep 1e-3 from every cell face at every level
        x = random_points(6000, seed=19).double()
        frac = torch.stack([torch.frac(x * s + 0.5) for s in cfg.level_scales()])
        x = x[((frac > 1e-3) & (frac < 1 - 1e-3)).all(0).all(-1)].float().to(dev).requires_grad_()
        assert len(x) > 1000
        params = random_params(cfg, seed=20).to(dev)
        g = torch.randn(len(x), cfg.n_output_dims, generator=torch.Generator().manual_seed(21)).to(dev)
        results = []
        for backend in ("torch", "tcnn"):
            p = params.clone().requires_grad_()
            out = hash_grid_encode(x, p, cfg, backend=backend)
            results.append((out.detach(), *torch.autograd.grad((out * g).sum(), [p, x])))
        (ref, ref_gp, ref_gx), (out, gp, gx) = results
        # float32 rounding (see compare_cpu_with_torch) plus a frac off by up to 2.5e-4 (the scale's ulp)
        torch.testing.assert_close(out, ref, atol=1e-3 * params.abs().max().item(), rtol=0)
        torch.testing.assert_close(gp, ref_gp, atol=1e-3 * ref_gp.abs().max().item(), rtol=0)
        torch.testing.assert_close(gx, ref_gx, atol=1e-3 * ref_gx.abs().max().item(), rtol=0)
