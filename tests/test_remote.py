"""The hosted-API client, node and command against a real HTTP server on 127.0.0.1 (tests/remote_server.py).

What both APIs share runs on each (the ``version`` fixture): v1's one blocking request per image and v2's submit,
poll and fetch must keep the same guarantees. test_remote_queue.py holds what only the v2 queue does.
"""
from __future__ import annotations

import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote_checks import (FAST, assert_bands, clean_env, client, fails, fast_default_polls,  # noqa: E402,F401
                           first_id, json_body, key_never_logged, pixels, svc, version)
from remote_server import KEY, FakeService, seed_colour  # noqa: E402

from workflow_exec import pack_module  # noqa: E402

# the engine as the nodes see it (the pack's own copy), so the node tests and the client tests share one
R = pack_module("aura_flow.remote")
image_extension = pack_module("aura_flow.images").image_extension
ParameterError = pack_module("aura_flow.errors").ParameterError
validate_generation = pack_module("aura_flow.params").validate_generation
Response = pack_module("aura_flow.remote.transport").Response

HOSTED_ORDER = ["prompt", "negative_prompt", "cfg", "seed", "shift", "steps", "width", "height", "sampler",
                "scheduler", "number_of_images", "output_format", "output_quality"]


# ------------------------------------------------------------------------------------------------ success


def test_one_image_request_and_answer(svc, version):
    result = client(svc, version).generate({"prompt": "a red fox", "seed": 7, "width": 640, "height": 512})
    assert len(svc.submits) == 1
    req = svc.submits[0]
    assert req["headers"]["x-api-key"] == KEY
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["path"] == f"/{version}/aura-flow"
    expected = validate_generation({"prompt": "a red fox", "seed": 7, "width": 640, "height": 512}, remote=True)
    assert req["body"] == expected  # every hosted parameter, defaults filled in, one image per request
    (im,) = result.images
    assert (im.width, im.height, im.format) == (640, 512, "webp")
    assert im.image.size == (640, 512)
    assert_bands(pixels(im), 7, tol=6)  # lossy webp at quality 80 keeps flat colours within a few levels
    assert result.seed == 7 and im.request_id == first_id(version) == im.headers["x-request-id"]
    assert result.remaining_credits == "99.5" and im.headers["x-cost"] == "0.5"
    assert result.api_version == version and result.request_ids == [first_id(version)]
    assert result.metadata() == {"api_version": version, "failed": [],
                                 "images": [{"index": 0, "seed": 7, "request_id": first_id(version)}]}
    assert not result.failures
    assert len(svc.media.requests) == (1 if version == "v2" else 0)  # v2: the image comes from the media host


@pytest.mark.parametrize("fmt, tol", [("png", 0), ("jpg", 12)])
def test_formats_keep_pixels(svc, version, fmt, tol):
    result = client(svc, version).generate({"seed": 3, "width": 512, "height": 768, "output_format": fmt})
    (im,) = result.images
    assert im.format == fmt and image_extension(im.data) == fmt
    assert pixels(im).shape == (768, 512, 3)
    assert_bands(pixels(im), 3, tol=tol)


def test_batch_is_one_request_per_image_with_consecutive_seeds(svc, version):
    svc.fail_next({"kind": "slow", "seconds": 0.3}, {"kind": "slow", "seconds": 0.3}, {"kind": "slow", "seconds": 0.3})
    result = client(svc, version, max_concurrency=3).generate(
        {"seed": 2**64 - 2, "number_of_images": 3, "width": 512, "height": 512, "output_format": "png"})
    assert len(svc.submits) == 3
    assert sorted(r["body"]["seed"] for r in svc.submits) == [0, 2**64 - 2, 2**64 - 1]  # wraps at 2**64
    assert all(r["body"]["number_of_images"] == 1 for r in svc.submits)
    assert svc.max_in_flight == 3  # concurrent
    assert [im.index for im in result.images] == [0, 1, 2]
    assert [im.seed for im in result.images] == [2**64 - 2, 2**64 - 1, 0]
    for im in result.images:
        assert_bands(pixels(im), im.seed, tol=0)
    assert result.remaining_credits == "98.5"  # the lowest balance reported
    assert sorted(result.request_ids) == sorted({"v1": ["req-1", "req-2", "req-3"], "v2": ["rq-1", "rq-2", "rq-3"]}
                                                [version])


def test_concurrency_is_bounded(svc, version):
    for _ in range(4):
        svc.fail_next({"kind": "slow", "seconds": 0.15})
    client(svc, version, max_concurrency=2).generate({"number_of_images": 4, "width": 512, "height": 512})
    assert len(svc.submits) == 4 and svc.max_in_flight == 2
    if version == "v2":  # never more than two requests between submit and result
        assert svc.max_open_jobs == 2 and svc.open_jobs == 0


# ------------------------------------------------------------------------------------------------ before sending


