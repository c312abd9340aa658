"""The teacher registry: a name on the command line → a constructed teacher and its default preset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..errors import UserError
from .base import Teacher


@dataclass(frozen=True)
class TeacherEntry:
    name: str
    preset: str  # the preset a run with this teacher starts from
    inputs: str  # "image", "text" or "image+text"
    build: Callable[[RunConfig, torch.device, bool], Teacher]  # (config, device, allow_download)


def _reference(cfg: RunConfig, device: torch.device, allow_download: bool) -> Teacher:
    from .reference import ReferenceTeacher

    if not cfg.teacher.model:
        raise UserError("the reference teacher needs a mesh: pass --model MESH (.obj, .glb or .gltf)")
    t = cfg.teacher
    return ReferenceTeacher(
        t.model, device=device, resolution=cfg.cameras.resolution, background=cfg.background, shading=t.shading,
        imperfection=t.imperfection, full_at=cfg.schedule.t_start,
    )


def _zero123(variant: str) -> Callable[[RunConfig, torch.device, bool], Teacher]:
    def build(cfg: RunConfig, device: torch.device, allow_download: bool) -> Teacher:
        from .zero123 import Zero123Teacher

        return Zero123Teacher.from_pretrained(
            cfg.teacher.model, variant=variant, device=device, dtype=cfg.teacher.dtype, allow_download=allow_download
        )

    return build


def _multiview(name: str) -> Callable[[RunConfig, torch.device, bool], Teacher]:
    def build(cfg: RunConfig, device: torch.device, allow_download: bool) -> Teacher:
        from .mvdream import VIEWS_PER_OBJECT, ImageDreamTeacher, MVDreamTeacher

        if cfg.cameras.views % VIEWS_PER_OBJECT:
            raise UserError(
                f"{name} denoises groups of {VIEWS_PER_OBJECT} views: --views must be a multiple of "
                f"{VIEWS_PER_OBJECT}, got {cfg.cameras.views}"
            )
        cls = ImageDreamTeacher if name == "imagedream" else MVDreamTeacher
        return cls.from_pretrained(
            cfg.teacher.model, device=device, dtype=cfg.teacher.dtype, allow_download=allow_download
        )

    return build


TEACHERS: dict[str, TeacherEntry] = {
    e.name: e
    for e in (
        TeacherEntry("reference", "reference", "image", _reference),
        TeacherEntry("stable-zero123", "stable-zero123", "image", _zero123("stable")),
        TeacherEntry("zero123-xl", "zero123-xl", "image", _zero123("xl")),
        TeacherEntry("mvdream", "mvdream", "text", _multiview("mvdream")),
        TeacherEntry("imagedream", "imagedream", "image+text", _multiview("imagedream")),
    )
}


def teacher_entry(name: str) -> TeacherEntry:
    if name not in TEACHERS:
        raise UserError(f"unknown teacher '{name}' (available: {', '.join(TEACHERS)})")
    return TEACHERS[name]
