"""The ``ray`` batch backend joining a REAL Ray cluster that the test starts with the ``ray`` CLI (``ray start --head``
on 127.0.0.1, 2 CPUs, token auth with its own token): ``--ray-address HOST:PORT``, ``auto`` with ``RAY_ADDRESS``, Ray
Client ``ray://`` with ``--collect``, and the cluster's head killed mid-run, then started again and the command rerun.

The command runs in a subprocess from a folder that is not the checkout, and the cluster's processes do not have the
checkout on their path: the workers import the pack only because the driver sends its ``aura_flow`` to the cluster.

Scope: the cluster runs with its own ``--temp-dir`` and free ports, and is stopped by ending exactly its own
processes (each carries a marker variable in its environment); ``ray stop --force`` would end every Ray on the
machine, other tests' included. Ray rewrites 127.0.0.1 to the machine's network address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which keeps every Ray socket on 127.0.0.1 (and refuses a second node: these
tests use one node with two worker actors, in the cluster's own raylet, not the driver's process)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_batch_ray import check_exactly_once, manifest, write_jobs

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RAY_CLI = Path(sys.executable).with_name("ray")
MARK = "AURAFLOW_TEST_RAY_CLUSTER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One Ray head node on 127.0.0.1 started with ``ray start``; `stop` ends every process it started."""

    def __init__(self):
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        self.temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port, self.client_port = _free_port(), _free_port()
        token = Path(self.temp) / "token"
        token.write_text(generate_new_authentication_token())
        self.auth = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                     "RAY_AUTH_TOKEN_PATH": str(token)}
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
        self.env = {**base, **self.auth, MARK: self.temp}  # the cluster's Python: no checkout on its path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [str(RAY_CLI), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--ray-client-server-port={self.client_port}", "--num-cpus=2", "--include-dashboard=false",
               "--disable-usage-stats", f"--temp-dir={self.temp}", f"--dashboard-port={_free_port()}",
               f"--dashboard-agent-listen-port={_free_port()}", "--object-store-memory=200000000"]
        proc = subprocess.run(cmd, env=self.env, cwd=self.temp, capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def pids(self) -> list[int]:
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if f"{MARK}={self.temp}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    out.append(int(entry.name))
            except OSError:
                continue
        return out

    def stop(self) -> None:
        """Every process of this cluster killed (SIGKILL, as ``ray stop --force``), and waited for."""
        deadline = time.monotonic() + 30
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)  # a zombie's environ is unreadable: it drops out of pids()
        assert not self.pids()

    def driver_env(self, **more) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        return {**env, **self.auth, "PYTHONPATH": str(ROOT), **more}


@pytest.fixture
def cluster():
    pytest.importorskip("ray")
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.temp, ignore_errors=True)


def _cmd(jobs, out, address, ck, *more) -> list[str]:
    return [PY, "-m", "aura_flow", "batch", str(jobs), "--out", str(out), "--backend", "ray", "--ray-address",
            address, "--workers", "2", "--checkpoint", ck, "--device", "cpu", *more]


def _local(jobs, out, ck, per_job=1) -> dict:
    from aura_flow.batch import run

    assert run(jobs, out, backend="local", progress=False, checkpoint=ck, device="cpu").done > 0
    return check_exactly_once(out, len(Path(jobs).read_text().splitlines()), per_job)


def _check_run(proc, cluster, out, n, want, per_job=1) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"done {n}, failed 0" in proc.stderr and "Traceback" not in proc.stderr
    assert check_exactly_once(out, n, per_job) == want  # same names, the local backend's bytes
    lines = manifest(out)
    assert len(lines) == n and {r["backend"] for r in lines} == {"ray"}
    assert len({r["worker"] for r in lines}) == 2  # host:pid/device of each worker actor
    code = [x for x in proc.stderr.splitlines() if "their aura_flow:" in x]
    assert code and code[0].endswith("/aura_flow") and f"their aura_flow: {cluster.temp}/" in code[0], code
    # the driver's package, unpacked in the cluster's session: the workers are the cluster's processes


