"""GET /auraflow/sigmas, the route the editor's sigma plot reads, through its plain handler function."""
from __future__ import annotations

import json
import math

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


# ------------------------------------------------------------------------------------------------ hostile queries
HOSTILE = [
    ({"steps": "100", "denoise": "0.0001"}, 400, "asks for a schedule of 1000000 steps"),
    ({"steps": "10000", "denoise": "1e-320"}, 400, "asks for a schedule of inf steps"),
    ({"denoise": "5e-324"}, 400, "raise denoise to at least 0.0025"),
    ({"shift": "0"}, 400, "shift=0.0 makes every noise level 0"),
    ({"shift": "1e-300"}, 400, "shift=1e-300 is too small"),
    ({"shift": "inf"}, 400, "shift=inf is not a finite number"),
    ({"steps": "1e400"}, 400, "steps='1e400' is not a whole number"),
    ({"steps": "9" * 4000}, 400, "is not a whole number"),
    ({"denoise": "nan"}, 400, "denoise=nan is not a finite number"),
    ({"sampler": "x" * 100000}, 400, "is not known"),
] + [({"scheduler": name, "steps": "10000"}, 200, "") for name in aura_flow.SCHEDULER_NAMES]


def test_hostile_queries_answer_in_bounded_time_off_the_event_loop(monkeypatch):
    """Every query is answered (a 400 naming the parameter, or at most 10000 sigmas) within seconds, and ComfyUI's
    event loop keeps running meanwhile: the work runs in an executor."""
    import asyncio
    import time

    from route_harness import Request, register_routes

    handler = register_routes(monkeypatch)[("GET", routes.SIGMAS_ROUTE)]
    routes.sigmas_response({})  # torch imported once, outside the timing

    async def scenario():
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        answers = []
        for query, _status, _message in HOSTILE:
            t0 = time.perf_counter()
            answers.append((await handler(Request(query)), time.perf_counter() - t0))
        stop.set()
        await tick
        return answers, max(gaps)

    answers, worst_gap = asyncio.run(scenario())
    for (query, status, message), ((got_status, body), seconds) in zip(HOSTILE, answers):
        assert got_status == status, (query, body)
        assert seconds < 10, query
        if status == 400:
            assert message in body["error"] and len(body["error"]) < 1000, query
        else:
            assert 1 < len(body["sigmas"]) <= 10001 and all(math.isfinite(v) for v in body["sigmas"])
    longest = max(seconds for _, seconds in answers)
    # the loop was never held for the length of a schedule (work on the loop would hold it ~longest); the floor and
    # the 0.8 leave room for a loaded machine's scheduling, which stretches both numbers
    assert worst_gap < max(1.0, 0.8 * longest), (worst_gap, longest)


def test_the_key_route_refuses_a_huge_body_before_reading_it(monkeypatch, tmp_path):
    from route_harness import Request, call, register_routes

    key_file = tmp_path / "auraflow" / "segmind_api_key"
    monkeypatch.setenv("AURAFLOW_SEGMIND_KEY_FILE", str(key_file))
    monkeypatch.delenv("SEGMIND_API_KEY", raising=False)
    handler = register_routes(monkeypatch)[("POST", routes.KEY_ROUTE)]
    huge = Request(body=b'{"key": "SG_' + b"a" * (10 * 1024 * 1024) + b'"}')
    assert call(handler, huge)[0] == 413 and huge.reads == 0
    unsized = Request(body=b'{"key": "SG_0123456789abcdef"}', content_length=None)
    unsized.content_length = None  # chunked: no length announced
    assert call(handler, unsized)[0] == 413 and unsized.reads == 0
    assert not key_file.exists()
    status, body = call(handler, Request(body=b'{"key": "SG_0123456789abcdef"}'))
    assert status == 200 and body["source"] == "file" and "SG_0123456789abcdef" not in json.dumps(body)
    assert key_file.read_text() == "SG_0123456789abcdef\n"
