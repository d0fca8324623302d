"""GET /auraflow/sigmas, the route the editor's sigma plot reads, through its plain handler function."""
from __future__ import annotations

import json

import pytest
import torch

import aura_flow
from aura_flow.sampling.registry import SAMPLERS, SCHEDULER_NAMES
from workflow_exec import pack_module

routes = pack_module("nodes.routes")

# REFERENCE.md §3, derived values at shift 1.73 and 25 steps: first three and last three before the final 0
REFERENCE_25 = {
    "normal": ([1.0000, 0.9755, 0.9502], [0.1383, 0.0727, 0.0030]),
    "simple": ([1.0000, 0.9765, 0.9521], [0.1909, 0.1308, 0.0672]),
    "karras": ([1.0000, 0.8384, 0.6997], [0.0039, 0.0026, 0.0017]),
    "exponential": ([1.0000, 0.7672, 0.5886], [0.0029, 0.0023, 0.0017]),
    "kl_optimal": ([1.0000, 0.9367, 0.8772], [0.0671, 0.0344, 0.0017]),
}


@pytest.mark.parametrize("scheduler", sorted(REFERENCE_25))
def test_reference_schedules_at_the_defaults(scheduler):
    status, body = routes.sigmas_response({"scheduler": scheduler})  # steps 25, shift 1.73, denoise 1
    assert status == 200
    values = body["sigmas"]
    assert len(values) == 26 and values[-1] == 0.0
    head, tail = REFERENCE_25[scheduler]
    assert values[:3] == pytest.approx(head, abs=6e-5)
    assert values[-4:-1] == pytest.approx(tail, abs=6e-5)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_matches_the_engine_and_is_json(scheduler):
    query = {"scheduler": scheduler, "steps": "7", "shift": "3.0", "denoise": "0.6"}
    status, body = routes.sigmas_response(query)
    assert status == 200
    expected = aura_flow.sigmas(scheduler, 7, shift=3.0, denoise=0.6)
    assert torch.equal(torch.tensor(body["sigmas"], dtype=torch.float32), expected)
    assert json.loads(json.dumps(body)) == body
    # denoise 0.6 of 7 steps: the last 8 sigmas of int(7 / 0.6) = 11 steps
    assert body["sigmas"] == aura_flow.sigmas(scheduler, 11, shift=3.0).tolist()[-8:]


def test_samplers_that_drop_the_penultimate_sigma_are_drawn_as_they_run():
    droppers = [name for name, info in SAMPLERS.items() if info.discard_penultimate]
    if not droppers:
        pytest.skip("the registry has no sampler that drops the penultimate sigma yet")
    status, body = routes.sigmas_response({"steps": "10", "sampler": droppers[0]})
    full = aura_flow.sigmas("normal", 11).tolist()
    assert status == 200 and body["sigmas"] == full[:-2] + full[-1:] and len(body["sigmas"]) == 11
    assert routes.sigmas_response({"steps": "10", "sampler": "euler"})[1]["sigmas"] == \
        aura_flow.sigmas("normal", 10).tolist()


def test_denoise_zero_is_an_empty_schedule():
    assert routes.sigmas_response({"denoise": "0"}) == (200, {"sigmas": []})


@pytest.mark.parametrize("query, message", [
    ({"steps": "abc"}, "steps='abc' is not a number (e.g. steps=25)"),
    ({"steps": "2.5"}, "steps='2.5' is not a whole number"),
    ({"steps": "0"}, "steps=0 is out of range; allowed: 1..10000"),
    ({"shift": "nan"}, "shift=nan is not a finite number; allowed: 0.0..10.0"),
    ({"shift": "11"}, "shift=11.0 is out of range; allowed: 0.0..10.0"),
    ({"denoise": "1.5"}, "denoise=1.5 is out of range; allowed: 0.0..1.0"),
    ({"scheduler": "linear"}, "scheduler='linear' is not known; valid names: simple, sgm_uniform"),
    ({"sampler": "nope"}, "sampler='nope' is not known; valid names: euler"),
])
def test_parameter_errors_are_400_naming_the_parameter(query, message):
    status, body = routes.sigmas_response(query)
    assert status == 400 and set(body) == {"error"}
    assert message in body["error"]


def test_register_is_a_no_op_outside_comfyui():
    assert routes.register() is False