@pytest.mark.parametrize("params, message", [
    ({"width": 4096}, "width=4096 is out of range; allowed: 512..2048"),
    ({"height": 256}, "height=256 is out of range; allowed: 512..2048"),
    ({"steps": 0}, "steps=0 is out of range; allowed: 1..100"),
    ({"cfg": 25}, "cfg=25.0 is out of range; allowed: 0.0..20.0"),
    ({"sampler": "res_multistep"}, "sampler='res_multistep' is not known"),
    ({"scheduler": "beta"}, "scheduler='beta' is not known"),
    ({"number_of_images": 11}, "number_of_images=11 is out of range; allowed: 1..10"),
    ({"output_format": "gif"}, "output_format='gif' is not known"),
    ({"seed": -1}, "seed=-1 is out of range"),
    ({"guidance": 3}, "unknown parameter(s) guidance"),
])
def test_parameters_checked_before_anything_is_sent(svc, params, message):
    with pytest.raises(ParameterError) as info:
        client(svc).generate(params)
    assert message in str(info.value)
    with pytest.raises(ParameterError) as engine:
        validate_generation(params, remote=True)
    assert str(info.value) == str(engine.value)  # the engine's own message
    assert svc.requests == []


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "soon"])
def test_timeout_must_be_finite_and_positive(svc, timeout):
    err = fails(lambda: client(svc, timeout=timeout), ParameterError)
    assert f"timeout={timeout!r} is not allowed; give a finite number of seconds above 0" in str(err)
    err = fails(lambda: client(svc, timeout=timeout, names={"timeout": "--timeout"}), ParameterError)
    assert str(err).startswith("--timeout=")
    assert svc.requests == []


def test_api_version_setting(svc, monkeypatch):
    assert client(svc, None).api_version == "v2"  # the default
    monkeypatch.setenv("SEGMIND_API_VERSION", "V1")
    assert client(svc, None).api_version == "v1" and client(svc, "auto").api_version == "v1"
    assert client(svc, "v2").api_version == "v2"  # an explicit choice wins over the environment
    monkeypatch.setenv("SEGMIND_API_VERSION", "v3")
    err = fails(lambda: client(svc, None))
    assert "SEGMIND_API_VERSION='v3' is not known; set it to v2" in str(err)
    err = fails(lambda: client(svc, "sync", names={"api_version": "--api-version"}))
    assert "--api-version='sync' is not known" in str(err)
    monkeypatch.setenv("SEGMIND_API_VERSION", "v1")
    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    R.RemoteClient.from_environment(retry=FAST).generate({"width": 512, "height": 512})
    assert [r["path"] for r in svc.requests] == ["/v1/aura-flow"]  # v1 still works when selected
    assert "v1" in repr(R.RemoteClient.from_environment()) and KEY not in repr(R.RemoteClient.from_environment())


def test_missing_key_names_both_places(tmp_path):
    err = fails(lambda: R.RemoteClient.from_environment(), R.MissingKeyError)
    assert "SEGMIND_API_KEY" in str(err)
    assert str(tmp_path / "config" / "auraflow" / "segmind_api_key") in str(err)
    comfy_file = tmp_path / "ComfyUI" / "user" / "auraflow" / "segmind_api_key"
    err = fails(lambda: R.RemoteClient.from_environment(key_file=comfy_file), R.MissingKeyError)
    assert "SEGMIND_API_KEY" in str(err) and str(comfy_file) in str(err)
    assert str(tmp_path / "config" / "auraflow" / "segmind_api_key") in str(err)  # and the one outside ComfyUI


