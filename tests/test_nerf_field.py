"""The NeRF field: threestudio's geometry (blob bias, MLP shapes, state-dict names), optimiser groups, the
environment-map background, backends against each other, pixel subsets, save/load."""

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

from microdreamer.config import NerfConfig, resolve
from microdreamer.errors import UserError
from microdreamer.render.hashgrid import HashGridConfig
from microdreamer.render.hashgrid import available_backends as encoding_backends
from microdreamer.render.volume import available_volume_backends
from microdreamer.representations.envmap import spherical_harmonics
from microdreamer.representations.mlp import VanillaMLP
from microdreamer.representations.nerf import NerfField
from microdreamer.representations.nerf_heads import heads_cpu, heads_torch, nerf_density
from microdreamer.representations.nerf_heads import unavailable_reason as heads_unavailable
from microdreamer.sir.cameras import Cameras

TINY = NerfConfig(hash_levels=8, hash_log2_size=14, radius=1.0, samples_per_ray=128)
WHITE = torch.ones(3)
F32_EPS = torch.finfo(torch.float32).eps
FAST = available_volume_backends()["cpu"] and encoding_backends()["cpu"]


def _field(cfg: NerfConfig = TINY, seed: int = 0, **changes) -> NerfField:
    return NerfField(dataclasses.replace(cfg, **changes), "cpu", torch.Generator().manual_seed(seed))


def _cams(res: int = 16) -> Cameras:
    return Cameras.orbit([-20.0, 10.0], [30.0, 200.0], 2.2, res, fovy=45.0)


def test_blob_bias_is_plus_ten_at_the_centre_zero_at_half_and_minus_ten_at_one(one_thread):
    field = _field()
    points = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, -0.3, 0.4], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(field.density_bias(points), torch.tensor([10.0, 0.0, 0.0, -10.0]))
    assert torch.equal(_field(density_bias="none").density_bias(points), torch.zeros(4))
    # the untrained field is that soft ball: σ = softplus(raw + bias) with |raw| tiny (weights × 1e-4 features)
    density = field.density(points)
    torch.testing.assert_close(density, torch.nn.functional.softplus(field.density_bias(points)), rtol=0, atol=1e-3)
    assert field.density(torch.tensor([[1.5, 0.0, 0.0]])).item() == 0.0  # outside the box


def test_threestudio_shapes_and_state_dict_names(one_thread):
    full = HashGridConfig()
    assert full.num_params == 12_599_920  # spec nerf §1.3
    field = _field(density_hidden_layers=2)
    state = field.state_dict()
    features = 8 * 2
    expected = {
        "geometry.encoding.encoding.encoding.params": (HashGridConfig(n_levels=8, log2_hashmap_size=14).num_params,),
        "geometry.density_network.layers.0.weight": (64, features),
        "geometry.density_network.layers.2.weight": (64, 64),
        "geometry.density_network.layers.4.weight": (1, 64),
        "geometry.feature_network.layers.0.weight": (64, features),
        "geometry.feature_network.layers.2.weight": (3, 64),
        "renderer.estimator.occs": (32**3,),
        "renderer.estimator.binaries": (1, 32, 32, 32),
    }
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert "background.network.layers.4.weight" in _field(background="envmap").state_dict()
    assert all(not m.bias for m in field.density_network.modules() if isinstance(m, torch.nn.Linear))
    # render step √3·2r/512 (spec nerf §1.5)
    assert _field(samples_per_ray=512, radius=2.0).settings.step == pytest.approx(1.353e-2, abs=1e-5)


def test_optimiser_groups_follow_each_teacher(one_thread):
    mv = resolve("mvdream-nerf").nerf
    field = _field(dataclasses.replace(mv, hash_levels=8, hash_log2_size=14))
    opt = field.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    lrs = {g["name"]: (g["lr"], g["weight_decay"], g["eps"], g["betas"]) for g in opt.param_groups}
    assert lrs == {"encoding": (0.01, 0.01, 1e-15, (0.9, 0.99)), "network": (0.001, 0.01, 1e-15, (0.9, 0.99)),
                   "background": (0.001, 0.01, 1e-15, (0.9, 0.99))}
    sz = _field(dataclasses.replace(resolve("stable-zero123-nerf").nerf, hash_levels=8, hash_log2_size=14))
    assert type(sz.optimizer) is torch.optim.Adam
    assert {(g["lr"], g["eps"], g["weight_decay"]) for g in sz.optimizer.param_groups} == {(0.01, 1e-8, 0.0)}
    n_params = sum(p.numel() for g in sz.optimizer.param_groups for p in g["params"])
    assert n_params == sz.params.numel() + (16 * 64 + 64 * 64 + 64) + (16 * 64 + 64 * 3)


