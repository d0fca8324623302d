"""The nine schedulers against ComfyUI 0.29's own sigmas (tests/data/comfyui_schedules.json, 648 rows)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aura_flow import ParameterError
from aura_flow.sampling.registry import SAMPLER_NAMES, SCHEDULER_NAMES
from aura_flow.plan import sigmas
from aura_flow.sampling.schedules import ModelSampling

DATA = Path(__file__).resolve().parent / "data" / "comfyui_schedules.json"
ROWS = json.loads(DATA.read_text())["rows"]


def _id(row):
    return f"{row['scheduler']}-{row['sampler']}-s{row['shift']}-n{row['steps']}-d{row['denoise']}"


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_sigmas_match_comfyui(row):
    got = sigmas(row["scheduler"], row["steps"], shift=row["shift"], denoise=row["denoise"], sampler=row["sampler"])
    want = torch.tensor(row["sigmas"], dtype=torch.float32)
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    # ComfyUI's kl_optimal divides by steps - 1, so 1 step gives [nan, 0] there; the rows record that and the
    # engine reproduces it (a NaN must sit exactly where ComfyUI has one).
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    if ok.any():
        assert (got[ok] - want[ok]).abs().max().item() <= 1e-6


def test_fixture_covers_every_scheduler():
    assert {r["scheduler"] for r in ROWS} == set(SCHEDULER_NAMES)
    assert len(ROWS) == 648


def test_table_at_shift_1_73():
    ms = ModelSampling(1.73)
    assert ms.sigma_max.item() == pytest.approx(1.0)
    assert ms.sigma_min.item() == pytest.approx(1.73 * 0.001 / (1 + 0.73 * 0.001), rel=1e-6)
    assert ms.percent_to_sigma(0.0) == 1.0 and ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.5) == pytest.approx(1.73 * 0.5 / (1 + 0.73 * 0.5))


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"])
def test_discarding_samplers_get_steps_plus_one_sigmas(sampler):
    plain = sigmas("normal", 10, shift=1.73, sampler="euler")
    dropped = sigmas("normal", 10, shift=1.73, sampler=sampler)
    assert len(plain) == len(dropped) == 11
    full = sigmas("normal", 11, shift=1.73, sampler="euler")
    assert torch.equal(dropped, torch.cat([full[:-2], full[-1:]]))


def test_unknown_scheduler_lists_valid_names():
    with pytest.raises(ParameterError) as err:
        sigmas("linear", 10)
    msg = str(err.value)
    assert "scheduler='linear'" in msg
    for name in SCHEDULER_NAMES:
        assert name in msg


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ParameterError) as err:
        sigmas("normal", 10, sampler="euler_a")
    msg = str(err.value)
    assert "sampler='euler_a'" in msg
    assert all(name in msg for name in SAMPLER_NAMES)