def test_key_sources(monkeypatch, tmp_path, svc):
    key_file = R.comfyui_key_file(tmp_path / "user")
    assert key_file == tmp_path / "user" / "auraflow" / "segmind_api_key"
    R.save_api_key(KEY, key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert R.resolve_api_key(key_file) == (KEY, f"the key file {key_file}")
    monkeypatch.setenv("SEGMIND_API_KEY", f"  {KEY}\n")  # the environment wins; whitespace is trimmed
    assert R.resolve_api_key(key_file) == (KEY, "the SEGMIND_API_KEY environment variable")
    monkeypatch.setenv("SEGMIND_API_KEY", "SG_bad key\r\nInjected: 1")
    err = fails(lambda: R.resolve_api_key(key_file), R.MissingKeyError)
    assert "SEGMIND_API_KEY environment variable contains spaces" in str(err) and "Injected" not in str(err)
    monkeypatch.delenv("SEGMIND_API_KEY")
    monkeypatch.setenv("AURAFLOW_SEGMIND_KEY_FILE", str(key_file))
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    c = R.RemoteClient.from_environment(retry=FAST)
    assert KEY not in repr(c)
    c.generate({"width": 512, "height": 512})
    assert svc.requests[0]["headers"]["x-api-key"] == KEY
    R.save_api_key("", key_file)
    assert not key_file.exists()


@pytest.mark.parametrize("url, ok", [
    ("https://api.segmind.com/v1/aura-flow", True),
    ("http://127.0.0.1:8080/v1/aura-flow", True),
    ("http://localhost/x", True),
    ("http://[::1]:9000/x", True),
    ("http://api.segmind.com/v1/aura-flow", False),
    ("http://10.0.0.5/v1/aura-flow", False),
    ("ftp://127.0.0.1/x", False),
    ("api.segmind.com/v1/aura-flow", False),
])
def test_url_override_refuses_plain_http_off_loopback(url, ok):
    if ok:
        assert R.parse_endpoint(url).scheme in ("http", "https")
    else:
        err = fails(lambda: R.parse_endpoint(url))
        assert "SEGMIND_API_URL" in str(err)


def test_userinfo_in_url_not_shown():
    ep = R.parse_endpoint("https://user:secret@proxy.example/v1/aura-flow")
    assert "secret" not in ep.display and ep.display == "https://proxy.example:443/v1/aura-flow"


# ------------------------------------------------------------------------------------------------ faults


def test_400_shows_the_service_message_and_is_not_retried(svc, version):
    svc.fail_next({"status": 400, "body": json_body("prompt is too long")})
    err = fails(lambda: client(svc, version).generate({}))
    assert err.status == 400 and "rejected the parameters (400): prompt is too long" in str(err)
    assert len(svc.requests) == 1


def test_401_wrong_key_never_echoed(svc, version):
    svc.key = "SG_ffffffffffffffff"  # the service does not know our key, and echoes it back
    svc.fail_next({"status": 401, "body": json_body(f"invalid api key {KEY}")})
    err = fails(lambda: client(svc, version).generate({}))
    assert err.status == 401 and "refused the API key from the test (401" in str(err)
    assert "invalid api key ***" in str(err)
    assert len(svc.requests) == 1
    err = fails(lambda: client(svc, version).generate({}))  # the real server check, no script
    assert err.status == 401


@pytest.mark.parametrize("status, body, ctype, expected", [
    (403, json_body("plan does not include this model"), "application/json",
     "not allowed to use this model (403 forbidden): plan does not include this model"),
    (404, json_body("model not found"), "application/json", "no model or endpoint at http://127.0.0.1"),
    (405, b"<!DOCTYPE html><html><head><title>405 Not Allowed</title></head><body>" + b"x" * 5000 + b"</body>",
     "text/html", "does not accept POST (405 method not allowed; the body was an HTML page: 405 Not Allowed)"),
    (406, json_body("Insufficient credits to process this request"), "application/json",
     "not enough credits (406): Insufficient credits"),
    (406, json_body("Unsupported content-type, expected application/json"), "application/json",
     "refused the request's content type (406)"),
    (422, json_body("width must be an integer"), "application/json", "rejected the parameters (422)"),
])
def test_client_errors_explained_not_retried(svc, version, status, body, ctype, expected):
    svc.fail_next({"status": status, "body": body, "type": ctype})
    err = fails(lambda: client(svc, version).generate({}))
    assert err.status == status and expected in str(err)
    assert len(str(err)) < 600  # an HTML page is summarised, not dumped
    assert len(svc.requests) == 1


def test_real_content_type_check(svc):
    c = client(svc, "v1")
    body = c._request_body(validate_generation({}, remote=True), 1)
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", svc._server.server_address[1])
    conn.request("POST", "/v1/aura-flow", body, {"x-api-key": KEY, "Content-Type": "text/plain"})
    resp = conn.getresponse()
    assert resp.status == 406
    err = c.answers.fatal(Response(406, {}, resp.read()), 0)
    assert "content type" in str(err)


def test_429_waits_for_the_named_reset_then_retries(svc, version):
    svc.fail_next({"status": 429, "body": json_body("rate limit exceeded"), "headers": {"x-ratelimit-reset": "0.4"}})
    t0 = time.monotonic()
    result = client(svc, version).generate({"seed": 1, "width": 512, "height": 512})
    assert time.monotonic() - t0 >= 0.4
    assert len(svc.submits) == 2 and svc.submits[1]["time"] - svc.submits[0]["time"] >= 0.4
    assert len(result.images) == 1


def test_429_reset_as_epoch_iso_and_beyond_the_bound(svc, version):
    c = client(svc, version, retry=R.RetryPolicy(max_rate_limit_wait=5))
    assert 99 < c.answers.reset_delay({"x-ratelimit-reset": str(int(time.time()) + 100)}) <= 100
    assert 99 < c.answers.reset_delay({"x-ratelimit-reset": str(int(time.time() * 1000) + 100000)}) <= 100
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 100))  # the v2 docs' header
    assert 98 < c.answers.reset_delay({"x-rate-limit-reset-at-utc": iso}) <= 100
    svc.fail_next({"status": 429, "body": json_body("slow down"), "headers": {"x-ratelimit-reset": "60"}})
    t0 = time.monotonic()
    err = fails(lambda: c.generate({}))
    assert time.monotonic() - t0 < 2
    assert "resets in 60 s, longer than the 5 s this client waits" in str(err)
    assert "lower number_of_images" in str(err)
    assert len(svc.requests) == 1


def test_429_retries_are_bounded(svc, version):
    for _ in range(5):
        svc.fail_next({"status": 429, "body": json_body("rate limit")})  # no reset header: default wait
    err = fails(lambda: client(svc, version, retry=R.RetryPolicy(max_rate_limit_retries=2,
                                                                     rate_limit_default_wait=0.01)).generate({}))
    assert "still rate limited after 3 tries" in str(err) and len(svc.requests) == 3