def test_spherical_harmonics_are_orthonormal_with_tcnn_signs():
    # Fibonacci sphere: a near-uniform quadrature of the unit sphere
    n = 20000
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    d = torch.stack([(1 - z * z).sqrt() * phi.cos(), (1 - z * z).sqrt() * phi.sin(), z], -1)
    y = spherical_harmonics(d)
    gram = 4 * math.pi * y.T @ y / n
    torch.testing.assert_close(gram, torch.eye(9, dtype=torch.float64), rtol=0, atol=2e-3)
    up = spherical_harmonics(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))[0]
    torch.testing.assert_close(up, torch.tensor([0.28209479177387814, 0, 0.48860251190291987, 0, 0, 0,
                                                 0.6307831305050401, 0, 0], dtype=torch.float64))
    x = spherical_harmonics(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))[0]
    assert x[3] == pytest.approx(-0.48860251190291987) and x[8] == pytest.approx(0.54627421529603959)


def test_environment_map_background_drawn_once_per_iteration_white_afterwards(one_thread):
    field = _field(background="envmap", background_random_aug=0.5)
    # rays that miss the box see only the background
    miss = Cameras.orbit([0.0], [0.0], 2.2, 8, fovy=20.0)
    miss.c2w[:, :3, 3] += torch.tensor([0.0, 5.0, 0.0])
    outcomes = set()
    for _ in range(12):
        backdrop = field.new_iteration(miss, WHITE)
        renders = [field.render(miss, WHITE).rgb.detach() for _ in range(3)]
        for rgb in renders:  # every render of the iteration shows the backdrop it announced
            torch.testing.assert_close(rgb, backdrop, rtol=0, atol=1e-6)
        flat = renders[0].flatten(2)
        single = bool((flat - flat[..., :1]).abs().max() == 0)  # one random colour for the batch
        outcomes.add("random" if single else "envmap")
        if not single:
            torch.testing.assert_close(flat, field.envmap(miss.rays()[1].reshape(-1, 3)).T.reshape(1, 3, 64).detach())
    assert outcomes == {"random", "envmap"}
    assert _field().new_iteration(miss, WHITE) is None  # a white background: nothing to announce
    field.finalize()
    assert torch.equal(field.render(miss, WHITE).rgb, torch.ones(1, 3, 8, 8))


