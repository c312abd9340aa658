"""3D Gaussians: initialisation, activations, lr schedule, densification, final prune, save/load, density."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import trimesh

from microdreamer.config import GaussianConfig
from microdreamer.errors import UserError
from microdreamer.io.ply import GaussianPLY
from microdreamer.render.types import RenderOutput
from microdreamer.representations.densify import DensifyState, DensifyStrategy, quaternion_to_matrix
from microdreamer.representations.gaussians import SH_C0, ExponentialLR, Gaussians, mean_sq_knn_distance
from microdreamer.sir.cameras import Cameras
from tolerances import assert_within, rounding_bound


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cfg(**kw) -> GaussianConfig:
    return dataclasses.replace(GaussianConfig(), backend="torch", **kw)


def _hand_made(rows: list[dict]) -> GaussianPLY:
    """Gaussians from activated values: pos, scale (3), opacity, quat."""
    n = len(rows)
    return GaussianPLY(
        means=torch.tensor([r.get("pos", (0.0, 0.0, 0.0)) for r in rows]),
        f_dc=torch.arange(n * 3, dtype=torch.float32).reshape(n, 3),
        f_rest=torch.zeros(n, 0, 3),
        opacity=torch.logit(torch.tensor([r.get("opacity", 0.5) for r in rows])),
        scale=torch.tensor([r.get("scale", (0.01, 0.01, 0.01)) for r in rows]).log(),
        rotation=torch.tensor([r.get("quat", (1.0, 0.0, 0.0, 0.0)) for r in rows]),
    )


# initialisation ---------------------------------------------------------------------------------

def test_init_statistics():
    g = Gaussians(_cfg(num_points=3000), "cpu", _gen(1))
    assert g.num_primitives == 3000
    r = g.means.detach().norm(dim=-1)
    assert r.max() <= 0.5 + 1e-6
    # uniform in the ball: P(r < R/2) = 1/8, mean of x,y,z ≈ 0
    assert abs((r < 0.25).float().mean().item() - 0.125) < 0.02
    assert g.means.detach().mean(0).abs().max() < 0.02
    assert g.params["f_dc"].min() >= 0 and g.params["f_dc"].max() < 1 / 255
    assert_within(g.colors, torch.full_like(g.colors, 0.5), SH_C0 / 255 + rounding_bound(0.5, ops=2))  # 0.5 + C0·f_dc
    assert torch.equal(g.params["rotation"], torch.tensor([[1.0, 0, 0, 0]]).expand(3000, 4))
    assert torch.allclose(g.opacities, torch.full((3000,), 0.1))
    assert g.params["f_rest"].shape == (3000, 0, 3)
    # isotropic scale = sqrt(mean squared distance to the 3 nearest neighbours), brute force
    d2 = torch.cdist(g.means.detach().double(), g.means.detach().double()).square()
    d2.fill_diagonal_(float("inf"))
    expected = d2.topk(3, largest=False).values.mean(1).sqrt().log().float()
    for axis in range(3):  # float64 k-d tree, then float32 rounding, sqrt and log
        assert_within(g.params["scale"][:, axis].detach(), expected, rounding_bound(expected.abs().max().item(), ops=3))


def test_knn_on_grid():
    """Interior points of a unit-spacing grid have 6 neighbours at distance 1 → mean squared 1;
    a corner of a 2-spacing grid has 3 at distance 2 → 4."""
    ax = torch.arange(5.0)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    assert torch.allclose(mean_sq_knn_distance(grid), torch.ones(125))
    assert torch.allclose(mean_sq_knn_distance(grid * 2)[0], torch.tensor(4.0))
    dup = torch.zeros(4, 3)  # coincident points: clamped like 3DGS
    assert torch.allclose(mean_sq_knn_distance(dup), torch.full((4,), 1e-7))


def test_same_seed_same_init_and_sh_degree_checked():
    a = Gaussians(_cfg(num_points=300), "cpu", _gen(7)).to_ply()
    b = Gaussians(_cfg(num_points=300), "cpu", _gen(7)).to_ply()
    c = Gaussians(_cfg(num_points=300), "cpu", _gen(8)).to_ply()
    for name in ("means", "f_dc", "opacity", "scale", "rotation"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.means, c.means)
    with pytest.raises(UserError, match="sh_degree"):
        Gaussians(_cfg(num_points=10, sh_degree=1), "cpu", _gen())


# activations and learning rates -------------------------------------------------------------------

def test_activations():
    ply = _hand_made([{"opacity": 0.3, "scale": (0.1, 0.2, 0.3), "quat": (2.0, 0.0, 0.0, 0.0)},
                      {"opacity": 0.9, "quat": (1.0, 1.0, 1.0, 1.0)}])
    ply.f_dc = torch.tensor([[1.0, -1.0, -10.0], [0.0, 3.0, 5.0]])
    g = Gaussians(_cfg(), "cpu", _gen(), init=ply)
    torch.testing.assert_close(g.opacities, torch.tensor([0.3, 0.9]))
    torch.testing.assert_close(g.scales[0], torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(g.quats, torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]]))
    expected = torch.tensor([[0.5 + SH_C0, 0.5 - SH_C0, 0.0], [0.5, 0.5 + 3 * SH_C0, 0.5 + 5 * SH_C0]])
    torch.testing.assert_close(g.colors, expected)  # clamped below at 0, not above


def test_position_lr_schedule():
    g = Gaussians(_cfg(num_points=16), "cpu", _gen())
    lr_init, lr_final = 0.001 * 10, 0.00002 * 10
    assert g.position_lr(0) == pytest.approx(lr_init, rel=1e-12)
    assert g.position_lr(250) == pytest.approx(math.sqrt(lr_init * lr_final), rel=1e-12)
    assert g.position_lr(500) == pytest.approx(lr_final, rel=1e-12)
    assert g.position_lr(900) == pytest.approx(lr_final, rel=1e-12)
    assert g.position_lr(100) == pytest.approx(lr_init ** 0.8 * lr_final ** 0.2, rel=1e-12)
    delayed = ExponentialLR(1e-2, 1e-4, 100, delay_steps=10, delay_mult=0.02)
    assert delayed(0) == pytest.approx(0.02 * 1e-2)
    assert delayed(5) == pytest.approx((0.02 + 0.98 * math.sin(math.pi / 4)) * 1e-2 ** 0.95 * 1e-4 ** 0.05)
    assert ExponentialLR(1e-3, 1e-3, 100)(50) == 1e-3
    lrs = {grp["name"]: grp["lr"] for grp in g.optimizer.param_groups}
    assert lrs == {"means": pytest.approx(lr_init), "f_dc": 0.01, "f_rest": 0.0005, "opacity": 0.05,
                   "scale": 0.005, "rotation": 0.0005}
    assert all(grp["eps"] == 1e-15 for grp in g.optimizer.param_groups)
    # step() sets the position lr of the step it is called with before updating
    g.params["means"].grad = torch.zeros_like(g.params["means"])
    out = RenderOutput(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8),
                       {"means2d": torch.zeros(1, 16, 2), "radii": torch.zeros(1, 16)})
    g.step(250, out)
    assert g.optimizer.param_groups[0]["lr"] == pytest.approx(math.sqrt(lr_init * lr_final))


# densification -------------------------------------------------------------------------------------

def _adam_warm(g: Gaussians, gen: torch.Generator) -> None:
    """One Adam step with random grads so every parameter has non-zero moments."""
    for p in g.params.values():
        p.grad = torch.randn(p.shape, generator=gen)
    g.optimizer.step()
    g.optimizer.zero_grad()


def test_clone_split_prune_on_hand_made_set():
    rows = [
        {"pos": (0.0, 0.0, 0.0), "scale": (0.01, 0.02, 0.01)},  # 0 hot, small → clone
        {"pos": (0.3, 0.0, 0.0), "scale": (0.1, 0.03, 0.02)},  # 1 hot, big → split
        {"pos": (0.0, 0.3, 0.0), "scale": (0.01, 0.01, 0.01)},  # 2 cold → stays
        {"pos": (0.0, 0.0, 0.3), "opacity": 0.004},  # 3 cold, transparent → pruned
        {"pos": (0.1, 0.1, 0.1), "scale": (0.5, 0.01, 0.01)},  # 4 cold, huge → pruned
        {"pos": (0.2, 0.1, 0.1)},  # 5 never visible → stays
        {"pos": (0.1, 0.2, 0.1), "scale": (0.05, 0.05, 0.05)},  # 6 hot in one view only, avg below → stays
    ]
    g = Gaussians(_cfg(), "cpu", _gen(3), init=_hand_made(rows))
    _adam_warm(g, _gen(4))
    before = {name: p.detach().clone() for name, p in g.params.items()}
    moments = {grp["name"]: g.optimizer.state[grp["params"][0]]["exp_avg"].clone() for grp in g.optimizer.param_groups}

    # two views, W=H=100 → NDC = pixels · 50; hot = 0.0003 px → 0.015 NDC ≥ 0.01
    grad = torch.zeros(2, 7, 2)
    grad[:, 0] = torch.tensor([0.0003, 0.0])
    grad[:, 1] = torch.tensor([0.0, 0.0003])
    grad[:, 2] = torch.tensor([0.0001, 0.0])
    grad[0, 6] = torch.tensor([0.00018, 0.0])  # 0.009 NDC in view 0, 0 in view 1 → average 0.0045
    radii = torch.ones(2, 7, dtype=torch.int32)
    radii[:, 5] = 0
    state = DensifyState.zeros(7, "cpu")
    g.strategy.accumulate(state, grad, radii, 100, 100)
    torch.testing.assert_close(state.average()[:3], torch.tensor([0.015, 0.015, 0.005]))
    assert state.count.tolist() == [2, 2, 2, 2, 2, 0, 2]

    new_state, report = g.strategy.densify(g.params, g.optimizer, state, _gen(5), step=100)
    assert (report.cloned, report.split, report.pruned, report.total) == (1, 1, 2, 7)
    assert g.num_primitives == 7 and new_state.count.shape == (7,) and new_state.count.sum() == 0
    # order: survivors (0, 2, 5, 6), the clone of 0, the two children of 1
    torch.testing.assert_close(g.params["means"][:4], before["means"][[0, 2, 5, 6]])
    for name in ("means", "f_dc", "opacity", "scale", "rotation"):
        torch.testing.assert_close(g.params[name][4], before[name][0])
    torch.testing.assert_close(g.scales[5:], (before["scale"][1].exp() / 1.6).expand(2, 3))
    torch.testing.assert_close(g.params["opacity"][5:], before["opacity"][1].expand(2))
    torch.testing.assert_close(g.params["f_dc"][5:], before["f_dc"][1].expand(2, 3))
    assert not torch.equal(g.params["means"][5], g.params["means"][6])
    # Adam moments follow: kept rows keep theirs, new rows start at zero
    for grp in g.optimizer.param_groups:
        (p,) = grp["params"]
        assert g.params[grp["name"]] is p
        st = g.optimizer.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        torch.testing.assert_close(st["exp_avg"][:4], moments[grp["name"]][[0, 2, 5, 6]])
        assert not st["exp_avg"][4:].any() and not st["exp_avg_sq"][4:].any()
    # the optimiser still steps the new parameters
    _adam_warm(g, _gen(6))


def test_split_children_follow_the_parent_distribution():
    """Children offsets ~ N(0, R·diag(s²)·Rᵀ): check the empirical covariance of 2·2000 children."""
    n = 2000
    quat = torch.tensor([0.9, 0.1, -0.3, 0.2])
    s = (0.2, 0.05, 0.1)
    g = Gaussians(_cfg(), "cpu", _gen(), init=_hand_made([{"scale": s, "quat": tuple(quat.tolist())}] * n))
    state = DensifyState(torch.ones(n), torch.ones(n))
    _, report = g.strategy.densify(g.params, g.optimizer, state, _gen(11), step=100)
    assert report.split == n and report.total == 2 * n
    offsets = g.means.detach().double()
    rot = quaternion_to_matrix(quat[None]).double()[0]
    cov = rot @ torch.diag(torch.tensor(s).double() ** 2) @ rot.T
    # the sample covariance of N = 2n independent draws has entries with variance (Σᵢᵢ·Σⱼⱼ + Σᵢⱼ²)/N: 5σ
    sampling_std = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / (2 * n)).sqrt()
    assert ((offsets.T @ offsets / (2 * n) - cov).abs() <= 5 * sampling_std).all()
    # same generator seed → same children
    h = Gaussians(_cfg(), "cpu", _gen(), init=_hand_made([{"scale": s, "quat": tuple(quat.tolist())}] * n))
    h.strategy.densify(h.params, h.optimizer, DensifyState(torch.ones(n), torch.ones(n)), _gen(11), step=100)
    assert torch.equal(h.means, g.means)


def test_schedule_which_steps_fire():
    st = DensifyStrategy.from_config(GaussianConfig())
    assert [s for s in range(0, 600) if st.fires(s, s - 1)] == [100, 200, 300]
    # a due step the caller skips over (an SIR iteration increment) fires at the next step it passes
    assert [s for s in (99, 101, 102) if st.fires(s, s - 1 if s != 101 else 99)] == [101]
    assert not st.fires(302, 300) and st.fires(301, 299) and not st.fires(401, 399)
    assert st.tracks(0) and st.tracks(300) and not st.tracks(301)
    assert st.extent == 4.0 and st.prune_opacity == 0.005


def test_training_step_accumulates_and_densifies():
    g = Gaussians(_cfg(num_points=200, densify_grad_threshold=0.0), "cpu", _gen(2))
    cams = Cameras.orbit([0.0, -20.0], [0.0, 90.0], 2.0, 24)
    bg = torch.ones(3)
    out = g.render(cams, bg)
    assert out.rgb.shape == (2, 3, 24, 24) and out.rgb.min() >= 0 and out.rgb.max() <= 1
    out.rgb.mean().backward()
    visible = (out.extras["radii"] > 0).sum(0).float()
    g.step(99, out)
    torch.testing.assert_close(g.densify_state.count, visible)
    assert g.densify_state.grad_accum.sum() > 0
    assert all(p.grad is None for p in g.params.values())
    out = g.render(cams, bg)
    out.rgb.mean().backward()
    g.step(100, out)  # threshold 0: every seen Gaussian is cloned or split
    (report,) = g.densify_log
    assert report.step == 100 and report.cloned + report.split == int((visible > 0).sum())
    assert g.num_primitives == report.total == 200 + report.cloned + report.split - report.pruned
    assert g.densify_state.count.shape == (g.num_primitives,)
    out = g.render(cams, bg)  # the new set renders and trains
    out.rgb.mean().backward()
    g.step(101, out)
    g.step(450, g.render(cams, bg))  # past the window (its last due step 400 > 300): no statistics, no densification
    assert len(g.densify_log) == 1


def test_finalize_prunes():
    rows = [{"opacity": 0.008}, {"opacity": 0.012}, {"scale": (0.01, 0.105, 0.01)}, {"scale": (0.095,) * 3}]
    g = Gaussians(_cfg(white_filter=False), "cpu", _gen(), init=_hand_made(rows))  # the filter: test_white_filter
    _adam_warm(g, _gen(1))  # moves each raw value by about its lr: the margins above allow for it
    before = g.params["means"].detach().clone()
    g.finalize()
    assert g.num_primitives == 2 and g.cleanup == {"final_prune": 2}
    torch.testing.assert_close(g.params["means"], before[[1, 3]])
    for grp in g.optimizer.param_groups:
        assert g.optimizer.state[grp["params"][0]]["exp_avg"].shape[0] == 2
    assert g.densify_state.count.shape == (2,)


# save / load / density ------------------------------------------------------------------------------

def test_save_load_render_equal(tmp_path):
    g = Gaussians(_cfg(num_points=150), "cpu", _gen(5))
    with torch.no_grad():
        g.params["rotation"].add_(torch.randn(150, 4, generator=_gen(6)) * 0.3)
        g.params["f_dc"].add_(torch.randn(150, 3, generator=_gen(7)))
    path = tmp_path / "g.ply"
    g.save(path)
    h = Gaussians.load(path, _cfg(), "cpu")
    for name in ("means", "f_dc", "f_rest", "opacity", "scale", "rotation"):
        assert torch.equal(g.params[name], h.params[name]), name
    cams = Cameras.orbit([10.0], [30.0], 2.0, 20)
    with torch.no_grad():
        a, b = g.render(cams, torch.ones(3)), h.render(cams, torch.ones(3))
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.alpha, b.alpha)
    mesh = tmp_path / "mesh.ply"
    trimesh.creation.box().export(mesh)
    with pytest.raises(UserError):
        Gaussians.load(mesh, _cfg(), "cpu")


def test_density():
    # an isolated Gaussian: density at its centre is its opacity, at 1σ along an axis o·e^{-1/2}
    ply = _hand_made([{"pos": (0.2, -0.1, 0.3), "opacity": 0.7, "scale": (0.05, 0.02, 0.01),
                       "quat": (0.8, 0.2, 0.5, -0.1)},
                      {"pos": (5.0, 5.0, 5.0), "opacity": 0.9, "scale": (0.05, 0.05, 0.05)}])
    g = Gaussians(_cfg(), "cpu", _gen(), init=ply)
    axis = quaternion_to_matrix(g.params["rotation"][:1].detach())[0, :, 0]  # first local axis, world
    pts = torch.stack([g.means[0].detach(), g.means[0].detach() + 0.05 * axis])
    torch.testing.assert_close(g.density(pts), torch.tensor([0.7, 0.7 * math.exp(-0.5)]))

    # many overlapping anisotropic Gaussians against the brute-force formula with explicit Σ⁻¹
    n, p = 300, 2000
    gen = _gen(9)
    q = torch.randn(n, 4, generator=gen)
    s = torch.rand(n, 3, generator=gen) * 0.1 + 0.01
    rand = GaussianPLY(torch.rand(n, 3, generator=gen) - 0.5, torch.zeros(n, 3), torch.zeros(n, 0, 3),
                       torch.randn(n, generator=gen), s.log(), q)
    g = Gaussians(_cfg(), "cpu", _gen(), init=rand)
    pts = torch.rand(p, 3, generator=gen) * 1.4 - 0.7
    rot = quaternion_to_matrix(q).double()
    cov = rot @ torch.diag_embed(s.double() ** 2) @ rot.transpose(1, 2)
    d = pts.double()[:, None] - rand.means.double()[None]
    maha = torch.einsum("pgi,gij,pgj->pg", d, torch.linalg.inv(cov), d)
    expected = (torch.sigmoid(rand.opacity.double()) * torch.exp(-0.5 * maha)).sum(-1)
    torch.testing.assert_close(g.density(pts, chunk=256, cutoff=float("inf")).double(), expected,
                               rtol=1e-4, atol=1e-5)
    bound = torch.sigmoid(rand.opacity).sum().item() * math.exp(-0.5 * 16)
    assert (g.density(pts, chunk=256) - expected.float()).abs().max() <= bound


def test_quaternion_convention_matches_scipy():
    from scipy.spatial.transform import Rotation

    q = torch.randn(50, 4, generator=_gen(12), dtype=torch.float64)
    expected = Rotation.from_quat(q[:, [1, 2, 3, 0]].numpy()).as_matrix()  # scipy wants x, y, z, w
    torch.testing.assert_close(quaternion_to_matrix(q), torch.from_numpy(expected))
