"""What only the async v2 queue does, against the fake service on 127.0.0.1 and its separate media host: the
submit/poll/fetch flow, the poll cadence, FAILED / expired / unknown statuses, retried polls that never submit
again, Cancel and timeouts that name the request id, output shapes, and where the key may go."""
from __future__ import annotations

import base64
import json
import logging
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote_checks import (assert_bands, clean_env, client, fails, fast_default_polls,  # noqa: E402,F401
                           key_never_logged, pixels, svc)
from remote_server import KEY, FakeService  # noqa: E402

from workflow_exec import pack_module  # noqa: E402

R = pack_module("aura_flow.remote")  # the engine as the nodes see it (the pack's own copy)
_endpoint = pack_module("aura_flow.remote.endpoint")
on_api_host, v2_request_paths, v2_submit_endpoint = (_endpoint.on_api_host, _endpoint.v2_request_paths,
                                                     _endpoint.v2_submit_endpoint)

SMALL = {"width": 512, "height": 512, "output_format": "png"}


# ------------------------------------------------------------------------------------------------ addresses


@pytest.mark.parametrize("url, submit", [
    ("https://api.segmind.com/v1/aura-flow", "https://api.segmind.com:443/v2/aura-flow"),
    ("https://api.segmind.com/v2/aura-flow", "https://api.segmind.com:443/v2/aura-flow"),
    ("http://127.0.0.1:8080/proxy/segmind/v1/aura-flow", "http://127.0.0.1:8080/proxy/segmind/v2/aura-flow"),
    ("http://localhost/aura-flow", "http://localhost:80/v2/aura-flow"),
    ("https://proxy.example/v1/aura-flow?tenant=a", "https://proxy.example:443/v2/aura-flow"),
])
def test_v2_addresses_derived_as_the_sdk_does(url, submit):
    ep = v2_submit_endpoint(R.parse_endpoint(url))
    assert ep.display == submit
    assert ep.path.endswith("?tenant=a") == url.endswith("?tenant=a")  # a proxy's query is kept
    status, response = v2_request_paths(ep, "a/b c")
    assert status == ep.path.split("?")[0].rsplit("/", 1)[0] + "/requests/a%2Fb%20c/status"  # .../v2/requests/...
    assert response == status[: -len("/status")]


def test_status_urls_must_stay_on_the_api_host():
    api = R.parse_endpoint("https://api.segmind.com/v1/aura-flow")
    same = on_api_host(api, "https://API.segmind.com/v2/requests/x/status", "status_url", str)
    assert (same.host, same.port, same.path) == ("api.segmind.com", 443, "/v2/requests/x/status")
    relative = on_api_host(api, "/v2/requests/x", "response_url", str)
    assert relative.display == "https://api.segmind.com:443/v2/requests/x"
    for elsewhere in ("https://images.segmind.com/v2/requests/x", "http://api.segmind.com/v2/requests/x",
                      "https://api.segmind.com:8443/v2/requests/x", "//evil.example/v2/requests/x"):
        err = fails(lambda: on_api_host(api, elsewhere, "status_url", str))
        assert "not on the API host https://api.segmind.com:443; refused, so the API key goes nowhere else" in str(err)


# ------------------------------------------------------------------------------------------------ the flow


def test_submit_poll_fetch_with_backoff_and_a_keyless_media_host():
    with FakeService(queue_polls=2, processing_polls=2) as svc:
        poll = R.PollPolicy(first=0.05, factor=2.0, most=0.2)
        result = client(svc, poll=poll).generate({"seed": 12, **SMALL})
    (submit,) = svc.submits
    assert submit["path"] == "/v2/aura-flow" and submit["headers"]["x-api-key"] == KEY
    polls = svc.polls("rq-1")
    assert len(polls) == 5  # QUEUED, QUEUED, PROCESSING, PROCESSING, COMPLETED
    waits = [polls[0]["time"] - submit["time"]] + [b["time"] - a["time"] for a, b in zip(polls, polls[1:])]
    for got, want in zip(waits, [0.05, 0.1, 0.2, 0.2, 0.2]):  # starts short, doubles, capped
        assert want - 0.01 <= got < want + 0.15, waits
    (fetch,) = [r for r in svc.requests if r["path"] == "/v2/requests/rq-1"]
    assert all(r["headers"]["x-api-key"] == KEY for r in polls + [fetch])  # the API host gets the key...
    (media,) = svc.media.requests
    assert media["path"] == "/media/rq-1.png" and "x-api-key" not in media["headers"]  # ...the media host not
    (im,) = result.images
    assert_bands(pixels(im), 12, tol=0)
    assert im.request_id == "rq-1" and im.headers == {"x-request-id": "rq-1", "x-cost": "0.5", "x-seed-value": "12",
                                                      "x-remaining-credits": "99.5", "x-generation-time": "1.25"}
    assert svc.credits == 99.5 and svc.open_jobs == 0


