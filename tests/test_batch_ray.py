"""The ``ray`` batch backend on a real local Ray (2 CPU workers, the tiny model): the same bytes as the local
backend, a worker killed mid-run, the driver killed mid-run and the command rerun, ``--collect``, no Ray installed.

The Ray tests are heavy (a Ray start and two workers loading the model); they share one Ray session (module
fixture). The driver-kill test runs the CLI in a subprocess with its own Ray (``--ray-address local``)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from aura_flow.batch.model import Job
from aura_flow.batch.ray import RayBackend, _Window, write_files

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _params(**kw) -> dict:
    from aura_flow.params import DEFAULTS

    return {**DEFAULTS, "seed": 1, **kw}


def write_jobs(path, n, *, lora=None, steps=2, **extra) -> Path:
    lines = []
    for i in range(n):
        job = {"prompt": f"a red fox number {i}", "seed": 100 + i, "steps": steps, "width": 64, "height": 64,
               "sampler": "euler", "output_format": "png", **extra}
        if lora and i % 2:
            job["loras"] = [[str(lora), 0.8]]
        lines.append(json.dumps(job) + "\n")
    Path(path).write_text("".join(lines))
    return Path(path)


def manifest(folder) -> list[dict]:
    return [json.loads(x) for x in (Path(folder) / "manifest.jsonl").read_text().splitlines() if x.strip()]


def images(folder) -> dict:
    """file name -> sha256 of every image in the folder (hidden temp files excluded)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.suffix in (".png", ".webp", ".jpg") and not p.name.startswith(".")}


def check_exactly_once(folder, n_jobs, images_per_job=1) -> dict:
    """One done line per job, its files' sha256 as recorded, and no image that no done line names."""
    done = [r for r in manifest(folder) if r["status"] == "done"]
    assert len(done) == n_jobs and len({r["job"] for r in done}) == n_jobs, Counter(r["job"] for r in done)
    files = images(folder)
    named = {f: h for r in done for f, h in zip(r["files"], r["sha256"])}
    assert named == files  # every file recorded with its bytes' hash, nothing written beside
    assert len(files) == n_jobs * images_per_job
    return files


# ------------------------------------------------------------------ no Ray needed
def test_window_groups_by_lora_set_and_stays_bounded():
    a, b = (("a.safetensors", 1.0),), (("b.safetensors", 0.5),)
    pulled = []

    def stream():
        for i in range(12):
            pulled.append(i)
            yield Job(line=i + 1, index=0, params=_params(seed=i), loras=(a, b, ())[i % 3])

    w = _Window(stream(), size=6)
    first = w.take(None)
    assert first.line == 1 and len(pulled) == 6  # at most the window's size pulled ahead
    got = [w.take(a) for _ in range(3)]  # a worker keeps its LoRA set while the window holds one of it,
    assert [j.line for j in got] == [4, 7, 2]  # then takes the oldest set waiting (b; line 10 is not pulled yet)
    assert len(pulled) == 9  # never more than the window ahead of what was taken
    w.put_back(got[-1])  # a job whose worker died comes back first in its set
    assert w.take(()).line == 3 and w.take(b).line == 2
    rest = []
    while not w.empty():
        rest.append(w.take(b).line)
    assert rest == [5, 8, 11, 6, 9, 12, 10] and w.take(None) is None  # set b drained before switching


def test_workers_take_over_their_own_unrecorded_files_and_never_touch_others(tmp_path):
    job = Job(line=3, index=0, params=_params(number_of_images=2, output_format="png"))
    png = [b"\x89PNG\r\n\x1a\n" + bytes([i]) * 40 for i in range(2)]
    stranger = tmp_path / f"{job.stem}_01.png"
    stranger.write_bytes(b"\x89PNG\r\n\x1a\nsomeone else's image")
    first = write_files(tmp_path, job, png)  # image 0 under its name, image 1 beside the stranger's file
    assert first == [f"{job.stem}_00.png", f"{job.stem}_01_1.png"]
    assert stranger.read_bytes().endswith(b"someone else's image")
    again = write_files(tmp_path, job, png)  # a retry after a worker or driver died: the same files, no copies
    assert again == first and len(list(tmp_path.iterdir())) == 3
    other = Job(line=4, index=0, params=_params(number_of_images=2, output_format="png", prompt="x"), name=job.stem)
    assert write_files(tmp_path, other, [png[0][:-1] + b"\x07"])[0] != first[0]  # other bytes: a free name


def test_without_ray_the_command_says_how_to_install_it(tmp_path, tiny_models):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 2)
    argv = ["batch", str(jobs), "--out", str(tmp_path / "out"), "--backend", "ray", "--checkpoint",
            str(tiny_models["diffusers"]["checkpoint"])]
    code = f"import sys; sys.modules['ray'] = None; from aura_flow.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "comfyui-auraflow[ray]"' in proc.stderr and 'pip install ".[ray]"' in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "manifest.jsonl").exists()


