"""The teacher registry: a name on the command line → a constructed teacher and its default preset.

The same names pick what makes LGM's four views (``method = "lgm"``, ``init = "lgm"``;
:mod:`microdreamer.feedforward`): the multi-view teachers and the reference teacher, and Zero123++, a
multi-view generator that is no SIR teacher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import RunConfig
from ..errors import UserError
from ..wording import plural
from .base import Teacher
from .catalog import find_entry
from .loading import local_model_dir, resolve_model_dir
from .mv_cameras import VIEWS_PER_OBJECT

if TYPE_CHECKING:
    from .mvdream import MultiViewTeacher, PromptReader


@dataclass(frozen=True)
class TeacherEntry:
    name: str
    preset: str  # the preset a run with this teacher starts from
    inputs: str  # "image", "text" or "image+text"
    build: Callable[[RunConfig, torch.device, bool], Teacher]  # (config, device, allow_download)
    views_multiple: int = 1  # --views must be a multiple of this (views the teacher denoises together)
    weights: str | None = None  # the catalog entry of its default weights; None: it needs none
    sir: bool = True  # False: a multi-view generator that only makes LGM's views (no SIR, no texture refinement)

    def preset_for(self, representation: str) -> str:
        """The preset a run of ``representation`` with this teacher starts from: ``preset`` for Gaussians,
        ``<preset>-nerf`` for a NeRF (the paper's Table I NeRF column)."""
        return self.preset if representation == "gaussians" else f"{self.preset}-{representation}"


def _reference(cfg: RunConfig, device: torch.device, allow_download: bool) -> Teacher:
    from .reference import ReferenceTeacher

    check_teacher_config(cfg)
    t = cfg.teacher
    return ReferenceTeacher(
        t.model, device=device, resolution=cfg.cameras.resolution, background=cfg.background, shading=t.shading,
        imperfection=t.imperfection, full_at=cfg.schedule.t_start,
    )


def _zero123(variant: str) -> Callable[[RunConfig, torch.device, bool], Teacher]:
    def build(cfg: RunConfig, device: torch.device, allow_download: bool) -> Teacher:
        from .zero123 import Zero123Teacher

        check_teacher_config(cfg)
        return Zero123Teacher.from_pretrained(
            cfg.teacher.model, variant=variant, device=device, dtype=cfg.teacher.dtype, allow_download=allow_download
        )

    return build


def _multiview(name: str) -> Callable[[RunConfig, torch.device, bool], Teacher]:
    def build(cfg: RunConfig, device: torch.device, allow_download: bool) -> Teacher:
        check_teacher_config(cfg)
        return _multiview_class(name).from_pretrained(
            cfg.teacher.model, device=device, dtype=cfg.teacher.dtype, allow_download=allow_download
        )

    return build


def _multiview_class(name: str) -> type[MultiViewTeacher]:
    from .mvdream import ImageDreamTeacher, MVDreamTeacher

    return ImageDreamTeacher if name == "imagedream" else MVDreamTeacher


TEACHERS: dict[str, TeacherEntry] = {
    e.name: e
    for e in (
        TeacherEntry("reference", "reference", "image", _reference),
        TeacherEntry("stable-zero123", "stable-zero123", "image", _zero123("stable"), weights="stable-zero123"),
        TeacherEntry("zero123-xl", "zero123-xl", "image", _zero123("xl"), weights="zero123-xl"),
        TeacherEntry("mvdream", "mvdream", "text", _multiview("mvdream"), views_multiple=VIEWS_PER_OBJECT,
                     weights="mvdream"),
        TeacherEntry("imagedream", "imagedream", "image+text", _multiview("imagedream"),
                     views_multiple=VIEWS_PER_OBJECT, weights="imagedream"),
    )
}


#: known models that are not SIR teachers, and why a run cannot use them as one
NOT_TEACHERS: dict[str, str] = {
    "zero123plus": (
        "'zero123plus' (Zero123++ v1.1) is a fixed-view multi-view generator, not an SIR teacher: its six views "
        "have fixed poses, so it cannot refine renders from SIR's cameras (it feeds the multi-view "
        "reconstruction path, --method lgm)"
    ),
    "geco": "'geco' (a distilled GECO run) is no SIR teacher: run it with --method geco --model RUN_DIR",
}


def _not_a_teacher(name: str) -> Callable[[RunConfig, torch.device, bool], Teacher]:
    def build(cfg: RunConfig, device: torch.device, allow_download: bool) -> Teacher:
        raise UserError(NOT_TEACHERS[name])

    return build


#: what makes LGM's four views (--method lgm; --init lgm takes those that are SIR teachers too)
VIEW_SOURCES: dict[str, TeacherEntry] = {
    **{name: TEACHERS[name] for name in ("imagedream", "mvdream", "reference")},
    "zero123plus": TeacherEntry("zero123plus", "zero123plus-lgm", "image", _not_a_teacher("zero123plus"),
                                weights="zero123plus", sir=False),
}


#: a distilled GECO run (--method geco, --model RUN_DIR): its one-step generator makes the views and its
#: reconstructor (or, for a Stage I run, the published LGM) the Gaussians (:mod:`microdreamer.distill.inference`)
GECO = TeacherEntry("geco", "geco", "image", _not_a_teacher("geco"), sir=False)


def teacher_entry(name: str) -> TeacherEntry:
    if name in NOT_TEACHERS:
        raise UserError(NOT_TEACHERS[name])
    if name not in TEACHERS:
        raise UserError(f"unknown teacher '{name}' (available: {', '.join(TEACHERS)})")
    return TEACHERS[name]


def view_source_entry(name: str, sir: bool = False) -> TeacherEntry:
    """The entry of what makes LGM's four views (``sir``: and is the SIR teacher too, for --init lgm)."""
    entry = VIEW_SOURCES.get(name) or teacher_entry(name)
    sources = [n for n, e in VIEW_SOURCES.items() if e.sir or not sir]
    if name not in sources:
        what = "--init lgm needs an SIR teacher that" if sir else "--method lgm needs a teacher that"
        raise UserError(f"'{name}' does not make LGM's four views: {what} does ({', '.join(sources)})")
    return entry


def run_entry(cfg: RunConfig) -> TeacherEntry:
    """The entry of ``cfg``'s teacher: an SIR teacher, or for ``method = "lgm"`` the source of LGM's views (for
    ``method = "geco"`` the GECO run)."""
    if cfg.method == "geco":
        return GECO
    if cfg.method == "lgm":
        return view_source_entry(cfg.teacher.name)
    return view_source_entry(cfg.teacher.name, sir=True) if cfg.init == "lgm" else teacher_entry(cfg.teacher.name)


def default_preset(name: str, method: str | None = None, init: str | None = None) -> str:
    """The preset a run starts from when none is named: the teacher's own, ``<name>-lgm`` for --method lgm,
    the teacher's ``-lgm-init`` variant for --init lgm or geco, ``geco`` for --method geco."""
    if method == "geco":
        return GECO.preset
    if method == "lgm":
        return f"{view_source_entry(name).name}-lgm"
    if init == "lgm":
        return f"{view_source_entry(name, sir=True).preset}-lgm-init"
    if init == "geco":  # the same kind of start as LGM's: the teacher's -lgm-init schedule
        starts = [n for n, e in VIEW_SOURCES.items() if e.sir]
        if name not in starts:
            raise UserError(f"--init geco runs SIR with a teacher's -lgm-init preset; '{name}' has none: pass "
                            f"--teacher {', '.join(starts[:-1])} or {starts[-1]}, or --preset")
        return f"{teacher_entry(name).preset}-lgm-init"
    return teacher_entry(name).preset


def check_teacher_config(cfg: RunConfig) -> TeacherEntry:
    """The entry of ``cfg``'s teacher (:func:`run_entry`), once ``cfg`` is checked for what that teacher needs,
    before it loads: the reference teacher a mesh file, a model folder given as a path its layout, the
    multi-view teachers views in groups they denoise together, LGM (when used) its weights' source, a
    generator that is no teacher no texture refinement, a GECO run (--model, --init-model) its folder and checkpoint."""
    entry = run_entry(cfg)
    if not entry.sir and cfg.mesh.refine_steps:
        raise UserError(f"'{entry.name}' is no SIR teacher and cannot refine a mesh texture: pass --refine-steps 0")
    if entry is GECO:
        from ..distill.inference import check_run

        check_run(cfg)
        return entry
    if cfg.init == "geco":
        from ..distill.inference import check_run

        check_run(cfg)
    elif cfg.feedforward:
        from ..reconstructors.lgm import check_weights_source

        check_weights_source(cfg.lgm.reconstructor, cfg.lgm.weights)
    model = cfg.teacher.model
    if entry.name == "reference":
        if not model:
            raise UserError("the reference teacher needs a mesh: pass --model MESH (.obj, .glb or .gltf)")
        if not Path(model).expanduser().is_file():
            raise UserError(f"mesh file not found: {model} (--model)")
    elif model:
        local_model_dir(model)
    views, multiple = cfg.cameras.views, entry.views_multiple
    if views % multiple and cfg.method == "sir":  # the feed-forward path takes no SIR views
        raise UserError(
            f"{entry.name} denoises groups of {plural(multiple, 'view')}: --views must be a multiple of "
            f"{multiple}, got {views}"
        )
    return entry


def fetch_weights(cfg: RunConfig, allow_download: bool = True) -> Path | None:
    """The folder of ``cfg``'s teacher weights on this machine, downloaded into the cache first when they are
    missing and ``allow_download``; None for a teacher without weights (the reference teacher)."""
    entry = run_entry(cfg)
    if entry is GECO:
        from ..distill.inference import fetch_generator

        return fetch_generator(cfg, allow_download)
    if entry.weights is None:
        return None
    return resolve_model_dir(cfg.teacher.model or find_entry(entry.weights).repo_id, allow_download=allow_download)


def prompt_reader(cfg: RunConfig, allow_download: bool = True) -> PromptReader | None:
    """How ``cfg``'s teacher reads prompts, known before it loads; None for a teacher without prompts or
    when its tokenizer cannot be had (see :meth:`MultiViewTeacher.prompt_reader`)."""
    if run_entry(cfg).inputs == "image":
        return None
    return _multiview_class(cfg.teacher.name).prompt_reader(cfg.teacher.model, allow_download)
