"""ReferenceTeacher: its eps predicts the mesh's (lit or albedo) rendering exactly, pixel-space encode/decode,
counting, front view; with an imperfection level, the defects of a sampling pass's t2."""


import pytest
import torch
from shared_assets import SHARED_ASSETS

from microdreamer.io.mesh import TexturedMesh, load_mesh
from microdreamer.render.mesh import rasterize_mesh, shading_light
from microdreamer.sir.cameras import Cameras
from microdreamer.sir.scheduler import ddim_step
from microdreamer.teachers.base import Condition
from microdreamer.teachers.reference import ReferenceTeacher
from tolerances import assert_within, printed, rounding_bound

AVOCADO = SHARED_ASSETS / "avocado" / "avocado.gltf"
RES = 32


def _mesh() -> TexturedMesh:
    """A small textured mesh: the avocado when available, else a vertex-coloured tetrahedron."""
    if AVOCADO.exists():
        return load_mesh(AVOCADO)
    verts = torch.tensor([[0.0, 0.5, 0.0], [-0.5, -0.3, 0.3], [0.5, -0.3, 0.3], [0.0, -0.3, -0.5]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]])
    return TexturedMesh(verts, faces, vertex_colors=torch.rand(4, 3, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def teacher() -> ReferenceTeacher:
    return ReferenceTeacher(_mesh(), resolution=RES)


def _cameras() -> Cameras:
    return Cameras.orbit([0.0, -20.0, 15.0], [0.0, 120.0, 240.0], 2.0, 256)  # resized to the teacher's size


@pytest.mark.parametrize("shading", ["lit", "albedo"])
@pytest.mark.parametrize("t", [0, 1, 51, 501, 951, 999])
def test_x0_prediction_from_eps_is_the_rendering(teacher, t, shading):
    teacher = teacher if shading == "lit" else ReferenceTeacher(_mesh(), resolution=RES, shading="albedo")
    cams = _cameras()
    x_t = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(t))
    eps = teacher.predict_noise(x_t, t, cams, "cond")
    a = teacher.alphas_cumprod[t].item()
    x0 = (x_t - (1 - a) ** 0.5 * eps) / a**0.5
    render = rasterize_mesh(teacher.mesh, cams.with_resolution(RES), teacher.background, supersample=2,
                            light=shading_light(shading))
    target = 2 * render.rgb - 1
    assert eps.dtype == torch.float32 and eps.shape == x_t.shape
    # eps and x0 each take 3 float32 roundings of terms that add up to (|x_t| + √(1−ᾱ)|eps|)/√ᾱ
    magnitude = (x_t.abs().max().item() + (1 - a) ** 0.5 * eps.abs().max().item()) / a**0.5
    assert_within(x0, target, rounding_bound(magnitude, ops=6), f"x0 at t={t}")
    assert float((target + 1).std()) > 0.05  # the views are not blank
    assert teacher.mode == f"{shading}, imperfection none"


def test_targets_keep_the_backdrop_of_the_renders_being_refined():
    """With a backdrop (a NeRF's environment map or random colour), the target is the mesh over it: the
    backdrop where the mesh does not cover a pixel, the plain target where it covers it fully."""
    teacher = ReferenceTeacher(_mesh(), resolution=RES)
    cams = _cameras()
    plain = teacher.target(cams, 501)
    alpha = teacher.render(cams).alpha
    backdrop = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # render size: resized
    teacher.set_backdrop(backdrop)
    over = teacher.target(cams, 501)
    resized = torch.nn.functional.interpolate(backdrop, (RES, RES), mode="bilinear", align_corners=False)
    empty, covered = (alpha == 0).expand_as(over), (alpha == 1).expand_as(over)
    assert empty.any() and covered.any()
    torch.testing.assert_close(over[empty], resized[empty], rtol=0, atol=1e-6)
    torch.testing.assert_close(over[covered], plain[covered], rtol=0, atol=0)
    teacher.set_backdrop(None)
    assert torch.equal(teacher.target(cams, 501), plain)


def test_lit_targets_are_the_albedo_times_the_key_light(teacher):
    """Lit = albedo · (ambient + key · max(0, n · l)): between 0.4 and 0.9 times the albedo on the object."""
    albedo = ReferenceTeacher(_mesh(), resolution=RES, shading="albedo")
    cams = _cameras()
    lit, flat = teacher.render(cams), albedo.render(cams)
    inside = (flat.alpha == 1).expand_as(flat.rgb) & (flat.rgb > 0.05)
    ratio = lit.rgb[inside] / flat.rgb[inside]
    assert inside.sum() > 100
    assert float(ratio.min()) >= 0.4 - 1e-4 and float(ratio.max()) <= 0.9 + 1e-4
    assert float(ratio.max() - ratio.min()) > 0.2  # shaded, not a constant factor
    assert torch.equal(lit.alpha, flat.alpha)


def test_one_ddim_step_from_t_lands_on_the_noised_rendering(teacher):
    """With eta 0 the step keeps eps: x_prev = sqrt(ᾱ_prev) x_ref + sqrt(1 − ᾱ_prev) eps."""
    cams = _cameras()
    x_t = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(7))
    eps = teacher.predict_noise(x_t, 501, cams, "guided", 3.0)
    x_prev = ddim_step(eps, 501, x_t, teacher.alphas_cumprod, 20)
    x_ref = teacher.encode(teacher.render(cams).rgb)
    a_prev = teacher.alphas_cumprod[451].item()
    a = teacher.alphas_cumprod[501].item()
    # eps, x0 and x_prev: 8 float32 roundings of terms that add up to √ᾱ_prev (|x_t| + |eps|)/√ᾱ + |eps|
    magnitude = a_prev**0.5 * (x_t.abs().max() + eps.abs().max()).item() / a**0.5 + eps.abs().max().item()
    assert_within(x_prev, a_prev**0.5 * x_ref + (1 - a_prev) ** 0.5 * eps, rounding_bound(magnitude, ops=8), "x_prev")


