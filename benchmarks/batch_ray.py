"""The Ray batch backend against the local one: per-image overhead and images per minute against the worker count.

    python -m benchmarks.batch_ray                          # wide preset, 512^2, 2 steps, 6 jobs; local, ray x1, x2
    python -m benchmarks.batch_ray --preset tiny --size 64 --jobs 4 --workers 1 --json out.json

It builds a random-weight AuraFlow of the preset once (the cache of benchmarks.run), writes a job file of --jobs
jobs (distinct prompts and seeds), and runs it with ``aura_flow.batch.run`` into a fresh folder: once with the local
backend, then with the Ray backend (Ray started once in this process, ``--ray-address local``'s way) for each
--workers count. The file holds --jobs jobs more than the most workers; a run is timed from the moment each of its
workers has recorded its first job (model loaded, first run warm: the local backend has one "worker") to the last
job recorded: what a long batch pays per image, not the start-up, which shows in the run's whole wall time. The Ray rows check that their images are the local row's bytes. A CPU worker runs
torch on every core of its node, as the local backend does (the bytes depend on the thread count), so on one
machine two workers share its cores and cannot beat one; on a cluster each worker has its own node or GPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.measure import machine  # noqa: E402
from benchmarks.run import build_model  # noqa: E402


def timed_run(jobs, out, backend, warm: int, **options) -> dict:
    """One batch run of one-image jobs, timed from the ``warm``-th job recorded (each worker's first job warms it
    up) to the last: seconds per image in the steady state; the whole wall time apart."""
    from aura_flow.batch import run
    from aura_flow.batch.progress import Silent

    class Clock(Silent):
        def __init__(self):
            super().__init__()
            self.times = []

        def finished(self, job, ok, images=0):
            super().finished(job, ok, images)
            self.times.append(time.perf_counter())

    clock = Clock()
    t0 = time.perf_counter()
    summary = run(jobs, out, backend=backend, progress=clock, **options)
    wall = time.perf_counter() - t0
    if summary.failed or len(clock.times) <= warm:
        raise SystemExit(f"{backend}: {summary.lines()}")
    seconds, images = clock.times[-1] - clock.times[warm - 1], len(clock.times) - warm
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(out).iterdir()
              if p.name != "manifest.jsonl"}
    return {"images_timed": images, "seconds": round(seconds, 3), "seconds_per_image": round(seconds / images, 3),
            "images_per_minute": round(images * 60.0 / seconds, 2), "wall_seconds": round(wall, 2),
            "hashes": hashes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wide", help="model size (aura_flow.tiny.PRESETS)")
    ap.add_argument("--size", type=int, default=512, help="image width and height")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=6, help="jobs timed (one image each); each worker's first job "
                                                        "before them warms it up")
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to run, comma-separated")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aura_flow_bench")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)

    import ray

    counts = [int(x) for x in args.workers.split(",")]
    root = build_model(args.preset, args.cache)
    work = Path(tempfile.mkdtemp(prefix="batch_ray_bench"))
    jobs = work / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": f"a lighthouse on a cliff, study {i}", "seed": 1000 + i})
                            + "\n" for i in range(args.jobs + max(counts))))
    defaults = {"width": args.size, "height": args.size, "steps": args.steps}
    from aura_flow.params import DEFAULTS

    defaults = {**DEFAULTS, **defaults}
    model = {"checkpoint": str(root), "device": "cpu"}
    rows = {"local": timed_run(jobs, work / "local", "local", 1, defaults=defaults, **model)}
    ray_temp = tempfile.mkdtemp(prefix="rayb", dir="/tmp")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=ray_temp, log_to_driver=False,
             object_store_memory=256 * 2**20, configure_logging=False)
    try:
        for n in counts:
            rows[f"ray x{n}"] = row = timed_run(jobs, work / f"ray{n}", "ray", n, defaults=defaults, workers=n,
                                                 **model)
            row["same_bytes_as_local"] = row["hashes"] == rows["local"]["hashes"]
    finally:
        ray.shutdown()
        shutil.rmtree(ray_temp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    base = rows["local"]["seconds_per_image"]
    print(f"{args.preset} preset, {args.size}x{args.size}, {args.steps} steps, {args.jobs} jobs, "
          f"{os.cpu_count()} cores")
    print(f"{'backend':10} {'s/image':>8} {'img/min':>8} {'overhead':>9} {'wall s':>7}  same bytes")
    for name, row in rows.items():
        over = row["seconds_per_image"] / base - 1
        print(f"{name:10} {row['seconds_per_image']:8.2f} {row['images_per_minute']:8.2f} {over:+9.1%} "
              f"{row['wall_seconds']:7.1f}  {row.get('same_bytes_as_local', '-')}")
        row["overhead_vs_local"] = round(over, 4)
        row.pop("hashes")
    result = {"preset": args.preset, "size": args.size, "steps": args.steps, "jobs": args.jobs,
              "machine": machine(), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    bad = [name for name, row in rows.items() if row.get("same_bytes_as_local") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
