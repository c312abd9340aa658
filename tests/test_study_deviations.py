"""benchmarks/study_deviations.py's arms change what they claim: the densification steps of the real engine's step
counter, the one view the last-view statistic reads, and bench_mesh's ``--set`` parsing."""

import sys
from pathlib import Path

import pytest
import torch

from microdreamer.representations.densify import DensifyState

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_mesh import setting  # noqa: E402
from study_deviations import ARMS, CHANGES, LastViewStrategy, SkipStrategy, verdict  # noqa: E402
from test_engine import _run, fired  # noqa: E402


def test_the_init50_arms_put_step_100_on_an_increment_which_the_reference_skips_and_we_fire_at_101():
    reference, init50 = _run("reference"), _run("reference", {"schedule": {"init_steps": 50}})
    assert fired(reference) == fired(reference, SkipStrategy) == [100, 200, 300]  # nothing skipped over
    assert fired(init50, SkipStrategy) == [200, 300]
    assert fired(init50) == [101, 200, 300]


def test_last_view_reads_the_view_before_the_reference_view_only():
    grads = torch.zeros(7, 3, 2)
    grads[5, :, 0] = 1.0  # the last novel view: 1 px → 128 NDC units at 256 px
    grads[6, :, 0] = 5.0  # the reference view, appended by the engine
    radii = torch.ones(7, 3)
    radii[5, 2] = 0  # Gaussian 2 is not visible in it
    state = DensifyState.zeros(3, "cpu")
    LastViewStrategy().accumulate(state, grads, radii, 256, 256)
    assert state.count.tolist() == [1, 1, 0] and state.average().tolist() == [128.0, 128.0, 0.0]


def test_every_change_has_its_baseline_arm_and_the_verdict_needs_more_than_one_sd():
    assert all(change in ARMS and baseline in ARMS for change, (baseline, _, _) in CHANGES.items())
    assert verdict([0.80, 0.82, 0.84], [0.90, 0.91, 0.92], True)[2] == "win"  # +0.09 against sd 0.02
    assert verdict([0.80, 0.82, 0.84], [0.81, 0.83, 0.85], True)[2] == "tie"  # +0.01 against sd 0.02
    assert verdict([0.010, 0.011, 0.012], [0.020, 0.021, 0.022], False)[2] == "loss"  # Chamfer: smaller wins


def test_set_parses_dotted_keys_and_toml_values():
    assert setting("mesh.refine_lr=0.2") == {"mesh": {"refine_lr": 0.2}}
    assert setting("schedule.init_steps=50") == {"schedule": {"init_steps": 50}}
    assert setting("teacher.shading=albedo") == {"teacher": {"shading": "albedo"}}
    with pytest.raises(Exception, match="KEY=VALUE"):
        setting("mesh.refine_lr")
