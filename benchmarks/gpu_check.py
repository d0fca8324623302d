"""The GPU check (issue 23): the real model's shapes on a lent GPU, in one command that fits the lease.

    python -m benchmarks.gpu_check --out DIR        # the H200: full preset, 1024^2, 25 steps, cfg 5, uni_pc, bf16
    python -m benchmarks.gpu_check --out DIR --preset wide --steps 4 --repeats 1 --budget 150      # the smoke run
    python -m benchmarks.gpu_check --out DIR --device cpu --preset wide --steps 2 --size 256 --repeats 1  # CI

Rows (benchmarks/README.md, "GPU", says what each means):
  1. build the preset with random weights on the device, save it once as a diffusers folder, time `aura_flow.load`;
  2. the pack against diffusers' AuraFlowPipeline on the same weights and start noise: seconds per image (median
     after a warm-up), peak memory, PSNR, the compute floor, and the GPU-noise image against diffusers' own;
  3. fp8_e4m3fn storage and a GGUF Q8_0 transformer quantized in the run, against bf16;
  4. a small GPU (torch.cuda.set_per_process_memory_fraction, in a subprocess): what the engine does in 12 GiB;
  5. the test suite's CUDA-only tests (pytest in a subprocess).
Rows run in the order 1, 2, 3, 5, 4 under a time budget (--budget): a row that would not fit is recorded as
skipped with the reason, a row that fails records its error and the next one runs, and DIR/gpu_check.json and
DIR/gpu_check.txt (the table) are rewritten after every step, so a run cut short still returns what it measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_report import environment, table  # noqa: E402

ROWS = {1: "build_load", 2: "pack_vs_diffusers", 3: "fp8_gguf", 4: "small_gpu", 5: "cuda_tests"}
ORDER = (1, 2, 3, 5, 4)  # the small GPU last: the most device time for the least new information


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.txt")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the dry run)")
    ap.add_argument("--preset", default="full", choices=("tiny", "medium", "wide", "full"))
    ap.add_argument("--size", type=int, default=1024, help="image width and height")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--sampler", default="uni_pc", help="the pack's sampler for its own timed row (the comparison "
                                                        "with diffusers uses euler, the only sampler both have)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--repeats", type=int, default=3, help="timed images per contender after the warm-up (median)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check; rows that would not "
                                                                "fit are skipped")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/aura_flow_gpu_check"),
                    help="local disk for the built model and the GGUF (reused when present)")
    ap.add_argument("--small-gib", type=float, default=12.0, help="row 4's memory cap in GiB")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="the device's bf16 rate for the compute floor")
    ap.add_argument("--rows", default="1,2,3,4,5", help="rows to run (comma-separated numbers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="a photo of a cat sitting on a mat, watercolor painting")
    ap.add_argument("--negative-prompt", default="blurry")
    args = ap.parse_args(argv)
    for name, value, low in (("--size", args.size, 64), ("--steps", args.steps, 1), ("--repeats", args.repeats, 1),
                             ("--budget", args.budget, 10), ("--small-gib", args.small_gib, 1)):
        if value < low:
            ap.error(f"{name}={value}: give at least {low}")
    if args.size % 16:
        ap.error(f"--size={args.size}: give a multiple of 16 (the latent's patches)")
    try:
        args.rows = sorted({int(r) for r in args.rows.split(",") if r.strip()})
    except ValueError:
        ap.error(f"--rows={args.rows!r}: give row numbers 1-5, comma-separated")
    if not args.rows or any(r not in ROWS for r in args.rows):
        ap.error(f"--rows={','.join(map(str, args.rows))}: give row numbers 1-5, comma-separated")
    return args


class Check:
    """The run's state: the budget, the result (rewritten to disk after every step) and what rows hand on."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.state: dict = {}  # what a row hands to the next: root, pipe, load and image seconds, reference image
        args.out.mkdir(parents=True, exist_ok=True)
        self.result = {"check": "gpu_check", "issue": 23, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "argv": sys.argv[1:], "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(args).items()},
                       "env": {}, "rows": {}, "budget_seconds": args.budget}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def log(self, message: str) -> None:
        sys.stdout.write(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {message}\n")
        sys.stdout.flush()

    def save(self) -> None:
        self.result["elapsed_seconds"] = round(self.elapsed(), 1)
        for name, text in (("gpu_check.json", json.dumps(self.result, indent=2, default=str)),
                           ("gpu_check.txt", table(self.result))):
            part = self.args.out / (name + ".part")
            part.write_text(text + "\n")
            os.replace(part, self.args.out / name)

    @property
    def cuda(self) -> bool:
        return self.args.device.startswith("cuda")

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def run_row(self, number: int, fn, estimate: float) -> None:
        key = f"{number}_{ROWS[number]}"
        row = self.result["rows"][key] = {"status": "running"}
        if number != 1 and number != 5 and "root" not in self.state:
            row.update(status="skipped", reason="needs row 1's model, which was not built or loaded")
        elif self.left() < estimate:
            row.update(status="skipped", reason=f"budget: {self.left():.0f}s left, the row needs about "
                                                f"{estimate:.0f}s")
        if row["status"] == "skipped":
            self.log(f"row {number} skipped: {row['reason']}")
            self.save()
            return
        self.log(f"row {number} ({ROWS[number]}) starts; {self.left():.0f}s of the budget left, estimate "
                 f"{estimate:.0f}s")
        t0 = time.monotonic()
        try:
            fn(self, row)
            if row["status"] == "running":
                row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001  (recorded; the next row runs)
            row["status"] = "error"
            row["error"] = f"{exc.__class__.__name__}: {str(exc)[:1500]}"
            row["traceback"] = traceback.format_exc()[-3000:]
            self.log(f"row {number} failed: {row['error'][:300]}")
        finally:
            row["seconds"] = round(time.monotonic() - t0, 1)
            self.free()
            self.save()
        self.log(f"row {number} {row['status']} in {row['seconds']}s")


def main(argv=None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    ck = Check(args)
    ck.log(f"GPU check: {args.preset} preset, {args.size}x{args.size}, {args.steps} steps, cfg {args.cfg:g}, "
           f"{args.dtype} on {args.device}; budget {args.budget:.0f}s; out {args.out}")
    try:
        ck.result["env"] = environment(args)
    except Exception as exc:  # noqa: BLE001
        ck.result["env"] = {"error": f"{exc.__class__.__name__}: {exc}"}
    ck.log("environment: " + json.dumps({k: v for k, v in ck.result["env"].items() if k != "command"}))
    ck.save()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from benchmarks import gpu_rows

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    for number in ORDER:
        if number in args.rows:
            fn, estimate = gpu_rows.ROW_FUNCTIONS[number], gpu_rows.estimate(ck, number)
            ck.run_row(number, fn, estimate)
    ck.state.clear()
    ck.free()
    ck.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ck.save()
    text = table(ck.result)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0 if all(r["status"] in ("ok", "skipped") for r in ck.result["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