@pytest.mark.skipif(not FAST, reason="the C++ kernels do not build here")
def test_fast_backends_render_as_the_torch_reference(one_thread):
    """Same parameters, same samples: torch encoding+renderer against the C++ ones, values and gradients.

    Pruning is off and every grid cell occupied, so the sample sets cannot differ by a threshold flip of a
    density that differs in its last bits (the visibility kernels are compared on their own elsewhere)."""
    out = {}
    for backend in ("torch", "cpu"):
        field = _field(backend=backend, encoding_backend=backend, seed=3, alpha_threshold=0.0, early_stop_eps=0.0)
        field.grid.fill()
        field.finalize()  # deterministic sampling
        with torch.no_grad():  # a field with some structure: perturb the tiny initial table
            field.params.add_(torch.randn(field.params.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        render = field.render(_cams(), WHITE)
        (render.rgb.square().sum() + render.alpha.sum()).backward()
        out[backend] = (render.rgb.detach(), render.alpha.detach(), field.params.grad,
                        field.density_network.layers[0].weight.grad)
    # float32 encodings differ in the last bits (summation order); through the MLPs and the exponentials of
    # compositing that stays within ~1e-5 of values in [0,1], and of gradients relative to their largest
    for ref, got in zip(out["torch"], out["cpu"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.skipif(heads_unavailable() is not None, reason="the C++ heads kernel does not build here")
@pytest.mark.parametrize("density_layers", [1, 2])
def test_fused_heads_are_as_accurate_as_the_torch_reference(density_layers, one_thread):
    """Values and gradients of the C++ heads and of the float32 torch reference against a float64 run of the
    same networks: the kernel's error (other summation orders, blocks of 256 samples) must stay within a
    small multiple of the reference's own float32 error."""
    g = torch.Generator().manual_seed(density_layers)
    n, features = 3000, 16  # not a multiple of the kernel's block
    density, feature = VanillaMLP(features, 1, 64, density_layers, g), VanillaMLP(features, 3, 64, 1, g)
    enc = torch.randn(n, features, generator=g)
    bias = torch.randn(n, generator=g) * 8  # both softplus branches (> 20 and below)
    bias[:10] = 25.0
    w_sigma, w_rgb = torch.randn(n, generator=g), torch.randn(n, 3, generator=g)

    def run(fn, dtype):
        d, f = (VanillaMLP(features, k, 64, layers).to(dtype) for k, layers in ((1, density_layers), (3, 1)))
        d.load_state_dict(density.state_dict())
        f.load_state_dict(feature.state_dict())
        x = enc.to(dtype).requires_grad_()
        sigma, rgb = fn(x, bias.to(dtype), d, f)
        ((sigma * w_sigma.to(dtype)).sum() + (rgb * w_rgb.to(dtype)).sum()).backward()
        return [sigma.detach(), rgb.detach(), x.grad] + [p.grad for p in (*d.parameters(), *f.parameters())]

    exact = run(heads_torch, torch.float64)
    ref, got = run(heads_torch, torch.float32), run(heads_cpu, torch.float32)
    for e, r, c in zip(exact, ref, got):
        ref_err = float((r.double() - e).abs().max())
        scale = float(e.abs().max())
        assert float((c.double() - e).abs().max()) <= 4 * ref_err + 4 * F32_EPS * scale
    torch.testing.assert_close(nerf_density(enc, bias, density, "cpu"), nerf_density(enc, bias, density, "torch"),
                               rtol=4 * F32_EPS, atol=4 * F32_EPS * float(exact[0].abs().max()))


def test_pixel_subsets_equal_the_whole_render(one_thread):
    field = _field(seed=4)
    field.finalize()
    cams = _cams(12)
    whole = field.render(cams, WHITE)
    pixels = torch.tensor([[0, 5, 143, 77], [12, 13, 14, 100]])
    part = field.render_pixels(cams, WHITE, pixels)
    assert part.rgb.shape == (2, 3, 1, 4) and part.alpha.shape == (2, 1, 1, 4)
    for b in range(2):
        torch.testing.assert_close(part.rgb[b, :, 0], whole.rgb[b].flatten(1)[:, pixels[b]], rtol=0, atol=1e-6)
        torch.testing.assert_close(part.depth[b, 0, 0], whole.depth[b, 0].flatten()[pixels[b]], rtol=0, atol=1e-5)


def test_training_refreshes_the_occupancy_grid_every_16_steps(one_thread):
    field = _field(seed=5)
    before = field.grid.occs.clone()
    assert field.num_primitives == int(field.grid.binaries.sum()) > 0
    for i in range(16):
        field.render(_cams(8), WHITE).rgb.mean().backward()
        field.step(i + 2, None)
        assert torch.equal(field.grid.occs, before) == (i < 15)


def test_save_and_load_round_trip(tmp_path, one_thread):
    field = _field(background="envmap", seed=6)
    for i in range(3):
        field.render(_cams(8), WHITE).rgb.mean().backward()
        field.step(i, None)
    field.finalize()
    path = tmp_path / "run.safetensors"
    field.save(path)
    field.save(tmp_path / "again.safetensors")  # the same field, the same bytes (one metadata key: no random order)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    loaded = NerfField.load(path, "cpu")
    assert loaded.cfg == field.cfg and not loaded.training
    for key, value in field.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded.render(_cams(), WHITE).rgb, field.render(_cams(), WHITE).rgb)
    state = field.state_dict()
    save_file({k: v for k, v in state.items() if "feature" not in k}, str(tmp_path / "cut.safetensors"),
              metadata={"microdreamer-nerf": "{}"})
    with pytest.raises(UserError, match="missing keys 'geometry.feature_network"):
        NerfField.load(tmp_path / "cut.safetensors", "cpu")
    save_file(state, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(UserError, match="not a NeRF written by microdreamer"):
        NerfField.load(tmp_path / "foreign.safetensors", "cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="cannot read"):
        NerfField.load(tmp_path / "junk.safetensors", "cpu")