@pytest.mark.heavy
def test_joining_a_cluster_by_address_and_by_auto_gives_the_local_bytes(cluster, tiny_models, tmp_path):
    ck = str(tiny_models["diffusers"]["checkpoint"])
    n = 4
    jobs = write_jobs(tmp_path / "jobs.jsonl", n, number_of_images=2)  # two workers, two jobs each
    want = _local(jobs, tmp_path / "local", ck, 2)
    for address, env, out in ((cluster.address, cluster.driver_env(), tmp_path / "by_address"),
                              ("auto", cluster.driver_env(RAY_ADDRESS=cluster.address), tmp_path / "auto")):
        proc = subprocess.run(_cmd(jobs, out, address, ck), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        _check_run(proc, cluster, out, n, want, 2)


@pytest.mark.heavy
def test_ray_client_with_collect_gives_the_local_bytes(cluster, tiny_models, tmp_path):
    pytest.importorskip("grpc", reason='Ray Client needs grpcio: pip install "ray[client]"')
    ck = str(tiny_models["diffusers"]["checkpoint"])
    n = 4
    jobs = write_jobs(tmp_path / "jobs.jsonl", n)
    want = _local(jobs, tmp_path / "local", ck)
    out = tmp_path / "collected"
    proc = subprocess.run(_cmd(jobs, out, f"ray://127.0.0.1:{cluster.client_port}", ck, "--collect"),
                          cwd=tmp_path, env=cluster.driver_env(), capture_output=True, text=True, timeout=120)
    _check_run(proc, cluster, out, n, want)


@pytest.mark.heavy
def test_the_cluster_killed_mid_run_is_said_and_the_rerun_does_the_rest(cluster, tiny_models, tmp_path):
    ck = str(tiny_models["diffusers"]["checkpoint"])
    n = 6  # two workers, two jobs in flight each: four in flight when the second is done
    jobs = write_jobs(tmp_path / "jobs.jsonl", n, steps=4)
    out = tmp_path / "out"
    cmd = _cmd(jobs, out, cluster.address, ck)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cluster.driver_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "manifest.jsonl").exists() and sum(r["status"] == "done" for r in manifest(out)) >= 2:
                cluster.stop()  # the head (the only node) dies with the jobs in flight
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-3000:]
    said = [x for x in err.splitlines() if x.startswith("error: ")]
    assert said and "the Ray cluster stopped answering at 127.0.0.1:" in said[0], err[-3000:]
    assert "Start the cluster again and run the same command" in said[0] and "Traceback" not in err
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]  # every line whole
    done = [r["job"] for r in lines if r["status"] == "done"]
    assert 2 <= len(done) < n and len(set(done)) == len(done) and len(lines) == len(done), lines  # none failed
    cluster.start()  # again, on the same port
    again = subprocess.run(cmd, cwd=tmp_path, env=cluster.driver_env(), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"done {n - len(done)}, failed 0" in again.stderr and f"already done {len(done)}" in again.stderr
    check_exactly_once(out, n)


def test_an_address_where_no_cluster_answers_is_said_at_once(tiny_models, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    from ray._private.services import canonicalize_bootstrap_address

    from aura_flow.cli import main

    ck = str(tiny_models["diffusers"]["checkpoint"])
    jobs = write_jobs(tmp_path / "jobs.jsonl", 1)
    port = _free_port()  # nothing listens there
    tried = canonicalize_bootstrap_address(f"127.0.0.1:{port}")  # Ray's rewrite of a loopback host, if it makes one
    for address, env in ((f"127.0.0.1:{port}", None), ("auto", f"127.0.0.1:{port}"),
                         (f"ray://127.0.0.1:{port}", None)):
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)
        else:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        t0 = time.monotonic()
        assert main(_cmd(jobs, tmp_path / "out", address, ck)[3:]) == 3  # the batch command's argv
        err = capsys.readouterr().err
        at = f"127.0.0.1:{port}" if address.startswith("ray://") else tried
        assert err.startswith(f"error: --ray-address={address}: no Ray cluster answers at {at}"), err
        assert time.monotonic() - t0 < 20  # Ray alone would wait forever
        if at != f"127.0.0.1:{port}":
            assert "it replaces a loopback address with this machine's" in err
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_ray_client_without_grpcio_says_how_to_install_it(tiny_models, tmp_path):
    pytest.importorskip("ray")
    jobs = write_jobs(tmp_path / "jobs.jsonl", 1)
    with socket.socket() as listener:  # something answers at the address: the check after the probe is the one met
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        argv = ["batch", str(jobs), "--out", str(tmp_path / "out"), "--backend", "ray", "--ray-address",
                f"ray://127.0.0.1:{listener.getsockname()[1]}", "--checkpoint",
                str(tiny_models["diffusers"]["checkpoint"])]
        code = f"import sys; sys.modules['grpc'] = None; from aura_flow.cli import main; sys.exit(main({argv!r}))"
        proc = subprocess.run([PY, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Ray Client (ray://) needs grpcio, which is not installed; pip install \"ray[client]\"" in proc.stderr
    assert proc.stderr.startswith(f"error: --ray-address={argv[7]}") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
