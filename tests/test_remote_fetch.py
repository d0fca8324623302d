"""Fetching hosted-API results again by request id (v2 keeps them an hour): after an interrupt or a timeout the
image comes without a second submit, bad ids are refused before anything is sent, what the service no longer knows
is said, and the command line writes the images named by their ids. Against the fake service on 127.0.0.1."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote_checks import (assert_bands, clean_env, client, fails, fast_default_polls,  # noqa: E402,F401
                           key_never_logged, pixels, svc)
from remote_server import KEY  # noqa: E402

from workflow_exec import pack_module  # noqa: E402

R = pack_module("aura_flow.remote")
ParameterError = pack_module("aura_flow.errors").ParameterError

SMALL = {"width": 512, "height": 512, "output_format": "png"}


def interrupted_after_submit(svc, seed: int, n: int = 1):
    """Generate, stopping as soon as every submit was answered: the requests stay with the service, unfetched."""
    slow = R.PollPolicy(first=30.0)  # no poll before the stop
    err = fails(lambda: client(svc, max_concurrency=n, poll=slow).generate(
        {"seed": seed, "number_of_images": n, **SMALL}, should_stop=lambda: len(svc.jobs) >= n), R.RemoteInterrupted)
    assert err.result.images == [] and len(err.request_ids) == n
    return err.request_ids


def test_an_interrupted_request_is_fetched_later_without_a_second_submit(svc):
    (rid,) = interrupted_after_submit(svc, 21)
    assert svc.polls(rid) == [] and svc.jobs[rid]["state"] == "QUEUED"  # stopped before its first poll
    result = client(svc).fetch([rid])
    (im,) = result.images
    assert_bands(pixels(im), 21, tol=0)
    assert im.seed == 21 and im.request_id == rid and (im.width, im.height, im.format) == (512, 512, "png")
    assert len(svc.submits) == 1 and svc.credits == 99.5  # one generation, billed once
    assert len(svc.polls(rid)) == 3  # QUEUED, PROCESSING, COMPLETED
    again = client(svc).fetch(rid)  # a completed result stays fetchable: same bytes, nothing billed
    assert again.images[0].data == im.data and svc.credits == 99.5 and len(svc.submits) == 1
    assert result.params["request_ids"] == [rid] and result.failures == []


def test_several_ids_keep_what_arrived_and_say_what_the_service_does_not_know(svc):
    ids = interrupted_after_submit(svc, 40, n=2)
    result = client(svc).fetch([ids[1], "rq-77", ids[0]])
    assert [im.index for im in result.images] == [0, 2]
    assert [im.seed for im in result.images] == [41, 40]  # each id's own seed, as the service reports it
    (failure,) = result.failures
    assert failure.index == 1 and failure.request_id == "rq-77" and failure.status == 404
    assert "the service no longer knows request id rq-77 (HTTP 404 for its status): a request's status and result " \
           "expire one hour after it is submitted" in str(failure)
    err = fails(lambda: client(svc).fetch(["rq-78"]))
    assert "rq-78" in str(err) and err.status == 404
    assert len(svc.submits) == 2


@pytest.mark.parametrize("ids, words", [
    (["a/b"], "request_ids: 'a/b' is not a request id as the service gives them"),
    (["../v1/aura-flow"], "is not a request id"),
    (["rq 1"], "is not a request id"),
    ([""], "is not a request id"),
    (["x" * 201], "is not a request id"),
    ([7], "request_ids: 7 is not a request id"),
    ([], "request_ids: give 1 to 10 request ids, got 0"),
    ([f"rq-{i}" for i in range(11)], "give 1 to 10 request ids, got 11"),
    (["rq-1", "rq-1"], "request_ids: 'rq-1' is given twice"),
    (None, "give 1 to 10 request ids, got None"),
])
def test_bad_ids_are_refused_before_anything_is_sent(svc, ids, words):
    with pytest.raises(ParameterError) as info:
        client(svc).fetch(ids)
    assert words in str(info.value)
    assert svc.requests == []


def test_only_v2_keeps_results_to_fetch(svc):
    with pytest.raises(ParameterError, match="api_version='v1': only the v2 API keeps results to fetch"):
        client(svc, "v1").fetch(["rq-1"])
    assert svc.requests == []


# ------------------------------------------------------------------------------------------------ command line


def test_cli_fetch_writes_each_image_named_by_its_request_id(svc, tmp_path, monkeypatch, capsys):
    from aura_flow.cli import main

    ids = interrupted_after_submit(svc, 5, n=2)
    out = tmp_path / "out"
    for bad, words in ((["a/b"], "error: REQUEST_ID: 'a/b' is not a request id"),
                       ([ids[0], ids[0]], f"error: REQUEST_ID: '{ids[0]}' is given twice"),
                       ([ids[0], "--timeout", "0"], "error: --timeout=0.0 is not allowed")):
        assert main(["fetch", *bad, "--out", str(out)]) == 2  # before the key is read or anything is sent
        assert words in capsys.readouterr().err
    assert main(["fetch", ids[0], "--out", str(out)]) == 1
    assert "SEGMIND_API_KEY" in capsys.readouterr().err
    requests = len(svc.requests)
    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    monkeypatch.setenv("SEGMIND_API_VERSION", "v1")  # fetch is v2 whatever the setting
    (out / "keep").mkdir(parents=True)
    taken = out / f"auraflow_{ids[0]}.png"
    taken.write_bytes(b"a file from before")
    assert main(["fetch", ids[0], ids[1], "rq-404", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    paths = captured.out.split()
    assert paths == [str(out / f"auraflow_{ids[0]}_1.png"), str(out / f"auraflow_{ids[1]}.png")]
    assert taken.read_bytes() == b"a file from before"  # never overwritten
    for path, seed in zip(paths, (5, 6)):
        with Image.open(path) as img:
            assert img.size == (512, 512)
        assert f"{ids[paths.index(path)]}: {path} (512x512 png, seed {seed})" in captured.err
    assert "rq-404: " in captured.err and "no longer knows request id rq-404" in captured.err
    assert len(svc.submits) == 2 and len(svc.requests) > requests and svc.credits == 99.0


def test_cli_remote_names_the_fetch_command_for_what_may_still_complete(svc, tmp_path, monkeypatch, capsys):
    from aura_flow.cli import main

    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    out = tmp_path / "out"
    svc.fail_next({"kind": "queued"})
    assert main(["remote", "--timeout", "0.3", "--width", "512", "--height", "512", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"to fetch what may still arrive, within an hour of the submit: python -m aura_flow fetch rq-1 --out {out}" \
        in err
    svc.fail_next({"kind": "failed", "error": "worker crashed"})  # FAILED is not billed and never arrives: no hint
    assert main(["remote", "--width", "512", "--height", "512", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "python -m aura_flow fetch" not in err
    assert main(["remote", "--api-version", "v1", "--timeout", "0.3", "--width", "512", "--height", "512", "--out",
                 str(out)]) == 0
    assert "python -m aura_flow fetch" not in capsys.readouterr().err  # nothing pending
