"""Row 4 of the GPU check, in its own interpreter: the engine on a small GPU, simulated by capping this process's
CUDA allocator (`torch.cuda.set_per_process_memory_fraction`) at the spec's ``cap_gib``.

It tries what a user with such a card would: first the spec's dtype (bf16) the way `aura_flow.load` does it by
default (offload_text_encoder "auto"), then, if that fails, fp8_e4m3fn storage with the text encoder waiting on the
CPU. Each attempt: load, one warm-up image (CUDA only), one timed image, the allocator's peak; or the error it met (an
out-of-memory error is an answer here, not a crash). Prints one JSON line: ``{"attempts": [...]}``. Progress goes
to stderr. With ``"all": true`` (the CPU dry run, where nothing caps the memory) every attempt runs.
"""
from __future__ import annotations

import gc
import json
import sys
import time

GIB = 2**30


def _log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] small GPU: {message}\n")
    sys.stderr.flush()


def attempt(spec: dict, dtype: str, offload) -> dict:
    import torch

    import aura_flow

    cuda = spec["device"].startswith("cuda")
    out = {"dtype": dtype, "offload_text_encoder": offload}
    pipe = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        pipe = aura_flow.load(spec["root"], device=spec["device"], dtype=dtype, offload_text_encoder=offload)
        out["load_seconds"] = round(time.perf_counter() - t0, 2)
        out["text_encoder_waits_on_cpu"] = bool(pipe.offload_text_encoder)
        if cuda:
            out["allocated_after_load_bytes"] = torch.cuda.memory_allocated()
        params = dict(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], width=spec["size"],
                      height=spec["size"], steps=spec["steps"], cfg=spec["cfg"], seed=spec["seed"],
                      sampler=spec["sampler"])
        if cuda:  # the CPU dry run only shows that the code runs: no warm-up there
            _log(f"{dtype}: loaded in {out['load_seconds']}s; warm-up image")
            pipe.generate(**params)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        pipe.generate(**params)
        if cuda:
            torch.cuda.synchronize()
            out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["seconds_per_image"] = round(time.perf_counter() - t0, 3)
        out["ok"] = True
        _log(f"{dtype}: {out['seconds_per_image']}s an image")
    except Exception as exc:  # noqa: BLE001  (what the engine says when it does not fit is the answer)
        out["ok"] = False
        out["error"] = f"{exc.__class__.__name__}: {str(exc)[:600]}"
        if cuda:
            out["peak_bytes"] = torch.cuda.max_memory_allocated()
        _log(f"{dtype}: {out['error'][:200]}")
    finally:
        del pipe
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def main() -> None:
    import torch

    spec = json.loads(sys.argv[1])
    if spec["device"].startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * GIB / total))
        _log(f"allocator capped at {spec['cap_gib']:g} GiB of {total / GIB:.0f}")
    attempts = []
    for dtype, offload in ((spec["dtype"], "auto"), ("fp8_e4m3fn", True)):
        attempts.append(attempt(spec, dtype, offload))
        if attempts[-1]["ok"] and not spec.get("all"):
            break
    sys.stdout.write(json.dumps({"attempts": attempts}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
