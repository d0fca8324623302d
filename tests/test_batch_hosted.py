"""Batch jobs through the hosted API (issue 19, ``--backend hosted``), against the stand-in Segmind service on
127.0.0.1: each request id in the manifest before its image, done lines naming them with hashes of their files,
``concurrency`` requests at a time, a failed request failing its job alone, a refused account stopping the run,
a crash or Ctrl-C followed by a rerun that FETCHES what was submitted (one submit per image, ever), the key in no
output; and the ``remote`` command recording its request ids in the same manifest."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote_checks import (FAST, FAST_POLL, assert_bands, clean_env, fast_default_polls, json_body,  # noqa: E402,F401
                           key_never_logged, svc)
from remote_server import KEY  # noqa: E402
from batch_support import signal_when  # noqa: E402

from aura_flow.batch import run  # noqa: E402
from aura_flow.batch.hosted import HostedBackend  # noqa: E402
from aura_flow.batch.jobs import JobFileError, read_jobs  # noqa: E402
from aura_flow.batch.manifest import Manifest, read_records  # noqa: E402
from aura_flow.batch.runner import ManifestSink  # noqa: E402
from aura_flow.cli import main  # noqa: E402
from aura_flow.errors import ParameterError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"width": 512, "height": 512, "output_format": "png"}


@pytest.fixture
def env(svc, monkeypatch):
    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    return svc


def _jsonl(path, *objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def _records(out):
    return [r for _, r in read_records(Path(out) / "manifest.jsonl")]


def _run(jobs, out, **kw):
    kw.setdefault("poll", FAST_POLL)
    return run(jobs, out, backend="hosted", defaults=SMALL, progress=False, retry=FAST, **kw)


def _submits_per_seed(svc) -> Counter:
    return Counter(r["body"]["seed"] for r in svc.submits)


def _png(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _key_nowhere(*folders, texts=()):
    for folder in folders:
        for p in Path(folder).rglob("*"):
            if p.is_file():
                assert KEY.encode() not in p.read_bytes(), p
    for text in texts:
        assert KEY not in text


def test_three_jobs_three_done_lines_with_request_ids_and_hashes_then_a_rerun_sends_nothing(env, tmp_path):
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a fox", "seed": 10}, {"prompt": "a cat", "seed": 20,
                  "name": "cat", "number_of_images": 2}, {"prompt": "an owl", "seed": 30})
    out = tmp_path / "out"
    s = _run(jobs, out)
    assert (s.done, s.failed, s.total, s.images, s.exit_code) == (3, 0, 3, 4, 0)
    recs = _records(out)
    submitted = [r for r in recs if r["status"] == "submitted"]
    done = [r for r in recs if r["status"] == "done"]
    assert len(submitted) == 4 and len(done) == 3 and len(recs) == 7
    assert sorted(r["request_id"] for r in submitted) == sorted(f"rq-{i}" for i in range(1, 5))
    for r in done:
        assert r["backend"] == "hosted" and r["request_id"] == r["request_ids"][0] and "fetched" not in r
        assert len(r["files"]) == len(r["request_ids"]) == len(r["sha256"])
        for name, sha, rid in zip(r["files"], r["sha256"], r["request_ids"]):
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
            seed = env.jobs[rid]["body"]["seed"]  # the file is the image of the request named beside it
            assert_bands(_png(out / name), seed, tol=0)
        mine = [s for s in submitted if s["job"] == r["job"]]  # each id was on disk before the done line
        assert sorted(s["request_id"] for s in mine) == sorted(r["request_ids"])
        assert all(recs.index(s) < recs.index(r) for s in mine)
    cat = next(r for r in done if r["name"] == "cat")
    assert cat["files"] == ["cat_20_00.png", "cat_20_01.png"] and cat["seed"] == 20
    assert _submits_per_seed(env) == {10: 1, 20: 1, 21: 1, 30: 1}  # number_of_images 2 = seeds 20, 21
    assert all(r["body"]["number_of_images"] == 1 for r in env.submits)
    again = _run(jobs, out)
    assert (again.done, again.skipped_done, again.to_run) == (0, 3, 0) and len(env.submits) == 4
    _key_nowhere(out)


def test_concurrency_bounds_the_requests_in_flight(svc, env, tmp_path):
    svc.queue_polls = 4  # each request stays open for a few polls
    jobs = _jsonl(tmp_path / "jobs.jsonl", *[{"prompt": f"p{i}", "seed": i} for i in range(5)],
                  {"prompt": "two", "seed": 50, "number_of_images": 2})
    s = _run(jobs, tmp_path / "out", concurrency=3)
    assert (s.done, s.images) == (6, 7)
    assert svc.max_open_jobs == 3  # never more than 3 requests submitted and unfinished, and 3 were reached
    s = _run(_jsonl(tmp_path / "one.jsonl", *[{"prompt": f"q{i}", "seed": 100 + i} for i in range(3)]),
             tmp_path / "out1", concurrency=1)
    assert s.done == 3 and svc.max_open_jobs == 3 and svc.open_jobs == 0


def test_a_job_the_service_fails_fails_alone_and_reruns_with_retry_failed(env, tmp_path):
    env.fail_seed(21, {"kind": "failed", "error": "worker crashed"})  # image 2 of line 2
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a", "seed": 10}, {"prompt": "b", "seed": 20,
                  "number_of_images": 2}, {"prompt": "c", "seed": 30})
    out = tmp_path / "out"
    s = _run(jobs, out)
    assert (s.done, s.failed, s.exit_code) == (2, 1, 1)
    (failed,) = [r for r in _records(out) if r["status"] == "failed"]
    assert failed["line"] == 2 and "image 2:" in failed["error"] and "worker crashed" in failed["error"]
    assert len(failed["request_ids"]) == 2 and "python -m aura_flow fetch" in failed["error"]
    assert s.errors[0][0] == 2
    s = _run(jobs, out)
    assert (s.done, s.skipped_done, s.skipped_failed) == (0, 2, 1)
    s = _run(jobs, out, retry_failed=True)
    assert (s.done, s.failed) == (1, 0)
    assert _submits_per_seed(env) == {10: 1, 20: 2, 21: 2, 30: 1}  # the failed job ran again, the others not


def test_a_refused_account_stops_the_run_and_the_manifest_resumes(env, tmp_path):
    env.fail_next({"status": 402, "body": json_body("insufficient credits")})
    jobs = _jsonl(tmp_path / "jobs.jsonl", *[{"prompt": f"p{i}", "seed": i} for i in range(4)])
    out = tmp_path / "out"
    with pytest.raises(ParameterError) as info:
        _run(jobs, out, concurrency=1)
    msg = str(info.value)
    assert "402" in msg and "insufficient credits" in msg and "Nothing more was sent" in msg \
        and "run the same command again" in msg and KEY not in msg
    assert len(env.submits) == 1  # no point sending the rest
    assert [r["status"] for r in _records(out)] == []  # no job counts as failed: a rerun does them all
    s = _run(jobs, out, concurrency=2)
    assert (s.done, s.failed) == (4, 0) and len(env.submits) == 5


def test_a_bad_key_stops_the_cli_with_a_clear_message(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMIND_API_KEY", "SG_ffffffffffffffff")
    jobs = _jsonl(tmp_path / "jobs.jsonl", *[{"prompt": f"p{i}", "seed": i} for i in range(3)])
    code = main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--backend", "hosted", "--concurrency", "1",
                 "--width", "512", "--height", "512"])
    err = capsys.readouterr().err
    assert code == 2 and "the hosted API refused the run" in err and "401" in err, err
    assert len(env.submits) == 1 and "SG_ffffffffffffffff" not in err


def _interrupted_submits(svc, jobs_file, out, n_ids, **options):
    """Run the backend with a stop set as soon as ``n_ids`` request ids are in the manifest (Ctrl-C): returns the
    ids; nothing was fetched."""
    svc.queue_polls = 50
    backend = HostedBackend(concurrency=4, poll=FAST_POLL, retry=FAST, **options)
    manifest = Manifest.open(out)
    sink = ManifestSink(manifest, "hosted")
    stop = threading.Event()
    jobs = list(read_jobs(jobs_file, defaults=SMALL, remote=True))
    t = threading.Thread(target=backend.run, args=(jobs, sink, stop))
    t.start()
    deadline = time.monotonic() + 20
    while sum(r["status"] == "submitted" for r in _records(out)) < n_ids:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stop.set()
    t.join(10)
    assert not t.is_alive()
    backend.close()
    manifest.close()
    svc.queue_polls = 1
    recs = _records(out)
    assert all(r["status"] == "submitted" for r in recs)
    return [r["request_id"] for r in recs]


def test_ctrl_c_leaves_the_ids_and_a_rerun_fetches_them_without_submitting_again(env, tmp_path, caplog):
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a", "seed": 10, "number_of_images": 2},
                  {"prompt": "b", "seed": 30})
    out = tmp_path / "out"
    ids = _interrupted_submits(env, jobs, out, 3)
    assert len(ids) == 3 and list(out.glob("*.png")) == []
    assert "left to finish at the service" in caplog.text and "fetches what finished" in caplog.text
    s = _run(jobs, out)
    assert (s.done, s.failed, s.images) == (2, 0, 3)
    assert _submits_per_seed(env) == {10: 1, 11: 1, 30: 1}  # nothing submitted again
    done = [r for r in _records(out) if r["status"] == "done"]
    for r in done:
        assert sorted(r["fetched"]) == sorted(r["request_ids"])
        for name, rid in zip(r["files"], r["request_ids"]):
            assert_bands(_png(out / name), env.jobs[rid]["body"]["seed"], tol=0)
    two = next(r for r in done if r["line"] == 1)  # image i is the request that made image i
    assert [env.jobs[rid]["body"]["seed"] for rid in two["request_ids"]] == [10, 11]
    assert "fetched by request id" in caplog.text


def test_an_expired_id_is_submitted_anew_and_said(env, tmp_path, caplog):
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a", "seed": 10, "number_of_images": 2})
    out = tmp_path / "out"
    ids = _interrupted_submits(env, jobs, out, 2)
    lost = next(rid for rid in ids if env.jobs[rid]["body"]["seed"] == 11)
    env.jobs[lost]["fault"] = {"kind": "expire"}  # the service no longer knows it
    s = _run(jobs, out)
    assert (s.done, s.images) == (1, 2)
    assert _submits_per_seed(env) == {10: 1, 11: 2}  # only the image that could not be fetched
    assert f"request id {lost} cannot be fetched" in caplog.text and "submitted anew" in caplog.text
    (done,) = [r for r in _records(out) if r["status"] == "done"]
    assert len(done["fetched"]) == 1 and lost not in done["request_ids"]
    assert_bands(_png(out / done["files"][1]), 11, tol=0)


def test_loras_node_inputs_v1_and_a_missing_key_are_refused_before_anything_is_sent(svc, tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.setenv("SEGMIND_API_URL", svc.url)
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a"}, {"prompt": "b", "loras": [["x.safetensors", 1]]})
    with pytest.raises(JobFileError) as info:
        _run(jobs, tmp_path / "out")
    assert "line 2" in str(info.value) and "loras: the hosted API takes no LoRAs" in str(info.value)
    sets = _jsonl(tmp_path / "sets.jsonl", {"prompt": "a", "12.steps": 3})
    with pytest.raises(JobFileError, match="NODE.INPUT keys need --backend comfyui"):
        _run(sets, tmp_path / "out")
    with pytest.raises(ParameterError, match="api_version=v1 cannot run a batch"):
        HostedBackend(api_version="v1")
    monkeypatch.setenv("SEGMIND_API_VERSION", "v1")
    base = ["batch", str(_jsonl(tmp_path / "ok.jsonl", {"prompt": "a"})), "--out", str(tmp_path / "out"),
            "--backend", "hosted"]
    assert main(base) == 2
    assert "--api-version=v1 cannot run a batch" in capsys.readouterr().err
    monkeypatch.delenv("SEGMIND_API_VERSION")
    assert main(base + ["--concurrency", "0"]) == 2
    assert "--concurrency=0 is out of range" in capsys.readouterr().err
    assert main(base + ["--checkpoint", "x"]) == 2
    assert "--checkpoint is a flag of --backend local" in capsys.readouterr().err
    assert main(base) == 2  # no key anywhere
    assert "SEGMIND_API_KEY" in capsys.readouterr().err
    assert main(["remote", "--out", str(tmp_path / "out")]) == 1  # nothing named: no manifest line either
    assert "SEGMIND_API_KEY" in capsys.readouterr().err
    assert svc.requests == [] and not (tmp_path / "out" / "manifest.jsonl").exists()


def test_the_remote_command_records_its_request_ids_in_the_manifest(env, tmp_path, capsys, fast_default_polls):
    out = tmp_path / "out"
    assert main(["remote", "--seed", "7", "--number-of-images", "2", "--output-format", "png", "--width", "512",
                 "--height", "512", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "image 1/2: request id rq-" in cap.err and len(cap.out.split()) == 2  # stdout/stderr as before
    recs = _records(out)
    assert [r["status"] for r in recs] == ["submitted", "submitted", "done"]
    assert sorted(r["request_id"] for r in recs[:2]) == ["rq-1", "rq-2"]
    assert {r["image"]: r["seed"] for r in recs[:2]} == {0: 7, 1: 8}
    done = recs[2]
    assert done["backend"] == "remote" and len({r["job"] for r in recs}) == 1
    assert sorted(done["request_ids"]) == ["rq-1", "rq-2"]
    for name, sha in zip(done["files"], done["sha256"]):
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha and str(out / name) in cap.out
    env.fail_next({"kind": "failed", "error": "worker crashed"})
    assert main(["remote", "--seed", "9", "--width", "512", "--height", "512", "--out", str(out)]) == 1
    last = _records(out)[-2:]
    assert [r["status"] for r in last] == ["submitted", "failed"] and "worker crashed" in last[1]["error"]
    assert last[1]["files"] == [] and last[0]["request_id"] == "rq-3"
    _key_nowhere(out, texts=(cap.out, cap.err))


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [sys.executable, "-m", "aura_flow", *map(str, args)], env


@pytest.mark.heavy
def test_killed_after_a_submit_the_rerun_fetches_by_request_id_and_submits_nothing(env, tmp_path, caplog):
    env.queue_polls = 3  # the CLI polls after 1 s, then 1.5 s, ...: seconds between the submit and the image
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a fox", "seed": 5}, {"prompt": "a cat", "seed": 6})
    out = tmp_path / "out"
    cmd, penv = _cli("batch", jobs, "--out", out, "--backend", "hosted", "--concurrency", "1", "--width", 512,
                     "--height", 512, "--output-format", "png")
    _, stdout, stderr = signal_when(cmd, out, lambda recs: any(r["status"] == "submitted" for r in recs),
                                    signal.SIGKILL, env=penv, timeout=60)
    recs = _records(out)
    assert [r["status"] for r in recs] == ["submitted"] and len(env.submits) == 1  # killed before its image
    rid = recs[0]["request_id"]
    p = subprocess.run(cmd, env=penv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert _submits_per_seed(env) == {5: 1, 6: 1}  # the killed job's image was fetched, not submitted again
    assert f"image 1 fetched by request id {rid}" in p.stderr and "done 2, failed 0" in p.stderr
    done = {r["line"]: r for r in _records(out) if r["status"] == "done"}
    assert done[1]["request_ids"] == [rid] and done[1]["fetched"] == [rid]
    assert_bands(_png(out / done[1]["files"][0]), 5, tol=0)
    _key_nowhere(out, texts=(stdout, stderr, p.stdout, p.stderr))


def test_the_manifest_keeps_each_pending_ids_image_until_the_job_is_done(tmp_path):
    m = Manifest.open(tmp_path)
    base = {"job": "k1", "status": "submitted"}
    for record in ({**base, "request_id": "a", "image": 1}, {**base, "request_id": "b"},
                   {**base, "request_id": "a", "image": 0}, {**base, "request_id": "c", "image": True}):
        m.append(record)
    assert m.pending_ids("k1") == ["a", "b", "c"]  # an id recorded twice is kept once, as first said
    assert m.pending_images("k1") == [("a", 1), ("b", None), ("c", None)]  # True is not an image number
    m.close()
    again = Manifest.open(tmp_path)
    assert again.pending_images("k1") == [("a", 1), ("b", None), ("c", None)] and again.status("k1") == "submitted"
    again.append({"job": "k1", "status": "done", "files": []})
    assert again.pending_images("k1") == [] and again.pending_ids("k1") == [] and again.status("k1") == "done"
    again.close()


def test_fal_pony_v7_jobs_from_the_cli_and_a_value_fal_aura_flow_cannot_honour_refused(tmp_path, monkeypatch, caplog,
                                                                                       capsys):
    from fal_server import FAL_KEY, FakeFal

    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a fox", "seed": 3, "width": 768, "height": 1024},
                  {"prompt": "a cat", "seed": 4, "number_of_images": 2})
    out = tmp_path / "out"
    cmd = ["batch", str(jobs), "--out", str(out), "--backend", "hosted", "--provider", "fal", "--model", "pony-v7",
           "--output-format", "png"]
    with FakeFal() as fal:
        monkeypatch.setenv("FAL_KEY", FAL_KEY)
        monkeypatch.setenv("FAL_QUEUE_URL", fal.url)
        assert main(cmd) == 0, capsys.readouterr().err
        assert sorted((r["body"]["seed"], r["path"]) for r in fal.submits) == [(s, "/fal-ai/pony-v7") for s in (3, 4, 5)]
        assert all(r["body"]["num_images"] == 1 and r["body"]["output_format"] == "png" for r in fal.submits)
        done = {r["line"]: r for r in _records(out) if r["status"] == "done"}
        assert len(done) == 2 and all(r["provider"] == "fal" and r["model"] == "pony-v7" for r in done.values())
        for r in done.values():
            for name, sha, rid in zip(r["files"], r["sha256"], r["request_ids"]):
                assert rid.startswith("fq-") and hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
                assert_bands(_png(out / name), fal.jobs[rid]["body"]["seed"], tol=0)
        assert _png(out / done[1]["files"][0]).shape == (1024, 768, 3)  # {width, height} honoured
        assert main(cmd) == 0 and len(fal.submits) == 3  # the rerun sends nothing
        bad = _jsonl(tmp_path / "bad.jsonl", {"prompt": "a"}, {"prompt": "b", "negative_prompt": "blur"})
        assert main(["batch", str(bad), "--out", str(tmp_path / "bad"), "--backend", "hosted", "--provider", "fal"]) == 2
        err = capsys.readouterr().err
        assert "line 2: negative_prompt='blur' cannot be honoured by provider=fal with model=aura-flow" in err, err
        assert len(fal.submits) == 3 and not (tmp_path / "bad").exists()
        for r in fal.media.requests:
            assert "authorization" not in {k.lower() for k in r["headers"]}
    _key_nowhere(out, texts=(caplog.text,))
    assert FAL_KEY.split(":")[1] not in caplog.text + (out / "manifest.jsonl").read_text()


def test_on_fal_ctrl_c_cancels_what_had_not_started_and_the_rerun_submits_it_anew(tmp_path, monkeypatch, caplog):
    from fal_server import FAL_KEY, FakeFal

    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a", "seed": 10, "number_of_images": 2})
    out = tmp_path / "out"
    with FakeFal() as fal:
        monkeypatch.setenv("FAL_KEY", FAL_KEY)
        monkeypatch.setenv("FAL_QUEUE_URL", fal.url)
        ids = _interrupted_submits(fal, jobs, out, 2, provider="fal", model="pony-v7")
        assert all(fal.jobs[rid]["cancelled"] for rid in ids)  # asked to cancel: neither had started
        assert "fal was asked to cancel those not yet started" in caplog.text
        s = _run(jobs, out, provider="fal", model="pony-v7")
        assert (s.done, s.images) == (1, 2)
        assert sorted(r["body"]["seed"] for r in fal.submits) == [10, 10, 11, 11]  # cancelled: submitted anew
        assert all(f"request id {rid} cannot be fetched" in caplog.text for rid in ids)
        (done,) = [r for r in _records(out) if r["status"] == "done"]
        assert "fetched" not in done and not set(ids) & set(done["request_ids"])


def test_an_output_folder_of_another_provider_model_or_the_own_model_is_refused_before_anything_is_sent(
        tmp_path, monkeypatch, capsys):
    """A job's key names its parameters, not where it ran: a folder holding pony-v7's images must not make the same
    jobs count as done on aura-flow (or Segmind, or the user's own model), so such a run is refused up front."""
    from fal_server import FAL_KEY, FakeFal

    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a fox", "seed": 3})
    out = tmp_path / "out"
    cmd = ["batch", str(jobs), "--out", str(out), "--backend", "hosted", "--provider", "fal"]
    with FakeFal() as fal:
        monkeypatch.setenv("FAL_KEY", FAL_KEY)
        monkeypatch.setenv("FAL_QUEUE_URL", fal.url)
        assert main(cmd + ["--model", "pony-v7"]) == 0, capsys.readouterr().err
        before = (out / "manifest.jsonl").read_bytes()
        assert main(cmd + ["--model", "aura-flow"]) == 2
        err = capsys.readouterr().err
        assert f"out {out}: its manifest.jsonl holds jobs made by provider fal, model pony-v7, and this run asks " \
               "provider fal, model aura-flow" in err and "Give another output folder" in err, err
        assert len(fal.submits) == 1 and (out / "manifest.jsonl").read_bytes() == before
        assert main(cmd + ["--model", "pony-v7"]) == 0 and len(fal.submits) == 1  # the same target resumes
        assert main(cmd[:2] + ["--out", str(tmp_path / "aura")] + cmd[4:] + ["--model", "aura-flow"]) == 0
        assert len(fal.submits) == 2
        own = tmp_path / "own"  # a folder the local backend wrote (its lines name no provider)
        m = Manifest.open(own)
        m.append({"job": "k", "status": "done", "backend": "local", "files": []})
        m.close()
        with pytest.raises(ParameterError, match=r"holds jobs made by your own model \(the local, comfyui or ray "
                                                 r"backend\), and this run asks provider fal, model aura-flow"):
            _run(jobs, own, provider="fal")
        assert len(fal.submits) == 2
    with pytest.raises(ParameterError, match="holds jobs made by provider fal, model pony-v7, and this run asks your "
                                             "own model"):
        run(jobs, out, backend="local", checkpoint=str(tmp_path / "no-model"), progress=False)