@pytest.mark.parametrize("kind", ["bare", "relative"])
def test_status_urls_derived_or_resolved_on_the_api_host(svc, kind):
    svc.fail_next({"kind": kind})
    result = client(svc).generate({"seed": 1, **SMALL})
    assert result.request_ids == ["rq-1"] and svc.polls("rq-1")


def test_failed_request_says_so_with_its_id_and_is_not_retried(svc):
    svc.fail_next({"kind": "failed", "error": "NSFW content detected"})  # answered as HTTP 422, like the service
    err = fails(lambda: client(svc).generate(SMALL))
    assert "image 1/1: the service reports request id rq-1 FAILED: NSFW content detected (a failed request is not " \
           "billed)" in str(err)
    assert err.request_id == "rq-1" and err.billed is False
    assert len(svc.submits) == 1 and svc.credits == 100 and not svc.media.requests


def test_expired_request(svc):
    svc.fail_next({"kind": "expire"})
    err = fails(lambda: client(svc).generate(SMALL))
    assert "the service no longer knows request id rq-1 (HTTP 404 for its status): a request's status and result " \
           "expire one hour after it is submitted" in str(err)
    assert err.status == 404 and err.request_id == "rq-1" and len(svc.submits) == 1


def test_unknown_status(svc):
    svc.fail_next({"kind": "unknown", "status": "PAUSED"})
    err = fails(lambda: client(svc).generate(SMALL))
    assert "reports status 'PAUSED' for request id rq-1, which this client does not know (expected QUEUED, " \
           "PROCESSING, COMPLETED, FAILED)" in str(err)
    assert f"its result stays at {svc.origin}/v2/requests/rq-1 for an hour" in str(err)
    assert err.billed is None and len(svc.submits) == 1 and len(svc.polls()) == 1