def test_bad_ray_flags_are_refused_before_anything_runs(tmp_path, tiny_models, capsys):
    from aura_flow.cli import main

    jobs = write_jobs(tmp_path / "jobs.jsonl", 1)
    ck = str(tiny_models["diffusers"]["checkpoint"])
    base = ["batch", str(jobs), "--out", str(tmp_path / "out"), "--checkpoint", ck]
    for flags, said in ((["--backend", "ray", "--workers", "0"], "--workers=0 is out of range; allowed: 1 to"),
                        (["--backend", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker=-1.0 is out of range"),
                        (["--backend", "ray", "--ray-address", "nowhere"], "--ray-address='nowhere' is not a Ray "
                                                                           "address; give local, auto, HOST:PORT"),
                        (["--workers", "2"], "--workers is a flag of --backend ray, not of --backend local")):
        assert main(base + flags) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing made, no Ray started


# ------------------------------------------------------------------ a real local Ray
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, object_store_memory=200 * 2**20,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from lora_files import write_lora

    return write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors")


def _run(jobs, out, backend="ray", **options):
    from aura_flow.batch import run

    return run(jobs, out, backend=backend, progress=False, **options)


@pytest.mark.heavy
def test_ray_images_are_the_local_backends_bytes_written_or_collected(ray_session, tiny_models, lora_file,
                                                                     tmp_path):
    ck = str(tiny_models["diffusers"]["checkpoint"])
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5, lora=lora_file, number_of_images=2)
    local = _run(jobs, tmp_path / "local", backend="local", checkpoint=ck, device="cpu")
    import torch

    be = RayBackend(ck, device="cpu", workers=2)
    be.check()  # CPU workers run torch with the threads this process has (a CPU's sums depend on the count)
    assert [s.threads for s in be.slots] == [torch.get_num_threads()] * 2
    shared = _run(jobs, tmp_path / "shared", backend=be)
    collected = _run(jobs, tmp_path / "collect", checkpoint=ck, device="cpu", workers=2, collect=True)
    assert local.done == shared.done == collected.done == 5 and shared.images == collected.images == 10
    want = check_exactly_once(tmp_path / "local", 5, 2)
    assert check_exactly_once(tmp_path / "shared", 5, 2) == want  # same names, same bytes
    assert check_exactly_once(tmp_path / "collect", 5, 2) == want
    for folder in ("shared", "collect"):
        lines = manifest(tmp_path / folder)
        assert {r["backend"] for r in lines} == {"ray"} and len({r["worker"] for r in lines}) == 2
    again = _run(jobs, tmp_path / "shared", checkpoint=ck, device="cpu", workers=2)  # nothing left to do
    assert again.done == 0 and again.skipped_done == 5 and images(tmp_path / "shared") == want


@pytest.mark.heavy
def test_a_worker_that_cannot_read_the_model_stops_the_run_before_any_job(ray_session, tmp_path):
    from aura_flow.errors import LoadError

    (tmp_path / "model").mkdir()  # here for the driver, but no model in it for the workers
    jobs = write_jobs(tmp_path / "jobs.jsonl", 2)
    with pytest.raises(LoadError, match="storage every node can read"):
        _run(jobs, tmp_path / "out", checkpoint=str(tmp_path / "model"), device="cpu", workers=1)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()  # no job ran, none was recorded


@pytest.mark.heavy
def test_a_killed_worker_loses_no_job_and_repeats_none(ray_session, tiny_models, tmp_path):
    ck = str(tiny_models["diffusers"]["checkpoint"])
    n = 10
    jobs = write_jobs(tmp_path / "jobs.jsonl", n, steps=6)
    out = tmp_path / "out"
    be = RayBackend(ck, device="cpu", workers=2)
    result, kills = {}, []
    runner = threading.Thread(target=lambda: result.update(summary=_run(jobs, out, backend=be)))
    runner.start()

    def done_lines():
        try:
            return sum(r["status"] == "done" for r in manifest(out))
        except FileNotFoundError:
            return 0

    deadline = time.monotonic() + 240
    while runner.is_alive() and time.monotonic() < deadline:
        if not kills and done_lines() >= 2:  # one worker dies: Ray restarts it and retries its jobs
            ray_session.kill(be.slots[0].handle, no_restart=False)
            kills.append(done_lines())
        elif len(kills) == 1 and done_lines() >= kills[0] + 2:  # the other dies for good: the driver resends
            ray_session.kill(be.slots[1].handle, no_restart=True)
            kills.append(done_lines())
        time.sleep(0.05)
    runner.join(60)
    assert not runner.is_alive() and len(kills) == 2 and kills[-1] < n, kills
    assert result["summary"].done == n and result["summary"].failed == 0
    check_exactly_once(out, n)


def _ray_pids(marker: str) -> list[int]:
    """The processes a killed driver left behind (its raylet, workers, agents): those whose environment holds its
    own RAY_TMPDIR or which hold a file open under it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            mine = f"RAY_TMPDIR={marker}".encode() in (entry / "environ").read_bytes().split(b"\0")
            mine = mine or any(os.readlink(fd).startswith(marker + "/") for fd in (entry / "fd").iterdir())
        except OSError:
            continue
        if mine:
            pids.append(int(entry.name))
    return pids


def _end(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.heavy
def test_a_killed_driver_is_resumed_by_running_the_command_again(tiny_models, tmp_path):
    pytest.importorskip("ray")
    n = 8
    jobs = write_jobs(tmp_path / "jobs.jsonl", n, steps=6)
    out = tmp_path / "out"
    cmd = [PY, "-m", "aura_flow", "batch", str(jobs), "--out", str(out), "--backend", "ray", "--ray-address",
           "local", "--workers", "2", "--checkpoint", str(tiny_models["diffusers"]["checkpoint"]), "--device", "cpu"]
    temp = tempfile.mkdtemp(prefix="rayd", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": temp}
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "manifest.jsonl").exists() and sum(r["status"] == "done" for r in manifest(out)) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
        proc.stderr.close()
        first = [r for r in manifest(out) if r["status"] == "done"]
        assert 2 <= len(first) < n
        _end(_ray_pids(temp))  # the killed driver's Ray (its raylet, workers, agents)
        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"done {n - len(first)}, failed 0" in again.stderr
        check_exactly_once(out, n)
    finally:
        time.sleep(1)  # a normal ray.shutdown's agents end by themselves; what is left is ended here
        _end(_ray_pids(temp))
        shutil.rmtree(temp, ignore_errors=True)