def test_5xx_retried_with_backoff_then_succeeds(svc, version):
    svc.fail_next({"status": 500, "body": json_body("boom")},
                  {"status": 502, "body": b"bad gateway", "type": "text/plain"})
    result = client(svc, version, retry=R.RetryPolicy(max_retries=2, backoff=0.1, jitter=0)).generate({"seed": 4})
    assert len(svc.submits) == 3
    gaps = [b["time"] - a["time"] for a, b in zip(svc.submits, svc.submits[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # exponential backoff
    assert result.images[0].seed == 4


def test_5xx_gives_up_after_the_bound(svc, version, caplog):
    for _ in range(5):
        svc.fail_next({"status": 503, "body": json_body("overloaded")})
    err = fails(lambda: client(svc, version, retry=R.RetryPolicy(max_retries=2, backoff=0.01)).generate({}))
    assert err.status == 503 and "HTTP 503: overloaded" in str(err) and "gave up after 3 tries" in str(err)
    assert len(svc.requests) == 3
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 2


def test_v1_dropped_connection_retried_and_billing_said(svc, caplog):
    svc.fail_next({"kind": "drop"})
    result = client(svc, "v1").generate({"seed": 9, "width": 512, "height": 512, "output_format": "png"})
    assert len(svc.requests) == 2
    assert_bands(pixels(result.images[0]), 9, tol=0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("connection dropped during a 200 response" in m and "billed" in m for m in warned)


def test_hangup_without_answer_retried(svc, version, caplog):
    svc.fail_next({"kind": "hangup"})
    result = client(svc, version).generate({"seed": 8, "width": 512, "height": 512})
    assert len(svc.submits) == 2 and result.images[0].seed == 8
    assert any("the dropped request may have been billed" in r.getMessage() for r in caplog.records)


def test_redirect_not_followed(svc, version):
    svc.fail_next({"kind": "redirect"})
    err = fails(lambda: client(svc, version).generate({}))
    assert "redirects (302) to https://elsewhere.example/v1/aura-flow; not followed" in str(err)
    assert len(svc.requests) == 1


def test_rate_limit_pauses_the_whole_batch(svc, version):
    svc.fail_seed(40, {"status": 429, "body": json_body("rate"), "headers": {"x-ratelimit-reset": "0.5"}})
    svc.fail_seed(41, {"kind": "slow", "seconds": 0.2})
    result = client(svc, version, max_concurrency=2).generate({"seed": 40, "number_of_images": 3, "width": 512,
                                                                "height": 512})
    assert [im.seed for im in result.images] == [40, 41, 42]
    first = svc.submits[0]["time"]
    later = {r["body"]["seed"]: r["time"] for r in svc.submits[1:]}
    assert later[42] - first >= 0.5  # sent after the reset, though a worker was free at 0.2 s
    assert len(svc.submits) == 4


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_https_with_trusted_and_untrusted_certificates(tls_cert, version):
    import ssl

    with FakeService(tls=tls_cert) as svc:
        trusted = ssl.create_default_context(cafile=tls_cert[0])
        result = client(svc, version, ssl_context=trusted).generate({"seed": 2, "width": 512, "height": 512,
                                                                     "output_format": "png"})
        assert_bands(pixels(result.images[0]), 2, tol=0)
        svc.fail_next({"kind": "slow", "seconds": 10})  # interrupting shuts a TLS socket down as well
        t0 = time.monotonic()
        fails(lambda: client(svc, version, ssl_context=trusted).generate(
            {}, should_stop=lambda: time.monotonic() - t0 > 0.3), R.RemoteInterrupted)
        assert time.monotonic() - t0 < 1.0
        n = len(svc.requests)
        err = fails(lambda: client(svc, version).generate({}))  # the system's CAs do not know this certificate
        assert "TLS certificate of 127.0.0.1 is not trusted" in str(err) and "nothing was sent" in str(err)
        assert len(svc.requests) == n  # not retried, nothing sent


def test_refused_connection_retried_then_explained(version):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    c = R.RemoteClient(KEY, url=f"http://127.0.0.1:{port}/v1/aura-flow", retry=FAST, api_version=version)
    err = fails(lambda: c.generate({}))
    assert f"could not connect to http://127.0.0.1:{port}/{version}/aura-flow" in str(err)
    assert "gave up after 3 tries" in str(err)


def test_total_timeout_not_retried(svc, version):
    svc.fail_next({"kind": "slow", "seconds": 10})
    t0 = time.monotonic()
    err = fails(lambda: client(svc, version, timeout=0.5).generate({}), R.RemoteTimeout)
    assert 0.4 < time.monotonic() - t0 < 2
    assert "no complete answer within 0.5 s" in str(err) and "may still finish" in str(err)
    assert len(svc.requests) == 1


def test_200_with_garbage_is_not_an_image(svc, version):
    svc.fail_next({"kind": "garbage"})
    err = fails(lambda: client(svc, version).generate({}))
    assert "answered 200 but the body is not an image" in str(err)
    assert f"request id {first_id(version)}" in str(err) and err.request_id == first_id(version)
    assert err.billed is True and len(svc.submits) == 1  # billed: not retried


def test_2gb_content_length_refused_without_reading(svc, version):
    svc.fail_next({"kind": "huge"})
    t0 = time.monotonic()
    err = fails(lambda: client(svc, version).generate({}))
    assert time.monotonic() - t0 < 2
    assert "announced a 2,147,483,648-byte body" in str(err) and "cap" in str(err)
    assert err.billed is True and len(svc.submits) == 1
    assert err.request_id == (None if version == "v1" else "rq-1")  # v1 names it only in the refused answer's headers
    assert version == "v1" or str(err).startswith("image 1/1, request id rq-1: ")


def test_streamed_body_capped(svc, version):
    svc.fail_next({"kind": "stream", "bytes": 4 * 1024 * 1024})
    err = fails(lambda: client(svc, version, max_body_bytes=1024 * 1024).generate({}))
    assert "more than 1,048,576 bytes" in str(err)
    assert len(svc.submits) == 1


def test_wrong_size_kept_apart(svc, version):
    svc.fail_next({"kind": "size", "width": 512, "height": 512})
    err = fails(lambda: client(svc, version).generate({"width": 640, "height": 512, "output_format": "png"}))
    assert "returned a 512x512 png image, but 640x512 was asked" in str(err)
    assert f"request id {first_id(version)}" in str(err)
    assert Image.open(io.BytesIO(err.data)).size == (512, 512)  # the billed bytes are not lost
    assert len(svc.submits) == 1


# ------------------------------------------------------------------------------------------------ batches


def test_partial_batch_keeps_what_arrived(svc, version):
    for _ in range(3):
        svc.fail_seed(11, {"status": 500, "body": json_body("GPU fell over")})
    result = client(svc, version).generate({"seed": 10, "number_of_images": 3, "width": 512, "height": 512,
                                            "output_format": "png"})
    assert [im.index for im in result.images] == [0, 2]
    for im in result.images:
        assert_bands(pixels(im), im.seed, tol=0)
    (failure,) = result.failures
    assert failure.index == 1 and failure.status == 500 and "GPU fell over" in str(failure)
    assert "image 2/3 failed" in result.failure_summary()
    assert len(svc.submits) == 5  # 2 good + 3 tries for seed 11


def test_fatal_error_stops_the_rest_of_a_batch(svc, version):
    svc.fail_next({"status": 406, "body": json_body("Not enough credits")})
    err = fails(lambda: client(svc, version, max_concurrency=1).generate({"number_of_images": 4}))
    assert len(svc.requests) == 1  # the other three are not sent
    assert "no image arrived" in str(err) and "not enough credits (406)" in str(err)
    assert "not sent, because image 1 failed with HTTP 406" in str(err)


# ------------------------------------------------------------------------------------------------ interrupt


def test_should_stop_interrupts_a_waiting_request(svc, version):
    svc.fail_next({"kind": "slow", "seconds": 10})
    t0 = time.monotonic()
    err = fails(lambda: client(svc, version).generate({}, should_stop=lambda: time.monotonic() - t0 > 0.3),
                R.RemoteInterrupted)
    assert time.monotonic() - t0 < 1.0
    assert "interrupted with 0 of 1" in str(err)


def test_should_stop_interrupts_a_rate_limit_wait_and_keeps_arrived_images(svc, version):
    svc.fail_seed(21, {"status": 429, "body": json_body("rate"), "headers": {"x-ratelimit-reset": "30"}})
    t0 = time.monotonic()
    err = fails(lambda: client(svc, version, max_concurrency=2).generate(
        {"seed": 20, "number_of_images": 2, "width": 512, "height": 512},
        should_stop=lambda: time.monotonic() - t0 > 0.5), R.RemoteInterrupted)
    assert time.monotonic() - t0 < 1.5
    assert [im.seed for im in err.result.images] == [20]
    assert len(svc.submits) == 2


def test_progress_and_request_ids_reported(svc, version):
    seen, named = [], []
    client(svc, version, poll=R.PollPolicy(first=0.3, most=0.02)).generate(
        {"number_of_images": 2, "width": 512, "height": 512},
        on_progress=lambda d, t, text: seen.append((d, t, text)), on_request=lambda i, rid: named.append((i, rid)))
    assert seen[-1][:2] == (2, 2)
    assert sorted(rid for _, rid in named) == ([first_id(version), "req-2"] if version == "v1" else ["rq-1", "rq-2"])
    if version == "v2":  # v2 names them at the submit, while the images are still queued
        assert any("(request id rq-1)" in text and d == 0 for d, _, text in seen)


# ------------------------------------------------------------------------------------------------ node


def load_node_module():
    from workflow_exec import pack_module

    return pack_module("nodes.remote"), pack_module("nodes.widgets")


def test_node_registered_without_comfyui():

    from workflow_exec import pack_module

    load_node_module()
    nodes = pack_module("nodes")
    assert nodes.NODE_CLASS_MAPPINGS["AuraFlowRemoteGenerate"].__name__ == "AuraFlowRemoteGenerate"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["AuraFlowRemoteGenerate"] == "AuraFlow Remote Generate"
    assert pack_module("nodes.routes").register() is False  # no ComfyUI server here


def test_key_route_writes_but_never_returns_the_key(tmp_path, monkeypatch):

    from workflow_exec import pack_module

    load_node_module()
    routes = pack_module("nodes.routes")
    key_file = tmp_path / "config" / "auraflow" / "segmind_api_key"
    assert routes.key_status() == {"configured": False, "source": None, "path": str(key_file),
                                   "env": "SEGMIND_API_KEY"}
    status, body = routes.save_key_response({"key": f" {KEY}\n"})
    assert status == 200 and body["source"] == "file" and KEY not in json.dumps(body)
    assert key_file.read_text() == KEY + "\n" and key_file.stat().st_mode & 0o777 == 0o600
    assert R.resolve_api_key(routes.key_file_path())[0] == KEY
    status, body = routes.save_key_response({"key": "SG_a b"})
    assert status == 400 and "spaces" in body["error"] and "SG_a" not in body["error"]
    assert key_file.read_text() == KEY + "\n"  # a bad key does not replace a good one
    assert routes.save_key_response({"nokey": 1})[0] == 400
    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    assert routes.key_status()["source"] == "environment"
    status, body = routes.save_key_response({"key": ""})
    assert status == 200 and not key_file.exists()


def test_widgets_follow_the_hosted_api():
    _, widgets = load_node_module()
    remote = widgets.generation_inputs(remote=True)["required"]
    local = widgets.generation_inputs(remote=False)["required"]
    assert list(remote) == HOSTED_ORDER and list(local) == HOSTED_ORDER
    for inputs in (remote, local):
        for name, (kind, opts) in inputs.items():
            assert opts.get("tooltip"), name
    assert remote["cfg"] == ("FLOAT", {"default": 5.0, "min": 0.0, "max": 20.0, "step": 0.1, "round": 0.01,
                                       "tooltip": remote["cfg"][1]["tooltip"]})
    assert remote["seed"][1]["max"] == 2**64 - 1 and remote["seed"][1]["control_after_generate"] is True
    assert (remote["shift"][1]["default"], remote["shift"][1]["max"]) == (1.73, 10.0)
    assert (remote["steps"][1]["default"], remote["steps"][1]["min"], remote["steps"][1]["max"]) == (25, 1, 100)
    assert (remote["width"][1]["min"], remote["width"][1]["max"], remote["width"][1]["default"]) == (512, 2048, 1024)
    assert (local["height"][1]["min"], local["height"][1]["max"], local["height"][1]["step"]) == (64, 16384, 8)
    from aura_flow.sampling import registry
    assert remote["sampler"][0] == list(registry.REMOTE_SAMPLER_NAMES) and remote["sampler"][1]["default"] == "uni_pc"
    assert remote["scheduler"][0] == list(registry.REMOTE_SCHEDULER_NAMES)
    assert local["sampler"][0] == list(registry.SAMPLER_NAMES)
    assert local["scheduler"][0] == list(registry.SCHEDULER_NAMES) and local["scheduler"][1]["default"] == "normal"
    assert remote["number_of_images"][1]["max"] == 10 and remote["output_quality"][1]["default"] == 80
    assert remote["output_format"][0] == ["webp", "jpg", "png"]


def node_inputs(**over):
    values = {name: validate_generation({}, remote=True)[name] for name in HOSTED_ORDER}
    values.update(seed=5, width=512, height=640, output_format="png")
    values.update(over)
    return values


def test_node_returns_an_image_batch(svc, monkeypatch):
    node_mod, _ = load_node_module()
    node = node_mod.AuraFlowRemoteGenerate
    assert node.CATEGORY == "AuraFlow/remote" and node.DESCRIPTION
    assert len(node.RETURN_TYPES) == len(node.RETURN_NAMES) == len(node.OUTPUT_TOOLTIPS)
    assert list(node.INPUT_TYPES()["required"]) == HOSTED_ORDER
    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    images, seed, credits, report = node().generate(**node_inputs(number_of_images=2))
    assert images.dtype.is_floating_point and tuple(images.shape) == (2, 640, 512, 3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    top = np.array(seed_colour(6)) / 255.0
    assert np.allclose(images[1, 0, 0].numpy(), top, atol=1e-6)
    assert np.allclose(images[1, -1, -1].numpy(), 1 - top, atol=1e-6)
    assert seed == 5 and credits == "99" and "2 of 2 image(s) received" in report
    # what ComfyUI stores: the workflow's widget values and the API prompt hold no key
    prompt = {"1": {"class_type": "AuraFlowRemoteGenerate", "inputs": node_inputs(number_of_images=2)}}
    for text in (json.dumps(prompt), json.dumps(node.INPUT_TYPES()), report, repr(node())):
        assert KEY not in text


def test_node_api_version_input_and_request_ids_in_metadata(svc, monkeypatch):
    node_mod, _ = load_node_module()
    node = node_mod.AuraFlowRemoteGenerate
    types = node.INPUT_TYPES()
    assert list(types["required"]) == HOSTED_ORDER  # still the local generator's order; the new input is optional
    choices, opts = types["optional"]["api_version"]
    assert choices == ["auto", "v2", "v1"] and opts["default"] == "auto" and "SEGMIND_API_VERSION" in opts["tooltip"]
    assert types["hidden"]["extra_pnginfo"] == "EXTRA_PNGINFO"
    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    pnginfo = {"workflow": {"nodes": []}}  # the dict ComfyUI hands every node of one prompt
    *_, report = node().generate(**node_inputs(number_of_images=2), extra_pnginfo=pnginfo)
    ids = {r["body"]["seed"]: f"rq-{n}" for n, r in enumerate(svc.submits, 1)}  # in the order they were sent
    assert f"(v2); request ids {ids[5]}, {ids[6]}" in report
    assert pnginfo["workflow"] == {"nodes": []} and pnginfo["auraflow_remote"] == {
        "api_version": "v2", "failed": [], "images": [{"index": 0, "seed": 5, "request_id": ids[5]},
                                                      {"index": 1, "seed": 6, "request_id": ids[6]}]}
    assert KEY not in json.dumps(pnginfo)
    *_, report = node().generate(**node_inputs(), api_version="v1")
    assert svc.submits[-1]["path"] == "/v1/aura-flow" and f"(v1); request ids req-{len(svc.requests)}" in report
    monkeypatch.setenv("SEGMIND_API_VERSION", "v1")
    node().generate(**node_inputs(), api_version="v2")  # the input wins over the environment
    assert svc.submits[-1]["path"] == "/v2/aura-flow"
    err = fails(lambda: node().generate(**node_inputs(), api_version="v9"))
    assert "api_version='v9' is not known" in str(err)


def test_node_partial_batch_returns_arrived_images_and_keeps_rejected(svc, tmp_path, monkeypatch, caplog):
    node_mod, _ = load_node_module()
    monkeypatch.setattr(node_mod, "rejected_folder", lambda: str(tmp_path / "rejected"))
    svc.fail_seed(6, {"kind": "size", "width": 768, "height": 768})
    c = client(svc)
    images, seed, credits, report = node_mod.AuraFlowRemoteGenerate().generate(
        **node_inputs(number_of_images=3), client=c)
    assert tuple(images.shape) == (2, 640, 512, 3)
    ids = {r["body"]["seed"]: f"rq-{n}" for n, r in enumerate(svc.submits, 1)}
    assert (f"2 of 3 image(s) received (v2); request ids {ids[5]}, {ids[7]}; image 2 failed: the service returned a "
            f"768x768 png image") in report and f"request id {ids[6]})" in report
    (kept,) = (tmp_path / "rejected").iterdir()
    assert Image.open(kept).size == (768, 768) and f"saved as {kept}" in report
    assert any("AuraFlow Remote Generate: 2 of 3" in r.getMessage() for r in caplog.records)


def test_node_raises_when_nothing_arrived(svc, tmp_path):
    node_mod, _ = load_node_module()
    svc.fail_next({"status": 401, "body": json_body("bad key")})
    err = fails(lambda: node_mod.AuraFlowRemoteGenerate().generate(**node_inputs(), client=client(svc)))
    assert err.status == 401
    svc.fail_next({"kind": "size", "width": 512, "height": 512})  # billed bytes are kept even when raising
    err = fails(lambda: node_mod.AuraFlowRemoteGenerate().generate(**node_inputs(), client=client(svc)))
    kept = tmp_path / "output" / "auraflow_remote_rejected" / "image_1.png"
    assert f"the billed bytes are kept as {kept}" in str(err) and Image.open(kept).size == (512, 512)


def test_node_missing_key(monkeypatch):
    node_mod, _ = load_node_module()
    err = fails(lambda: node_mod.AuraFlowRemoteGenerate().generate(**node_inputs()), node_mod.remote_api.MissingKeyError)
    assert "SEGMIND_API_KEY" in str(err) and "segmind_api_key" in str(err)
    with pytest.raises(ParameterError, match="width=100 is out of range"):  # parameters first
        node_mod.AuraFlowRemoteGenerate().generate(**node_inputs(width=100))


# ------------------------------------------------------------------------------------------------ command line


def test_cli_writes_images_and_prints_paths(svc, tmp_path, monkeypatch, capsys):
    from aura_flow.cli import main

    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    key_file = tmp_path / "k"
    R.save_api_key(KEY, key_file)
    out = tmp_path / "out"
    code = main(["remote", "--prompt", "a lighthouse", "--negative-prompt", "fog", "--cfg", "4.5", "--seed", "12",
                 "--shift", "2", "--steps", "20", "--width", "512", "--height", "768", "--sampler", "euler",
                 "--scheduler", "karras", "--number-of-images", "2", "--output-format", "jpg",
                 "--output-quality", "90", "--out", str(out), "--key-file", str(key_file)])
    assert code == 0
    captured = capsys.readouterr()
    assert "seed: 12" in captured.err and "remaining credits: 99" in captured.err
    paths = captured.out.split()
    assert paths == [str(out / "auraflow_12.jpg"), str(out / "auraflow_13.jpg")]
    ids = {r["body"]["seed"]: f"rq-{n}" for n, r in enumerate(svc.submits, 1)}
    for i, seed in enumerate((12, 13)):  # each id as soon as it is named, then beside its file
        assert f"image {i + 1}/2: request id {ids[seed]}\n" in captured.err
        assert f"image {i + 1}/2: {out}/auraflow_{seed}.jpg (seed {seed}, request id {ids[seed]})" in captured.err
    for p, seed in zip(paths, (12, 13)):
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.size == (512, 768)
            assert KEY.encode() not in Path(p).read_bytes()
    body = svc.requests[0]["body"]
    assert {k: body[k] for k in ("prompt", "negative_prompt", "cfg", "shift", "steps", "sampler", "scheduler",
                                 "output_quality")} == {"prompt": "a lighthouse", "negative_prompt": "fog", "cfg": 4.5,
                                                        "shift": 2.0, "steps": 20, "sampler": "euler",
                                                        "scheduler": "karras", "output_quality": 90}


def test_cli_errors(svc, tmp_path, monkeypatch, capsys):
    from aura_flow.cli import main

    assert main(["remote", "--width", "100", "--out", str(tmp_path)]) == 2
    assert "width=100 is out of range; allowed: 512..2048" in capsys.readouterr().err
    assert main(["remote", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "SEGMIND_API_KEY" in err and "segmind_api_key" in err
    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    svc.fail_next({"status": 400, "body": json_body(f"bad prompt for key {KEY}")})
    assert main(["remote", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bad prompt for key ***" in err and KEY not in err


def test_cli_api_version_and_timeout_flags(svc, tmp_path, monkeypatch, capsys):
    from aura_flow.cli import main

    for bad in ("0", "-3", "nan", "inf"):  # checked before the key is looked for and before anything is sent
        assert main(["remote", "--timeout", bad, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"error: --timeout={float(bad)!r} is not allowed; give a finite number of seconds above 0" in err
    assert svc.requests == []
    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    out = tmp_path / "out"
    assert main(["remote", "--api-version", "v1", "--seed", "3", "--width", "512", "--height", "512", "--out",
                 str(out)]) == 0
    assert [r["path"] for r in svc.requests] == ["/v1/aura-flow"]
    assert f"image 1/1: {out}/auraflow_3.webp (seed 3, request id req-1)" in capsys.readouterr().err
    monkeypatch.setenv("SEGMIND_API_VERSION", "v1")
    assert main(["remote", "--api-version", "v2", "--width", "512", "--height", "512", "--out", str(out)]) == 0
    assert svc.submits[-1]["path"] == "/v2/aura-flow"  # the flag wins over the environment
    with pytest.raises(SystemExit):
        main(["remote", "--api-version", "v3", "--out", str(out)])
    assert "--api-version: invalid choice: 'v3'" in capsys.readouterr().err
    svc.fail_next({"kind": "queued"})  # the messages name the flags
    assert main(["remote", "--api-version", "v2", "--timeout", "0.3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    rid = f"rq-{len(svc.jobs)}"
    assert f"image 1/1: request id {rid}\n" in err
    assert f"request id {rid} did not complete within 0.3 s (the total timeout, --timeout; last status QUEUED)" in err


def test_cli_partial_batch_and_rejected_bytes(svc, tmp_path, monkeypatch, capsys):
    from aura_flow.cli import main

    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    svc.fail_seed(31, {"kind": "size", "width": 512, "height": 512})
    out = tmp_path / "out"
    args = ["remote", "--seed", "30", "--width", "640", "--height", "512", "--output-format", "png", "--out", str(out)]
    assert main(args + ["--number-of-images", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out.split() == [str(out / "auraflow_30.png")]
    assert "image 2/2: the service returned a 512x512 png image, but 640x512 was asked" in captured.err
    assert f"kept as {out / 'auraflow_31_rejected.png'}" in captured.err
    svc.fail_seed(30, {"kind": "size", "width": 512, "height": 512})
    assert main(args) == 1  # a single image: an error, and still its bytes on disk
    captured = capsys.readouterr()
    assert captured.out == "" and "error: the service returned a 512x512" in captured.err
    assert Image.open(out / "auraflow_30_rejected.png").size == (512, 512)


def test_node_inside_a_fake_comfyui(svc, tmp_path, monkeypatch, caplog):
    """Key file in ComfyUI's user folder, its progress bar, and Cancel turned into ComfyUI's own interrupt."""
    import threading
    import types

    import torch

    class InterruptProcessingException(Exception):
        pass

    state = {"interrupted": False, "updates": []}
    folder_paths = types.SimpleNamespace(get_user_directory=lambda: str(tmp_path / "user"),
                                         get_output_directory=lambda: str(tmp_path / "comfy_out"))

    def throw():
        if state["interrupted"]:
            state["interrupted"] = False
            raise InterruptProcessingException()

    mm = types.SimpleNamespace(processing_interrupted=lambda: state["interrupted"],
                               throw_exception_if_processing_interrupted=throw,
                               intermediate_device=lambda: torch.device("cpu"))

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state["updates"].append((value, total))

    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, types.SimpleNamespace(ProgressBar=ProgressBar)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    node_mod, _ = load_node_module()
    from workflow_exec import pack_module

    routes = pack_module("nodes.routes")
    err = fails(lambda: node_mod.AuraFlowRemoteGenerate().generate(**node_inputs()), node_mod.remote_api.MissingKeyError)
    assert str(tmp_path / "user" / "auraflow" / "segmind_api_key") in str(err)
    assert routes.save_key_response({"key": KEY})[0] == 200
    assert (tmp_path / "user" / "auraflow" / "segmind_api_key").exists()

    images, *_ = node_mod.AuraFlowRemoteGenerate().generate(**node_inputs(number_of_images=2))
    assert tuple(images.shape) == (2, 640, 512, 3) and state["updates"][-1] == (2, 2)
    assert svc.requests[-1]["headers"]["x-api-key"] == KEY

    svc.fail_next({"kind": "slow", "seconds": 10})
    threading.Timer(0.3, lambda: state.update(interrupted=True)).start()
    t0 = time.monotonic()
    with pytest.raises(InterruptProcessingException):
        node_mod.AuraFlowRemoteGenerate().generate(**node_inputs())
    assert time.monotonic() - t0 < 1.0

    svc.fail_next({"kind": "queued"})  # v2: submitted, then never leaves the queue; Cancel names its id
    threading.Timer(0.3, lambda: state.update(interrupted=True)).start()
    t0 = time.monotonic()
    with pytest.raises(InterruptProcessingException):
        node_mod.AuraFlowRemoteGenerate().generate(**node_inputs())
    assert time.monotonic() - t0 < 1.0
    rid = f"rq-{len(svc.jobs)}"
    assert any(f"request id(s) {rid} were submitted and may still complete" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    polls = len(svc.polls(rid))
    time.sleep(0.2)
    assert polls > 0 and len(svc.polls(rid)) == polls  # no poll after Cancel