@pytest.mark.parametrize("kind", ["poll_drop", "poll_hangup"])
def test_a_dropped_poll_is_asked_again_never_submitted_again(svc, caplog, kind):
    svc.fail_next({"kind": kind})
    result = client(svc).generate({"seed": 5, **SMALL})
    assert_bands(pixels(result.images[0]), 5, tol=0)
    assert len(svc.submits) == 1  # exactly one submit: one generation, billed once
    assert len(svc.polls("rq-1")) == 1 + 3  # the dropped poll, then QUEUED, PROCESSING, COMPLETED
    assert any("for the status of request id rq-1" in r.getMessage() and "nothing is submitted again" in
               r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert svc.credits == 99.5


def test_a_rate_limited_poll_waits_for_the_reset_then_asks_again(svc, caplog):
    """A 429 on a status poll waits for the reset the service names and polls again: never a second submit."""
    svc.fail_next({"kind": "poll_status", "status": 429, "headers": {"x-ratelimit-reset": "0.5"}})
    t0 = time.monotonic()
    result = client(svc).generate({"seed": 7, **SMALL})
    assert time.monotonic() - t0 >= 0.5  # the named reset, not the default poll interval
    assert_bands(pixels(result.images[0]), 7, tol=0)
    assert len(svc.submits) == 1 and len(svc.polls("rq-1")) == 1 + 3 and svc.credits == 99.5
    assert any("rate limited (429)" in r.getMessage() and "nothing is submitted again" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_failing_polls_are_bounded_and_name_the_request(svc):
    svc.fail_next({"kind": "poll_status", "status": 503, "times": 10})
    poll = R.PollPolicy(first=0.01, most=0.02, max_retries=3)
    err = fails(lambda: client(svc, poll=poll).generate(SMALL))
    assert "lost track of request id rq-1 after 4 tries to fetch its status (HTTP 503 for the status of request id " \
           "rq-1" in str(err)
    assert "it may still complete and be billed: its result stays at" in str(err) and err.billed is None
    assert len(svc.submits) == 1 and len(svc.polls()) == 4


def test_slow_queue_cancel_stops_at_once_and_names_the_request(svc):
    svc.fail_next({"kind": "queued"})
    stop_at = time.monotonic() + 0.3
    err = fails(lambda: client(svc).generate(SMALL, should_stop=lambda: time.monotonic() > stop_at),
                R.RemoteInterrupted)
    assert time.monotonic() - stop_at < 0.3  # within a tick of the client's 0.1 s check
    assert err.request_ids == ["rq-1"]
    assert "request id(s) rq-1 were submitted and may still complete and be billed; their results stay for an hour " \
           f"at {svc.origin}/v2/requests/rq-1" in str(err)
    polls = len(svc.polls())
    time.sleep(0.15)
    assert polls > 3 and len(svc.polls()) == polls  # polling stopped with the call


def test_slow_queue_times_out_naming_the_request(svc):
    svc.fail_next({"kind": "queued"})
    t0 = time.monotonic()
    err = fails(lambda: client(svc, timeout=0.5).generate(SMALL), R.RemoteTimeout)
    assert 0.45 < time.monotonic() - t0 < 1.5
    assert "request id rq-1 did not complete within 0.5 s (the total timeout; last status QUEUED)" in str(err)
    assert err.request_id == "rq-1" and err.billed is None and len(svc.submits) == 1


def test_three_images_one_failed_keeps_the_others(svc):
    svc.fail_seed(31, {"kind": "failed", "error": "worker crashed"})
    result = client(svc, max_concurrency=3).generate({"seed": 30, "number_of_images": 3, **SMALL})
    assert len(svc.submits) == 3 and sorted(r["body"]["seed"] for r in svc.submits) == [30, 31, 32]
    assert [im.seed for im in result.images] == [30, 32]
    for im in result.images:
        assert_bands(pixels(im), im.seed, tol=0)
    ids = {r["body"]["seed"]: f"rq-{n}" for n, r in enumerate(svc.submits, 1)}
    (failure,) = result.failures
    assert failure.index == 1 and failure.request_id == ids[31] and "worker crashed" in str(failure)
    assert f"image 2/3 failed: image 2/3: the service reports request id {ids[31]} FAILED" in result.failure_summary()
    assert result.metadata()["failed"] == [{"index": 1, "request_id": ids[31]}]
    assert result.request_ids == [ids[30], ids[32]] and len(svc.media.requests) == 2
    assert svc.credits == 99  # two billed


def test_status_url_off_the_api_host_is_refused_and_stops_the_batch(svc):
    svc.fail_next({"kind": "offsite"})  # the answer points status_url at the media host
    err = fails(lambda: client(svc, max_concurrency=1).generate({"number_of_images": 2, **SMALL}))
    assert "image 1/2, request id rq-1: the service named" in str(err)
    assert "as the status_url, which is not on the API host" in str(err)
    assert "not sent, because image 1's answer pointed off the API host" in str(err)
    assert svc.media.requests == [] and len(svc.submits) == 1  # the key went nowhere else


def test_submit_answered_without_an_id_is_not_retried(svc):
    svc.fail_next({"kind": "no_id"})
    err = fails(lambda: client(svc).generate(SMALL))
    assert "accepted image 1/1 (HTTP 200) but named no request id" in str(err) and "Not retried" in str(err)
    assert err.billed is None and len(svc.submits) == 1


# ------------------------------------------------------------------------------------------------ the image


@pytest.mark.parametrize("make, fetched", [
    (lambda url, data: [url], 1),
    (lambda url, data: json.dumps([url]), 1),  # JSON-stringified, as some models answer
    (lambda url, data: {"images": [{"url": url, "content_type": "image/png"}]}, 1),
    (lambda url, data: [url, url], 1),  # more than asked: the first is kept
    (lambda url, data: "data:image/png;base64," + base64.b64encode(data).decode(), 0),
    (lambda url, data: base64.b64encode(data).decode(), 0),
])
def test_output_shapes(svc, make, fetched):
    svc.fail_next({"kind": "output", "make": make})
    result = client(svc).generate({"seed": 44, **SMALL})
    assert_bands(pixels(result.images[0]), 44, tol=0)
    assert result.images[0].request_id == "rq-1" and len(svc.media.requests) == fetched


@pytest.mark.parametrize("make, message", [
    (lambda url, data: "done", "the result of request id rq-1 names no image (output 'done'"),
    (lambda url, data: "data:image/png;base64,@@@", "the inline image of request id rq-1 is a data: URI whose base64"),
    (lambda url, data: "http://images.example/x.png", "the image of request id rq-1 is at http://images.example/x.png,"
                                                      " not fetched: the image URL: plain http:// is refused"),
])
def test_output_without_a_usable_image(svc, make, message):
    svc.fail_next({"kind": "output", "make": make})
    err = fails(lambda: client(svc).generate(SMALL))
    assert message in str(err) and "it was billed: its result stays at" in str(err)
    assert err.billed is True and err.request_id == "rq-1" and svc.media.requests == []


def test_media_redirect_not_followed(svc):
    svc.fail_next({"kind": "media_redirect"})
    err = fails(lambda: client(svc).generate(SMALL))
    assert "the media host of request id rq-1" in str(err)
    assert "redirects (302) to https://elsewhere.example/image.png; not followed" in str(err)
    assert err.billed is True and len(svc.media.requests) == 1 and len(svc.submits) == 1


def test_media_drop_is_fetched_again_never_submitted_again(svc):
    svc.fail_next({"kind": "drop"})
    result = client(svc).generate({"seed": 9, **SMALL})
    assert_bands(pixels(result.images[0]), 9, tol=0)
    assert len(svc.media.requests) == 2 and len(svc.submits) == 1 and svc.credits == 99.5