def test_branches_and_guidance_scale_do_not_matter(teacher):
    cams = _cameras()
    x_t = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    cond = teacher.predict_noise(x_t, 301, cams, "cond")
    assert torch.equal(teacher.predict_noise(x_t, 301, cams, "uncond"), cond)
    assert torch.equal(teacher.predict_noise(x_t, 301, cams, "guided", 7.5), cond)


def test_evaluation_counter_increments():
    teacher = ReferenceTeacher(_mesh(), resolution=RES)
    cams = _cameras()
    x_t = torch.zeros(3, 3, RES, RES)
    teacher.predict_noise(x_t, 10, cams, "guided", 3.0)
    teacher.predict_noise(x_t, 10, cams, "uncond")
    teacher.predict_noise(x_t, 10, cams, "cond")
    assert teacher.evaluations.as_dict() == {"total": 3, "guided": 1, "single_branch": 2, "view_evaluations": 12}


def test_pixel_space_encode_decode_and_shapes(teacher):
    x = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    z = teacher.encode(x)
    assert torch.equal(z, 2 * x - 1)
    assert_within(teacher.decode(z), x, rounding_bound(1.0, ops=2), "decode(encode(x))")  # −1, then +1
    clamped = teacher.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    assert torch.equal(clamped, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert teacher.latent_shape(4) == (4, 3, RES, RES)
    teacher.prepare(Condition())  # any condition is accepted
    teacher.prepare(Condition(prompt="a cow", elevation=-30.0))


def test_schedule_is_the_scaled_linear_table(teacher):
    a = teacher.alphas_cumprod
    assert a.dtype == torch.float64 and a.shape == (1000,)
    spec = {0: 0.999150, 1: 0.998296, 501: 0.274999, 901: 0.014005, 999: 0.004660}  # spec §0.1
    for t, value in spec.items():
        assert float(a[t]) == pytest.approx(value, abs=printed(6))


def test_front_image_is_the_antialiased_azimuth_zero_render(teacher):
    rgb, mask = teacher.front_image(-10.0, 2.0, 49.1)
    assert rgb.shape == (1, 3, RES, RES) and mask.shape == (1, 1, RES, RES)
    assert 0.05 < float(mask.mean()) < 0.9
    assert ((mask > 0) & (mask < 1)).any()  # antialiased edge
    assert torch.all(rgb[:, :, mask[0, 0] == 0] == 1)  # white background
    camera = Cameras.orbit([-10.0], [0.0], 2.0, 512)
    same_rgb, same_mask = teacher.front_image(camera)  # the pipeline passes the reference camera itself
    assert torch.equal(same_rgb, rgb) and torch.equal(same_mask, mask)


def test_renders_are_cached_per_camera_batch(teacher):
    cams = _cameras()
    assert teacher.render(cams) is teacher.render(cams.with_resolution(64))
    assert teacher.render(cams) is not teacher.render(cams[:2])


def test_loading_from_a_path_matches_a_loaded_mesh():
    if not AVOCADO.exists():
        pytest.skip("avocado not available")
    cams = _cameras()
    by_path = ReferenceTeacher(AVOCADO, resolution=RES, background=(0.0, 0.0, 0.0), backend="torch")
    by_mesh = ReferenceTeacher(load_mesh(AVOCADO), resolution=RES, background=torch.zeros(3), backend="torch")
    assert torch.equal(by_path.render(cams).rgb, by_mesh.render(cams).rgb)
    assert float(by_path.front_image()[0].min()) == 0.0  # black background


def test_an_imperfect_teacher_aims_a_sampling_pass_at_the_defects_of_its_t2():
    cams = _cameras()
    teacher = ReferenceTeacher(_mesh(), resolution=RES, imperfection="moderate")
    teacher.prepare(Condition(), torch.Generator().manual_seed(0))
    clean = teacher.render(cams).rgb
    assert torch.equal(teacher.target(cams, 901, "uncond"), clean)  # the inversion aims at the render
    start = teacher.target(cams, 901)  # a pass from t2 = 901 (full amplitude)
    assert float((start - clean).abs().mean()) > 5e-3
    assert torch.equal(teacher.target(cams, 851), start) and torch.equal(teacher.target(cams, 1), start)
    near = teacher.target(cams, 1)  # a query not below the previous one starts a pass from t2 = 1
    assert float((near - clean).abs().max()) < 1e-3 and not torch.equal(near, start)
    again = ReferenceTeacher(_mesh(), resolution=RES, imperfection="moderate")
    again.prepare(Condition(), torch.Generator().manual_seed(0))
    assert torch.equal(again.target(cams, 901), start)  # the run's seed fixes the defects
    again.prepare(Condition(), torch.Generator().manual_seed(1))
    other = again.target(cams, 901)
    assert not torch.equal(other, start)
    x_t = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(2))
    eps = again.predict_noise(x_t, 501, cams, "guided", 3.0)  # in the pass from 901: eps leads to its target
    a = again.alphas_cumprod[501].item()
    assert torch.allclose((x_t - (1 - a) ** 0.5 * eps) / a**0.5, 2 * other - 1, atol=2e-5)
    assert again.mode == "lit, imperfection moderate"
    rgb, _ = again.front_image(cams[:1])  # the input image is the exact render
    exact = rasterize_mesh(again.mesh, cams[:1].with_resolution(RES), again.background, supersample=2,
                           light=shading_light("lit")).rgb
    assert torch.equal(rgb, exact) and not torch.equal(rgb, other[:1])
