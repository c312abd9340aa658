"""The t1/t2 schedule against the reference tables of spec §6.3."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from microdreamer.config import ScheduleConfig
from microdreamer.sir.schedule import SIRSchedule
from microdreamer.sir.scheduler import ddim_timesteps, inverse_timesteps

IMAGE_SAI = ScheduleConfig(t_start=0.9, t_end=0.2, inverse_ratio=0.6, denoise_steps=20, iterations=20)
IMAGEDREAM = ScheduleConfig(t_start=0.8, t_end=0.4, inverse_ratio=0.6, denoise_steps=10, iterations=30)


def _expand(rows):
    """Spec rows (first k, last k, t2, t1, #inversion, #sampling) → one tuple per k."""
    return [(t2, t1, inv, smp) for lo, hi, t2, t1, inv, smp in rows for _ in range(lo, hi + 1)]


# spec §6.3, "Computed schedules"
IMAGE_SAI_TABLE = _expand([
    (0, 0, 901, 501, 8, 19), (1, 1, 851, 501, 7, 18), (2, 2, 801, 451, 7, 17), (3, 4, 751, 451, 6, 16),
    (5, 5, 701, 401, 6, 15), (6, 7, 651, 351, 6, 14), (8, 8, 601, 351, 5, 13), (9, 9, 551, 301, 5, 12),
    (10, 11, 501, 301, 4, 11), (12, 12, 451, 251, 4, 10), (13, 14, 401, 201, 4, 9), (15, 15, 351, 201, 3, 8),
    (16, 17, 301, 151, 3, 7), (18, 18, 251, 151, 2, 6), (19, 19, 201, 101, 2, 5),
])
IMAGEDREAM_TABLE = _expand([
    (0, 0, 801, 401, 4, 9), (1, 7, 701, 401, 3, 8), (8, 15, 601, 301, 3, 7), (16, 22, 501, 301, 2, 6),
    (23, 29, 401, 201, 2, 5),
])


def _rows(schedule: SIRSchedule):
    return [(p.t2, p.t1, p.uncond_passes, p.guided_passes) for p in schedule.plans]


@pytest.mark.parametrize(
    "cfg, table, total",
    [(IMAGE_SAI, IMAGE_SAI_TABLE, 352), (IMAGEDREAM, IMAGEDREAM_TABLE, 285)],
    ids=["image_sai", "imagedream"],
)
def test_reference_tables(cfg, table, total):
    schedule = SIRSchedule.from_config(cfg)
    assert schedule.iterations == cfg.iterations == len(table)
    assert _rows(schedule) == table
    assert schedule.init.sampling == tuple(ddim_timesteps(cfg.denoise_steps))
    assert schedule.init.inversion == ()
    assert schedule.guided_passes + schedule.uncond_passes == total
    assert schedule.uncond_passes == sum(row[2] for row in table)


def test_float_quirk_starts_at_index_one():
    """N(1 − 0.9) evaluates just below 2, so image_sai starts at τ[1] = 901 and not τ[2] = 851."""
    assert 20 * (1 - 0.9) < 2
    assert SIRSchedule.from_config(IMAGE_SAI).iteration(0).t2 == 901


def test_plan_paths():
    plan = SIRSchedule.from_config(IMAGE_SAI).iteration(0)
    assert plan.inversion == tuple((t - 50, t) for t in range(551, 902, 50))
    assert plan.sampling == tuple(range(901, 0, -50))
    with pytest.raises(IndexError):
        SIRSchedule.from_config(IMAGE_SAI).iteration(20)


def test_inverse_ratio_one_is_pure_noising():
    schedule = SIRSchedule.from_config(dataclasses.replace(IMAGEDREAM, inverse_ratio=1.0))
    assert all(p.t1 == p.t2 and p.uncond_passes == 0 for p in schedule.plans)


def test_square_t2_schedule():
    """Squared progress fraction: same start, t2 decays slower first, and never above linear's t2."""
    cfg = dataclasses.replace(IMAGE_SAI, kind="square")
    square, linear = SIRSchedule.from_config(cfg), SIRSchedule.from_config(IMAGE_SAI)
    tau = ddim_timesteps(20)
    start, end = 20 * (1 - 0.9), 20 * (1 - 0.2)
    expected = [tau[int((k / 20) ** 2 * (end - start) + start)] for k in range(20)]
    assert [p.t2 for p in square.plans] == expected
    assert expected[:3] == [901, 851, 851] and expected[-1] == 251
    assert all(s.t2 >= li.t2 for s, li in zip(square.plans, linear.plans))
    assert [p.t2 for p in square.plans] == sorted((p.t2 for p in square.plans), reverse=True)


def test_square_t1_mode():
    """t1 ≈ t2²/T snapped down to the inversion grid."""
    schedule = SIRSchedule.from_config(dataclasses.replace(IMAGE_SAI, t1="square"))
    iota = inverse_timesteps(20)
    for p in schedule.plans:
        assert p.t1 in iota and p.t1 <= p.t2**2 / 1000 < p.t1 + 50
    assert (schedule.plans[0].t2, schedule.plans[0].t1) == (901, 801)  # 901²/1000 = 811.8
    assert (schedule.plans[-1].t2, schedule.plans[-1].t1) == (201, 1)  # 40.4 → ι[0]


def test_random_schedule_uses_generator():
    cfg = dataclasses.replace(IMAGE_SAI, kind="random")
    a = SIRSchedule.from_config(cfg, torch.Generator().manual_seed(7))
    b = SIRSchedule.from_config(cfg, torch.Generator().manual_seed(7))
    c = SIRSchedule.from_config(cfg, torch.Generator().manual_seed(8))
    assert a == b and _rows(a) != _rows(c)
    t2s = {p.t2 for p in a.plans}
    assert t2s <= set(range(201, 902, 50)) and len(t2s) > 3
    with pytest.raises(ValueError, match="Generator"):
        SIRSchedule.from_config(cfg)


def test_bad_modes_rejected():
    with pytest.raises(ValueError):
        SIRSchedule.from_config(dataclasses.replace(IMAGE_SAI, kind="cosine"))
    with pytest.raises(ValueError):
        SIRSchedule.from_config(dataclasses.replace(IMAGE_SAI, t1="cube"))
