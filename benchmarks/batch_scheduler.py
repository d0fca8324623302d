"""The ComfyUI batch backend's scheduler against 1, 2 and 4 stand-in ComfyUI servers (tests/comfyui_standin.py, real
HTTP servers on 127.0.0.1, one prompt at a time each) with a fixed service time: jobs per second, and the ratio to
servers x one server's measured throughput (the goal is at least 0.9: the scheduler keeps every server busy).

    python -m benchmarks.batch_scheduler [--service 0.2] [--jobs-per-server 25] [--per-server 2] [--servers 1,2,4]

The backend runs with its default polling; its sink only counts. Not a timed test: the numbers are printed.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time

from benchmarks.measure import REPO

sys.path.insert(0, str(REPO / "tests"))

from comfyui_standin import StandIn  # noqa: E402

from aura_flow.batch.comfyui import ComfyUIBackend  # noqa: E402
from aura_flow.batch.model import Job  # noqa: E402
from aura_flow.params import DEFAULTS  # noqa: E402


class CountingSink:
    def __init__(self):
        self.lock, self.n_done, self.n_failed = threading.Lock(), 0, 0

    def started(self, job, where):
        pass

    def done(self, job, images=None, *, files=None, where, seconds, extra=None):
        with self.lock:
            self.n_done += 1
        return []

    def failed(self, job, error, *, where, seconds):
        with self.lock:
            self.n_failed += 1


def measure(servers: int, service: float, jobs_per_server: int, per_server: int) -> dict:
    n = servers * jobs_per_server
    jobs = (Job(line=i + 1, index=0, params={**DEFAULTS, "prompt": f"bench {servers} {i}", "seed": i,
                                             "output_format": "png"}) for i in range(n))
    with contextlib.ExitStack() as stack:
        stand_ins = [stack.enter_context(StandIn(service)) for _ in range(servers)]
        backend = ComfyUIBackend([s.url for s in stand_ins], per_server=per_server, request_timeout=10)
        backend.check()
        sink = CountingSink()
        t0 = time.perf_counter()
        backend.run(jobs, sink, threading.Event())
        wall = time.perf_counter() - t0
        ran = [len(s.completed) for s in stand_ins]
    if sink.n_done != n or sink.n_failed:
        raise SystemExit(f"{servers} servers: {sink.n_done} done, {sink.n_failed} failed of {n}")
    return {"servers": servers, "jobs": n, "seconds": wall, "jobs_per_s": n / wall, "per_server_jobs": ran}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--service", type=float, default=0.2, help="seconds each stand-in takes per prompt")
    p.add_argument("--jobs-per-server", type=int, default=25)
    p.add_argument("--per-server", type=int, default=2, help="the backend's --per-server")
    p.add_argument("--servers", default="1,2,4", help="server counts, comma-separated")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.servers.split(",")]
    rows = [measure(c, args.service, args.jobs_per_server, args.per_server) for c in counts]
    one = next((r["jobs_per_s"] for r in rows if r["servers"] == 1), None) or \
        measure(1, args.service, args.jobs_per_server, args.per_server)["jobs_per_s"]
    print(f"service {args.service:g} s per prompt, {args.jobs_per_server} jobs per server, --per-server "
          f"{args.per_server}; ideal one server: {1 / args.service:.2f} jobs/s, measured: {one:.2f} jobs/s")
    print(f"{'servers':>7} {'jobs':>5} {'seconds':>8} {'jobs/s':>7} {'vs servers x one':>17} {'vs ideal':>9}  "
          "jobs per server")
    worst = 1.0
    for r in rows:
        ratio = r["jobs_per_s"] / (r["servers"] * one)
        worst = min(worst, ratio)
        ideal = r["jobs_per_s"] * args.service / r["servers"]
        print(f"{r['servers']:>7} {r['jobs']:>5} {r['seconds']:>8.2f} {r['jobs_per_s']:>7.2f} {ratio:>17.3f} "
              f"{ideal:>9.3f}  {r['per_server_jobs']}")
    print(f"worst ratio {worst:.3f} (goal >= 0.9): {'met' if worst >= 0.9 else 'NOT met'}")
    return 0 if worst >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
