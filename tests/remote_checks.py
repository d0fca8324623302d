"""Fixtures and helpers of the remote tests (test_remote.py, test_remote_queue.py): a clean environment, the key
never in a log line, the fake service whose media host must never see the key, and fast retry/poll policies."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote_server import KEY, FakeService, seed_colour  # noqa: E402

from workflow_exec import pack_module  # noqa: E402

R = pack_module("aura_flow.remote")  # the engine as the nodes see it (the pack's own copy)

FAST = R.RetryPolicy(backoff=0.01, backoff_max=0.05, jitter=0.5, rate_limit_default_wait=0.05)
FAST_POLL = R.PollPolicy(first=0.01, factor=1.5, most=0.04, request_timeout=2.0)
VERSIONS = ("v1", "v2")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("SEGMIND_API_KEY", "SEGMIND_API_URL", "SEGMIND_API_VERSION", "AURAFLOW_SEGMIND_KEY_FILE", "FAL_KEY",
                 "FAL_QUEUE_URL", "AURAFLOW_FAL_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "output"))


@pytest.fixture(autouse=True)
def key_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        assert KEY not in record.getMessage()
    assert KEY not in caplog.text


def media_never_saw_the_key(service: FakeService):
    for r in service.media.requests:
        assert "x-api-key" not in {k.lower() for k in r["headers"]}
        assert KEY not in json.dumps(r)


@pytest.fixture
def svc():
    with FakeService() as service:
        yield service
    media_never_saw_the_key(service)


@pytest.fixture(params=VERSIONS)
def version(request):
    return request.param


def client(svc, version="v2", **kw):
    kw.setdefault("retry", FAST)
    kw.setdefault("poll", FAST_POLL)
    return R.RemoteClient(KEY, url=svc.url, api_version=version, key_source="the test", **kw)


def fails(fn, exc=R.RemoteError):
    """Run fn expecting exc; check the key is in no part of the error; return it."""
    with pytest.raises(exc) as info:
        fn()
    text = "".join([str(info.value), repr(info.value), repr(info.value.args)])
    assert KEY not in text
    return info.value


def json_body(message):
    return json.dumps({"error": message}).encode()


def pixels(im) -> np.ndarray:
    return np.asarray(im.image, dtype=np.int16)


def assert_bands(arr: np.ndarray, seed: int, tol: int):
    """Top half seed_colour(seed), bottom half its complement (see remote_server.make_image)."""
    h = arr.shape[0]
    top = np.array(seed_colour(seed))
    assert np.abs(arr[: h // 2 - 4] - top).max() <= tol
    assert np.abs(arr[h // 2 + 4:] - (255 - top)).max() <= tol


def first_id(version: str) -> str:
    """The fake's id of the first request: v1's x-request-id counts requests, v2's request ids count submits."""
    return "req-1" if version == "v1" else "rq-1"


@pytest.fixture(autouse=True)
def fast_default_polls(monkeypatch):
    """Clients built from the environment (node, CLI) poll fast too, in every copy of the engine loaded."""
    for name, module in list(sys.modules.items()):
        if name.endswith("aura_flow.remote.queue"):
            monkeypatch.setattr(module, "DEFAULT_POLL", FAST_POLL)
