"""Batch jobs on the local engine (issue 19), on the tiny model: every job done once with a manifest line whose
hashes match its files, images byte-identical to ``generate``'s, reruns that touch nothing, resume after a torn
manifest line and after Ctrl-C, --retry-failed, and a bad line refused before any work (exit 2, no traceback)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from batch_support import signal_when

from aura_flow.batch import run
from aura_flow.batch.local import LocalBackend
from aura_flow.batch.manifest import Manifest, read_records
from aura_flow.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"width": 64, "height": 64, "steps": 2, "sampler": "euler"}


def _jsonl(path, *objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def _records(out):
    return [r for _, r in read_records(Path(out) / "manifest.jsonl")]


def _run(tiny_pipe, jobs, out, progress=False, **kw):
    return run(jobs, out, backend=LocalBackend(pipe=tiny_pipe), defaults=SMALL, progress=progress, **kw)


def _state(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in Path(folder).iterdir()}


def test_three_jobs_done_with_hashes_then_a_rerun_touches_nothing(tiny_pipe, tmp_path):
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a fox"}, {"prompt": "a cat", "name": "cat", "seed": 3},
                  {"prompt": "a fox", "output_format": "png"})
    out = tmp_path / "out"
    s = _run(tiny_pipe, jobs, out)
    assert (s.done, s.failed, s.skipped, s.total, s.images, s.exit_code) == (3, 0, 0, 3, 3, 0)
    recs = _records(out)
    assert [r["status"] for r in recs] == ["done"] * 3 and [r["line"] for r in recs] == [1, 2, 3]
    for r in recs:
        (name,) = r["files"]
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == r["sha256"][0]
        assert r["backend"] == "local" and r["worker"] and r["seconds"] > 0 and isinstance(r["seed"], int)
    assert recs[1]["files"] == ["cat_3_00.webp"] and recs[2]["files"][0].endswith(".png")
    before = _state(out)
    again = _run(tiny_pipe, jobs, out)
    assert (again.done, again.skipped_done, again.to_run, again.exit_code) == (0, 3, 0, 0)
    assert _state(out) == before  # no new file, the same inodes, mtimes and bytes (the manifest too)


def test_a_batch_image_is_byte_identical_to_generates(tiny_models, tiny_pipe, tmp_path, capsys):
    params = {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 42, "cfg": 3.0, "output_format": "webp"}
    jobs = _jsonl(tmp_path / "jobs.jsonl", params)
    _run(tiny_pipe, jobs, tmp_path / "batch")
    (rec,) = _records(tmp_path / "batch")
    assert main(["generate", "--checkpoint", str(tiny_models["diffusers"]["checkpoint"]), "--device", "cpu",
                 "--out", str(tmp_path / "gen"), "--prompt", "a red fox", "--negative-prompt", "blurry",
                 "--seed", "42", "--cfg", "3", "--width", "64", "--height", "64", "--steps", "2",
                 "--sampler", "euler"]) == 0
    (gen,) = capsys.readouterr().out.split()
    assert hashlib.sha256(Path(gen).read_bytes()).hexdigest() == rec["sha256"][0]


def test_two_lines_times_three_seeds_make_six_distinct_images(tiny_pipe, tmp_path, capsys):
    jobs = tmp_path / "prompts.txt"
    jobs.write_text("a fox\na cat\n", encoding="utf-8")
    s = _run(tiny_pipe, jobs, tmp_path / "out", seeds=3, progress="bar")
    assert "6/6" in capsys.readouterr().err  # the bar counted every job
    recs = _records(tmp_path / "out")
    assert s.done == 6 and len({r["job"] for r in recs}) == 6
    assert [r["seed"] - recs[0]["seed"] for r in recs[:3]] == [0, 1, 2]
    assert len({r["sha256"][0] for r in recs}) == 6 and len(list((tmp_path / "out").glob("*.webp"))) == 6


def test_csv_with_a_grid_and_the_same_unseeded_seeds_on_a_rerun(tiny_pipe, tmp_path):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("prompt,cfg\na fox,1\na fox,1\n", encoding="utf-8")  # duplicate lines draw other seeds
    s = _run(tiny_pipe, jobs, tmp_path / "out", grid=[("steps", [1, 2])])
    recs = _records(tmp_path / "out")
    assert s.done == 4 and len({r["sha256"][0] for r in recs}) == 4
    assert [r["seed"] for r in recs][0] == recs[1]["seed"] != recs[2]["seed"] == recs[3]["seed"]
    (tmp_path / "out" / "manifest.jsonl").unlink()
    _run(tiny_pipe, jobs, tmp_path / "again", grid=[("steps", [1, 2])])
    assert [r["sha256"] for r in _records(tmp_path / "again")] == [r["sha256"] for r in recs]


def test_torn_last_manifest_line_is_ignored_and_its_job_run_again(tiny_pipe, tmp_path):
    jobs = _jsonl(tmp_path / "jobs.jsonl", *[{"prompt": f"p{i}", "seed": i} for i in range(3)])
    out = tmp_path / "out"
    _run(tiny_pipe, jobs, out)
    path = out / "manifest.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # the last record torn mid-write
    s = _run(tiny_pipe, jobs, out)
    assert (s.done, s.skipped_done) == (1, 2)
    m = Manifest.open(out)
    assert m.counts()["done"] == 3 and m.records == 3
    last = _records(out)[-1]
    assert last["files"] == ["line00003_2_00_1.webp"]  # the first file is never overwritten


def test_failed_jobs_rerun_only_with_retry_failed(tiny_pipe, tmp_path):
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2})
    out = tmp_path / "out"
    from aura_flow.batch.jobs import read_jobs

    first, second = read_jobs(jobs, defaults=SMALL)
    m = Manifest.open(out)
    m.append({"job": second.key, "line": 2, "status": "failed", "error": "earlier failure"})
    m.close()
    s = _run(tiny_pipe, jobs, out)
    assert (s.done, s.skipped_failed) == (1, 1)
    s = _run(tiny_pipe, jobs, out, retry_failed=True)
    assert (s.done, s.skipped_done, s.skipped_failed) == (1, 1, 0)
    assert Manifest.open(out).status(second.key) == "done"


def test_a_job_that_raises_fails_alone(tiny_pipe, tmp_path):
    from lora_files import write_lora

    lora = write_lora(tmp_path / "style.safetensors")
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a", "seed": 1, "loras": [[str(lora), 0.5]]},
                  {"prompt": "b", "seed": 2})

    class Vanishing(LocalBackend):  # the LoRA file is removed after every job was checked
        def check(self):
            lora.unlink(missing_ok=True)

    s = run(jobs, tmp_path / "out", backend=Vanishing(pipe=tiny_pipe), defaults=SMALL, progress=False)
    recs = _records(tmp_path / "out")
    assert (s.done, s.failed, s.exit_code) == (1, 1, 1) and [r["status"] for r in recs] == ["failed", "done"]
    assert "LoRA file not found" in recs[0]["error"] and s.errors[0][0] == 1


def test_a_backends_own_job_check_names_the_line(tiny_pipe, tmp_path):
    from aura_flow.batch.jobs import JobFileError
    from aura_flow.errors import ParameterError

    class NoCats(LocalBackend):
        def check_job(self, job):
            if "cat" in job.params["prompt"]:
                raise ParameterError(f"prompt={job.params['prompt']!r}: no cats on this backend")

    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a fox"}, {"prompt": "a cat"})
    with pytest.raises(JobFileError, match=r"jobs.jsonl line 2: prompt='a cat': no cats"):
        run(jobs, tmp_path / "out", backend=NoCats(pipe=tiny_pipe), progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_steps_on_line_5_exits_2_naming_the_line_and_key(tmp_path, capsys):
    jobs = _jsonl(tmp_path / "jobs.jsonl", *[{"prompt": f"p{i}"} for i in range(4)], {"prompt": "x", "steps": 500})
    code = main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {jobs} line 5: steps=500 is out of range; allowed: 1..100\n"
    assert not (tmp_path / "out").exists()
    code = main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--seeds", "0"])
    assert code == 2 and "--seeds=0 is out of range" in capsys.readouterr().err


def test_dry_run_lists_and_runs_nothing(tmp_path, capsys):
    jobs = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a fox", "seed": 5, "name": "fox"}, {"prompt": "a cat"})
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--dry-run", "--seeds", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("line 1#0\tfox\t") and "seed 6" in out[1] and "'a cat'" in out[3]
    assert not (tmp_path / "out").exists()


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [sys.executable, "-m", "aura_flow", "batch", *map(str, args)], env


@pytest.mark.heavy
def test_bad_line_in_a_subprocess_has_no_traceback(tmp_path):
    jobs = _jsonl(tmp_path / "jobs.jsonl", *[{"prompt": f"p{i}"} for i in range(4)], {"prompt": "x", "steps": 500})
    cmd, env = _cli(jobs, "--out", tmp_path / "out", "--checkpoint", tmp_path)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "line 5: steps=500" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.heavy
def test_sigint_after_two_images_then_a_rerun_does_each_job_once(tiny_models, tmp_path):
    jobs = _jsonl(tmp_path / "jobs.jsonl", *[{"prompt": f"prompt {i}", "seed": i} for i in range(6)])
    out = tmp_path / "out"
    cmd, env = _cli(jobs, "--out", out, "--checkpoint", tiny_models["diffusers"]["checkpoint"], "--device", "cpu",
                    "--width", 128, "--height", 128, "--steps", 12, "--sampler", "euler")
    code, _, err = signal_when(cmd, out, lambda recs: sum(r["status"] == "done" for r in recs) >= 2, signal.SIGINT,
                               env=env)
    assert code == 130, err
    # the third job was running (or about to start: then none was in flight)
    assert ("interrupted; in flight: line 3 (job" in err or "interrupted; in flight: none" in err), err
    assert "Traceback" not in err
    first = sum(r["status"] == "done" for r in _records(out))
    assert 2 <= first < 6
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"skipped {first} jobs already done" in p.stderr
    recs = _records(out)
    assert len(recs) == 6 and all(r["status"] == "done" for r in recs) and len({r["job"] for r in recs}) == 6
    files = sorted(f for r in recs for f in r["files"])
    assert files == sorted(p.name for p in out.glob("*.webp")) and len(set(files)) == 6
