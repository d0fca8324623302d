"""fal's queue as a second provider: the client, the node (async: several wait together), the command line and the
key rules, against a stand-in fal queue on 127.0.0.1 (tests/fal_server.py) whose CDN is a second loopback server
that must never see the key. Also the checks every provider shares on what a service or a variable hands us:
request ids that would escape their URL path, and endpoint variables that cannot be sent."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fal_server import FAL_KEY, FakeFal  # noqa: E402
from remote_checks import (FAST, FAST_POLL, assert_bands, clean_env, fast_default_polls,  # noqa: E402,F401
                           pixels, svc)
from remote_server import KEY  # noqa: E402

import workflow_exec as wx  # noqa: E402
from aura_flow.cli import main  # noqa: E402  (imported before fast_default_polls patches its queue module)
from workflow_exec import pack_module  # noqa: E402

R = pack_module("aura_flow.remote")
ParameterError = pack_module("aura_flow.errors").ParameterError
fal_module = pack_module("aura_flow.remote.fal")


@pytest.fixture(autouse=True)
def fal_key_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    yield
    assert FAL_KEY not in caplog.text and FAL_KEY.split(":")[1] not in caplog.text


@pytest.fixture
def fal():
    with FakeFal() as service:
        yield service
    cdn_never_saw_the_key(service)


def cdn_never_saw_the_key(service):
    for r in service.media.requests:
        assert "authorization" not in {k.lower() for k in r["headers"]}
        assert FAL_KEY not in json.dumps(r) and FAL_KEY.split(":")[1] not in json.dumps(r)


def fal_client(service, model=None, **kw):
    kw.setdefault("retry", FAST)
    kw.setdefault("poll", FAST_POLL)
    return R.RemoteClient(FAL_KEY, url=service.url, provider="fal", model=model, key_source="the test", **kw)


def refused(fn, exc=R.RemoteError):
    with pytest.raises(exc) as info:
        fn()
    text = "".join([str(info.value), repr(info.value), repr(info.value.args)])
    assert FAL_KEY not in text and FAL_KEY.split(":")[1] not in text
    return info.value


# ------------------------------------------------------------------------------------------------ the queue
def test_queue_states_poll_to_completed_and_the_cdn_gets_no_key(fal):
    named = []
    result = fal_client(fal).generate({"prompt": "a heron", "seed": 7, "number_of_images": 2},
                                      on_request=lambda i, rid: named.append((i, rid)))
    assert sorted(named) == [(0, "fq-1"), (1, "fq-2")] or sorted(named) == [(0, "fq-2"), (1, "fq-1")]
    for rid in ("fq-1", "fq-2"):  # IN_QUEUE, then IN_PROGRESS, then COMPLETED, each polled
        assert fal.states[rid] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    bodies = sorted((r["body"] for r in fal.submits), key=lambda b: b["seed"])
    # widgets left at their defaults are not sent; expand_prompt is sent off (fal's own default is on)
    assert bodies == [{"prompt": "a heron", "num_images": 1, "expand_prompt": False, "seed": 7},
                      {"prompt": "a heron", "num_images": 1, "expand_prompt": False, "seed": 8}]
    assert {r["path"] for r in fal.submits} == {"/fal-ai/aura-flow"}
    assert all(r["headers"]["Authorization"] == f"Key {FAL_KEY}" for r in fal.requests)
    assert [im.seed for im in result.images] == [7, 8] and [im.format for im in result.images] == ["png", "png"]
    for im, seed in zip(result.images, (7, 8)):
        assert (im.width, im.height) == (1024, 1024)
        assert_bands(pixels(im), seed, tol=0)
        assert im.nsfw is False and im.prompt_used is None and im.headers["x-generation-time"] == "1.25"
    meta = result.metadata()
    assert meta["provider"] == "fal" and meta["model"] == "aura-flow" and meta["api_version"] == "queue"
    assert {e["request_id"] for e in meta["images"]} == {"fq-1", "fq-2"}
    assert sorted(r["path"] for r in fal.media.requests) == ["/media/fq-1.png", "/media/fq-2.png"]


def test_validation_error_422_is_explained_and_stops_the_batch(fal):
    detail = {"detail": [{"loc": ["body", "guidance_scale"], "msg": "ensure this value is at most 20",
                          "type": "value_error"}]}
    fal.fail_next({"status": 422, "body": json.dumps(detail).encode()})
    err = refused(lambda: fal_client(fal, max_concurrency=1).generate({"seed": 1, "number_of_images": 3}))
    first = err.result.failures[0]
    assert first.status == 422 and first.billed is False
    assert "rejected the parameters (422): guidance_scale: ensure this value is at most 20" in str(first)
    assert len(fal.submits) == 1  # the same parameters would fail alike: nothing else is sent


def test_a_key_the_service_echoes_is_scrubbed(fal):
    fal.fail_next({"status": 401, "body": json.dumps({"detail": f"invalid key Key {FAL_KEY}"}).encode()})
    err = refused(lambda: fal_client(fal).generate({"seed": 1}))  # refused() checks the whole error for the key
    assert err.status == 401 and "invalid key Key ***" in str(err) and "FAL_KEY" in str(err)


def test_failed_request_names_its_id_and_the_error(fal):
    fal.fail_next({"kind": "failed", "error": "CUDA out of memory"})
    err = refused(lambda: fal_client(fal).generate({"seed": 3}))
    assert err.request_id == "fq-1" and "request id fq-1 FAILED: CUDA out of memory" in str(err)
    assert not any(r["path"] == "/fal-ai/aura-flow/requests/fq-1" for r in fal.requests)  # the status said it


def test_a_dropped_poll_is_asked_again_and_never_submits_twice(fal):
    fal.fail_next({"kind": "poll_drop"})
    result = fal_client(fal).generate({"seed": 11})
    assert len(fal.submits) == 1 and result.images[0].request_id == "fq-1"
    assert_bands(pixels(result.images[0]), 11, tol=0)
    # the dropped poll (counted as the IN_QUEUE one), then IN_PROGRESS and COMPLETED
    assert fal.jobs["fq-1"]["polls"] == 3 and fal.states["fq-1"] == ["IN_PROGRESS", "COMPLETED"]


def test_cancel_puts_cancel_url_for_unfinished_requests_and_names_them(fal):
    fal.fail_next({"kind": "never"}, {"kind": "never"})
    err = refused(lambda: fal_client(fal).generate({"seed": 1, "number_of_images": 2},
                                                   should_stop=lambda: len(fal.states.get("fq-2", [])) >= 2),
                  R.RemoteInterrupted)
    puts = [r for r in fal.requests if r["method"] == "PUT"]
    assert sorted(r["path"] for r in puts) == ["/fal-ai/aura-flow/requests/fq-1/cancel",
                                               "/fal-ai/aura-flow/requests/fq-2/cancel"]
    assert all(r["headers"]["Authorization"] == f"Key {FAL_KEY}" for r in puts)
    assert sorted(err.request_ids) == ["fq-1", "fq-2"]
    assert "asked fal to cancel request id(s)" in str(err) and "cancellation requested" in str(err)
    assert fal.jobs["fq-1"]["cancelled"] and fal.jobs["fq-2"]["cancelled"]


def test_ctrl_c_cancels_the_unfinished_requests_and_names_them(fal, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    monkeypatch.setenv("FAL_QUEUE_URL", fal.url)
    fal.fail_next({"kind": "never"})

    def ctrl_c(index, request_id):
        raise KeyboardInterrupt()

    cli_remote = sys.modules["aura_flow.cli.remote"]
    monkeypatch.setattr(cli_remote.remote_api.RemoteClient, "generate",
                        lambda self, plan, on_request=None, **kw: R_generate(self, plan, on_request=ctrl_c, **kw))
    assert main(["remote", "--provider", "fal", "--seed", "1", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "request id(s) fq-1 were submitted" in err and "asked fal to cancel request id(s) fq-1 (cancellation " \
                                                          "requested)" in err
    (put,) = [r for r in fal.requests if r["method"] == "PUT"]
    assert put["path"] == "/fal-ai/aura-flow/requests/fq-1/cancel" and fal.jobs["fq-1"]["cancelled"]


R_generate = sys.modules["aura_flow.remote.client"].RemoteClient.generate


def test_a_status_url_on_another_port_is_refused(fal):
    fal.fail_next({"kind": "offsite"})
    err = refused(lambda: fal_client(fal).generate({"seed": 2}))
    assert "not on the API host" in str(err) and err.request_id == "fq-1"
    assert fal.media.requests == []  # nothing went to the other port, key or not


def test_pony_v7_sends_width_and_height_and_format_and_reports_nsfw(fal):
    fal.fail_next({"kind": "nsfw"})
    params = {"prompt": "a pony", "seed": 21, "width": 768, "height": 1344, "output_format": "png", "steps": 30,
              "cfg": 6.5}
    result = fal_client(fal, model="pony-v7").generate(params, options={"noise_source": "cpu",
                                                                         "enable_safety_checker": True})
    (body,) = [r["body"] for r in fal.submits]
    assert fal.submits[0]["path"] == "/fal-ai/pony-v7"
    assert body == {"prompt": "a pony", "num_images": 1, "num_inference_steps": 30, "guidance_scale": 6.5,
                    "image_size": {"width": 768, "height": 1344}, "output_format": "png", "noise_source": "cpu",
                    "enable_safety_checker": True, "seed": 21}
    (im,) = result.images
    assert (im.width, im.height, im.format) == (768, 1344, "png") and im.nsfw is True
    assert_bands(pixels(im), 21, tol=0)
    assert result.metadata()["images"] == [{"index": 0, "seed": 21, "request_id": "fq-1",
                                            "has_nsfw_concepts": True}]


def test_expand_prompt_is_asked_for_and_the_prompt_drawn_is_recorded(fal):
    result = fal_client(fal).generate({"prompt": "a fox", "seed": 4}, options={"expand_prompt": True})
    assert fal.submits[0]["body"]["expand_prompt"] is True
    (im,) = result.images
    assert im.prompt_used == "expanded: a fox"
    assert result.metadata()["images"][0]["prompt_used"] == "expanded: a fox"


@pytest.mark.parametrize("model,params,options,words", [
    ("aura-flow", {"negative_prompt": "blur"}, {}, "negative_prompt='blur' cannot be honoured by provider=fal with "
                                                   "model=aura-flow: fal's aura-flow takes no negative prompt"),
    ("aura-flow", {"width": 768}, {}, "width=768 cannot be honoured by provider=fal with model=aura-flow"),
    ("aura-flow", {"sampler": "euler"}, {}, "sampler='euler' cannot be honoured"),
    ("aura-flow", {"steps": 10}, {}, "steps=10 is out of range for provider=fal with model=aura-flow: fal takes "
                                     "20..50 steps"),
    ("aura-flow", {}, {"noise_source": "gpu"}, "noise_source='gpu' cannot be honoured"),
    ("pony-v7", {"shift": 3.0}, {}, "shift=3.0 cannot be honoured by provider=fal with model=pony-v7"),
    ("pony-v7", {"output_quality": 50}, {}, "output_quality=50 cannot be honoured"),
    ("pony-v7", {"steps": 60}, {}, "steps=60 is out of range for provider=fal with model=pony-v7"),
    ("pony-v7", {}, {"expand_prompt": True}, "expand_prompt=True cannot be honoured"),
])
def test_what_a_model_cannot_honour_is_refused_before_any_request(fal, model, params, options, words):
    err = refused(lambda: fal_client(fal, model=model).generate({"seed": 1, **params}, options=options),
                  ParameterError)
    assert words in str(err)
    assert fal.requests == []


def test_a_pony_v7_size_past_fals_limit_is_refused_before_any_request(fal, monkeypatch):
    # fal's ImageSize takes at most 14142 pixels a side; the plan's remote range (512..2048) is narrower today, so
    # the check is exercised with that range widened, as a later wider range would be
    monkeypatch.setattr(pack_module("aura_flow.params"), "REMOTE_MAX_SIZE", 16384)
    err = refused(lambda: fal_client(fal, model="pony-v7").generate({"seed": 1, "width": 1024, "height": 14336}),
                  ParameterError)
    assert "height=14336 is out of range for provider=fal with model=pony-v7: fal takes a whole number of pixels, " \
           "1..14142" in str(err)
    assert fal.requests == []


def test_provider_and_model_choices_are_checked():
    err = refused(lambda: R.RemoteClient(KEY, model="pony-v7"), ParameterError)
    assert "model='pony-v7' is not served by provider=segmind; it serves aura-flow (pony-v7 is served by " \
           "provider=fal)" in str(err)
    assert "provider='replicate' is not known; use segmind or fal" in str(
        refused(lambda: R.RemoteClient(KEY, provider="replicate"), ParameterError))
    assert "api_version='v1' applies to the segmind provider only" in str(
        refused(lambda: R.RemoteClient(FAL_KEY, provider="fal", api_version="v1"), ParameterError))
    err = refused(lambda: R.RemoteClient(KEY, url="http://127.0.0.1:9/v1/aura-flow").generate(
        {"seed": 1}, options={"expand_prompt": True}), ParameterError)
    assert "expand_prompt=True is a fal option; provider=segmind has none" in str(err)


def test_fetch_by_request_id_after_a_crash_submits_nothing(fal):
    named = []
    slow = R.PollPolicy(first=30.0)  # the "crash": stopped as soon as the id was named, before any poll
    refused(lambda: fal_client(fal, model="pony-v7", poll=slow).generate(
        {"seed": 9}, on_request=lambda i, rid: named.append(rid), should_stop=lambda: bool(named)),
        R.RemoteInterrupted)
    assert named == ["fq-1"] and len(fal.submits) == 1
    fal.jobs["fq-1"]["cancelled"] = False  # the stop asked fal to cancel; say it finished anyway
    result = fal_client(fal, model="pony-v7").fetch(named)
    assert len(fal.submits) == 1 and result.images[0].request_id == "fq-1" and result.images[0].seed == 9
    assert_bands(pixels(result.images[0]), 9, tol=12)  # jpeg


# ------------------------------------------------------------------------------------------------ ids, variables
@pytest.mark.parametrize("bad", ["..", "a/b"])
def test_a_request_id_that_would_leave_its_path_is_refused_for_both_providers(fal, svc, bad):
    fal.fail_next({"kind": "id", "id": bad})
    err = refused(lambda: fal_client(fal).generate({"seed": 1}))
    assert f"named the request id {bad!r}, which is not of the form" in str(err) and err.billed is None
    assert [r["method"] for r in fal.requests] == ["POST"]  # no poll of another path
    svc.fail_next({"kind": "id", "id": bad})
    err = refused(lambda: R.RemoteClient(KEY, url=svc.url, retry=FAST, poll=FAST_POLL).generate(
        {"seed": 1, "width": 512, "height": 512}))
    assert f"named the request id {bad!r}" in str(err) and [r["method"] for r in svc.requests] == ["POST"]
    for ids in ([bad], ["ok", bad]):
        assert "is not a request id" in str(refused(lambda: fal_client(fal).fetch(ids), ParameterError))


@pytest.mark.parametrize("provider,env,key_env", [("segmind", "SEGMIND_API_URL", "SEGMIND_API_KEY"),
                                                  ("fal", "FAL_QUEUE_URL", "FAL_KEY")])
@pytest.mark.parametrize("url,what", [("http://127.0.0.1:9/v1/aura flow", "a space"),
                                      ("http://127.0.0.1:9/v1/aura-flow\r\nX-Evil: 1", "a control character"),
                                      ("http://127.0.0.1:9/v1/aurä-flow", "a non-ASCII character"),
                                      ("http://api.example.com/v1/aura-flow", "plain http:// is refused")])
def test_an_endpoint_variable_that_cannot_be_sent_is_refused_when_read(monkeypatch, provider, env, key_env, url,
                                                                       what):
    monkeypatch.setenv(key_env, FAL_KEY if provider == "fal" else KEY)
    monkeypatch.setenv(env, url)
    err = refused(lambda: R.RemoteClient.from_environment(provider=provider))
    assert str(err).startswith(f"{env}: ") and what in str(err)
    assert "billed" not in str(err) and err.billed is False


def test_a_path_http_client_refuses_is_not_sent_nor_called_billed(svc):
    """Past the address checks (a client built around them), a path http.client refuses costs no retry and no
    'may have been billed'."""
    c = R.RemoteClient(KEY, url=svc.url, retry=FAST)
    ep = c.requests.submit_ep
    c.requests.submit_ep = type(ep)(ep.scheme, ep.host, ep.port, "/v2/aura flow")
    err = refused(lambda: c.generate({"seed": 1, "width": 512, "height": 512}))
    assert "cannot be sent" in str(err) and "nothing was sent" in str(err) and "may have been billed" not in str(err)
    assert err.billed is False and svc.requests == []


# ------------------------------------------------------------------------------------------------ keys
def test_fal_key_from_the_environment_or_its_key_file(fal, monkeypatch, tmp_path):
    monkeypatch.setenv("FAL_QUEUE_URL", fal.url)
    err = refused(lambda: R.RemoteClient.from_environment(provider="fal"), R.MissingKeyError)
    assert "no fal API key: set the FAL_KEY environment variable" in str(err)
    assert str(tmp_path / "config" / "auraflow" / "fal_key") in str(err)
    R.save_api_key(FAL_KEY, R.default_key_file("fal"), "fal")
    c = R.RemoteClient.from_environment(provider="fal", poll=FAST_POLL)
    assert "fal_key" in c.key_source and FAL_KEY not in repr(c)
    c.generate({"seed": 5})
    monkeypatch.setenv("FAL_KEY", "wrong-key")  # the variable wins over the file
    err = refused(lambda: R.RemoteClient.from_environment(provider="fal", poll=FAST_POLL).generate({"seed": 5}))
    assert err.status == 401 and "FAL_KEY" in str(err)


def test_key_route_offers_both_providers_and_never_returns_a_key(tmp_path):
    routes = pack_module("nodes.routes")
    status, body = routes.save_key_response({"key": FAL_KEY, "provider": "fal"})
    fal_file = tmp_path / "config" / "auraflow" / "fal_key"
    assert status == 200 and body["providers"]["fal"] == {"configured": True, "source": "file",
                                                          "path": str(fal_file), "env": "FAL_KEY"}
    assert body["configured"] is False and body["providers"]["segmind"]["configured"] is False  # Segmind's untouched
    assert fal_file.read_text() == FAL_KEY + "\n" and fal_file.stat().st_mode & 0o777 == 0o600
    assert FAL_KEY not in json.dumps(body)
    assert R.resolve_api_key(provider="fal") == (FAL_KEY, f"the key file {fal_file}")
    status, body = routes.save_key_response({"key": FAL_KEY, "provider": "replicate"})
    assert status == 400 and "provider='replicate' is not known" in body["error"] and FAL_KEY not in body["error"]
    status, body = routes.save_key_response({"key": "", "provider": "fal"})
    assert status == 200 and not fal_file.exists() and body["providers"]["fal"]["configured"] is False


# ------------------------------------------------------------------------------------------------ command line
def test_cli_remote_and_fetch_with_provider_and_model(fal, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    monkeypatch.setenv("FAL_QUEUE_URL", fal.url)
    fal.fail_next({"kind": "nsfw"})
    code = main(["remote", "--provider", "fal", "--model", "pony-v7", "--seed", "3", "--width", "832",
                 "--output-format", "png", "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.err
    (path,) = out.out.split()
    assert Path(path).exists() and "image 1/1: request id fq-1" in out.err
    assert "has_nsfw_concepts true" in out.err and fal.submits[0]["body"]["image_size"] == {"width": 832,
                                                                                            "height": 1024}
    assert main(["remote", "--provider", "fal", "--negative-prompt", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--negative-prompt='x' cannot be honoured by --provider=fal with --model=aura-flow" in err
    assert main(["fetch", "fq-1", "--provider", "fal", "--model", "pony-v7", "--out", str(tmp_path / "f")]) == 0
    out = capsys.readouterr()
    assert "fq-1:" in out.err and "has_nsfw_concepts true" in out.err and len(fal.submits) == 1
    assert FAL_KEY not in out.err + out.out


# ------------------------------------------------------------------------------------------------ the node
def test_node_provider_inputs_and_metadata(fal, monkeypatch):
    node = pack_module("nodes.remote").AuraFlowRemoteGenerate
    optional = node.INPUT_TYPES()["optional"]
    assert list(optional) == ["api_version", "provider", "model", "expand_prompt", "noise_source",
                              "enable_safety_checker"]
    assert optional["provider"][1]["default"] == "segmind" and optional["expand_prompt"][1]["default"] is False
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    monkeypatch.setenv("FAL_QUEUE_URL", fal.url)
    inputs = _node_defaults()
    pnginfo = {}
    images, seed, _credits, report = node().generate(**inputs, seed=12, provider="fal", expand_prompt=True,
                                                     extra_pnginfo=pnginfo)
    assert tuple(images.shape) == (1, 1024, 1024, 3) and seed == 12
    assert "(fal aura-flow); request ids fq-1" in report and "drawn from the prompt 'expanded: a lake'" in report
    assert pnginfo["auraflow_remote"]["provider"] == "fal"
    assert pnginfo["auraflow_remote"]["images"][0]["prompt_used"] == "expanded: a lake"
    err = refused(lambda: node().generate(**{**inputs, "negative_prompt": "x"}, seed=1, provider="fal"), ParameterError)
    assert "negative_prompt='x' cannot be honoured by provider=fal" in str(err) and len(fal.submits) == 1


def test_node_task_cancelled_stops_the_client_and_cancels_fal_requests(monkeypatch):
    import asyncio

    node = pack_module("nodes.remote").AuraFlowRemoteGenerate
    with FakeFal() as service:
        service.fail_next({"kind": "never"})
        monkeypatch.setenv("FAL_KEY", FAL_KEY)
        monkeypatch.setenv("FAL_QUEUE_URL", service.url)

        async def scenario():
            task = asyncio.create_task(node().run(**_node_defaults(), seed=1, provider="fal"))
            for _ in range(200):  # until fal has been polled a few times
                if len(service.states.get("fq-1", [])) >= 3:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - t0

        waited = asyncio.run(scenario())
    assert waited < 1.0  # within the client's poll interval and one cancel request
    (put,) = [r for r in service.requests if r["method"] == "PUT"]
    assert put["path"] == "/fal-ai/aura-flow/requests/fq-1/cancel" and service.jobs["fq-1"]["cancelled"]


def _node_defaults() -> dict:
    validate = pack_module("aura_flow.params").validate_generation
    values = dict(validate({}, remote=True))
    values.pop("seed")
    values["prompt"] = "a lake"
    return values


def run_three_nodes(service_time: float) -> tuple[float, float]:
    """(seconds for one remote node, seconds for three in one API workflow) against a service of that time."""
    classes = wx.all_classes()
    with FakeFal(service_time=service_time) as service:
        mp = pytest.MonkeyPatch()
        mp.setenv("FAL_KEY", FAL_KEY)
        mp.setenv("FAL_QUEUE_URL", service.url)
        try:
            def prompt(n):
                return {str(i): {"class_type": "AuraFlowRemoteGenerate",
                                 "inputs": {**_node_defaults(), "seed": i, "provider": "fal"}} for i in range(1, n + 1)}
            wx.execute(prompt(1), classes)  # warm-up: imports, the first tensor, the first connection
            start = time.monotonic()
            wx.execute(prompt(1), classes)
            one = time.monotonic() - start
            start = time.monotonic()
            outputs, _ui = wx.execute(prompt(3), classes)
            three = time.monotonic() - start
        finally:
            mp.undo()
    assert [outputs[str(i)][1] for i in (1, 2, 3)] == [1, 2, 3]
    assert len(service.submits) == 5
    for i in (1, 2, 3):
        top = np.asarray(outputs[str(i)][0][0, 5, 5].numpy() * 255).round()
        assert np.abs(top - np.array(pack_seed_colour(i))).max() <= 1
    return one, three


def pack_seed_colour(seed):
    from remote_server import seed_colour

    return seed_colour(seed)


def test_three_remote_nodes_wait_together():
    one, three = run_three_nodes(1.0)
    assert one >= 1.0 and three < 2 * one, (one, three)


@pytest.mark.heavy
def test_three_remote_nodes_wait_together_3s_service():
    one, three = run_three_nodes(3.0)
    assert one >= 3.0 and three < 2 * one, (one, three)
