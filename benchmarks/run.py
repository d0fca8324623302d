"""Side-by-side benchmark: the pack against diffusers' AuraFlowPipeline (and ComfyUI) on the same random weights.

    python -m benchmarks.run                            # wide preset (AuraFlow's real widths), 512^2 and 1024^2
    python -m benchmarks.run --preset wide --size 512 --gguf Q8_0,Q4_0
    python -m benchmarks.run --preset tiny --size 64 --steps 2 --repeats 1 --json out.json
    /path/to/comfy-venv/bin/python -m benchmarks.run --comfyui /path/to/ComfyUI

It builds a random-weight AuraFlow of the preset's size (cached under --cache), generates the same image with
each contender in one process (same weights, prompt, start noise, euler/normal, steps, cfg), checks that the
decoded images agree, and prints a table per size, the sizes side by side, and a JSON object: seconds per image
and per step, the ratio to diffusers, how noisy the runs were (spread of the repeats, other work on the machine
in CPU cores), peak memory (RSS on CPU, allocated on GPU), load time and load peak against the weight bytes, the
pack's import time, and for each opt-in speed mode (aura_flow.pipeline.speed) its speed-up and PSNR against the exact
image. Contenders: `pack` (generate's default speed, "auto"), `pack[exact]` (speed=None, the reference image),
`diffusers`, `pack[MODE]` for each --modes entry, and `comfyui` with --comfyui. --gguf adds the GGUF rows
(benchmarks/gguf_rows.py), each in its own interpreter.
Each contender is warmed up first; then the runs alternate for --repeats rounds and the best and the median
are reported (the ratio uses the best, the least disturbed by other work on the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.measure import load_diffusers, machine, run_probe, torch_dtype, weight_bytes  # noqa: E402
from benchmarks.report import report  # noqa: E402
from benchmarks.side_by_side import run_size  # noqa: E402

# per preset: (sizes, steps, modes) when not given
DEFAULTS = {"tiny": ("64", 2, None), "medium": ("256", 16, None), "wide": ("512,1024", 2, ""),
            "full": ("1024", 25, "")}


def build_model(preset: str, cache: Path) -> Path:
    """The diffusers-layout folder of a random-weight AuraFlow of ``preset``, built once into ``cache``."""
    from aura_flow.tiny import build_tiny

    folder = cache / f"{preset}-seed0"
    root = folder / "diffusers"
    if not (root / "model_index.json").exists():  # written last by build_tiny
        t0 = time.perf_counter()
        build_tiny(folder, "diffusers", preset=preset)
        print(f"built the {preset} model in {time.perf_counter() - t0:.1f}s: {root}", flush=True)
    return root


# ---------------------------------------------------------------- the whole benchmark
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wide", choices=tuple(DEFAULTS),
                    help="model size (aura_flow.tiny.PRESETS): wide (default) has AuraFlow's real widths and one block "
                         "of each kind; medium is a small toy; full is the real 6.8B shape (needs ~40 GB)")
    ap.add_argument("--size", default=None,
                    help="image width and height in pixels, or several comma-separated (wide: 512,1024; medium: 256)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (wide: 2; medium: 16; full: 25)")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="a photo of a cat sitting on a mat, watercolor painting")
    ap.add_argument("--negative-prompt", default="blurry")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed rounds after the warm-up")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                    help="the transformer's and text encoder's dtype in both pipelines (auto: fp32 on the CPU, bf16 "
                         "on CUDA, as the pack's loader); the VAE runs in fp32 in both")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--modes", default=None,
                    help="comma-separated aura_flow.pipeline.speed modes to measure ('' for none; default for tiny and "
                         "medium cfg_cutoff,step_cache,fast, and fold_padding where the default speed does not already "
                         "fold; none for wide and full); add compile to time torch.compile (its first build takes "
                         "about a minute on a CPU)")
    ap.add_argument("--gguf", default="", help="comma-separated GGUF types (Q8_0,Q4_0) to time against the bf16 path "
                                               "on the same weights, each in its own interpreter")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aura_flow_bench",
                    help="folder for the built models")
    ap.add_argument("--comfyui", type=Path, default=None, help="a ComfyUI checkout: also time its native AuraFlow")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    sizes, steps, modes = DEFAULTS[args.preset]
    args.sizes = [int(v) for v in (args.size or sizes).split(",") if v]
    args.steps = steps if args.steps is None else args.steps
    if args.modes is None:
        args.modes = modes
    if args.modes is None:
        from aura_flow.pipeline.speed import resolve

        args.modes = ("" if resolve("auto", args.device) else "fold_padding,") + "cfg_cutoff,step_cache,fast"
    args.modes = [m for m in args.modes.split(",") if m]
    args.gguf = [q for q in args.gguf.split(",") if q]
    return args


def run(args) -> dict:
    import torch

    from aura_flow.pipeline.speed import MODES

    unknown = [m for m in args.modes if m not in MODES or m == "exact"]
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)}; valid: {', '.join(m for m in MODES if m != 'exact')}")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = build_model(args.preset, args.cache)
    dtype = torch_dtype(args.dtype, args.device)
    wbytes = weight_bytes(root, dtype.itemsize)
    result = {"preset": args.preset, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
              "steps": args.steps, "cfg": args.cfg, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "weight_bytes": wbytes, "model": str(root), "machine": machine(),
              "notes": []}
    from aura_flow.weights.linear import cpu_gemm

    result["cpu_gemm"] = cpu_gemm()

    # loading and importing, each in a fresh interpreter
    load = {}
    for name, kind in (("pack", "load-pack"), ("diffusers", "load-diffusers")):
        r = min((run_probe(kind, root, args.device, args.dtype) for _ in range(2)), key=lambda d: d["seconds"])
        load[name] = {"seconds": r["seconds"], "peak_bytes": r["peak_bytes"],
                      "peak_over_weights": r["peak_bytes"] / wbytes, "library_code_bytes": r["library_code_bytes"]}
    result["load"] = load
    if (REPO / "__init__.py").exists():
        imports = [run_probe("import", REPO) for _ in range(3)]
        result["import_seconds"] = min(i["seconds"] for i in imports)
        result["import_loads_torch"] = any(i["torch_imported"] for i in imports)
    else:
        result["notes"].append("no __init__.py at the repository root yet: the pack's import time was not measured")

    # generation, side by side in this process, one size after the other
    import aura_flow
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    pipe = aura_flow.load(root, device=args.device, dtype=args.dtype)
    dpipe = load_diffusers(root, args.device, args.dtype)
    dpipe.set_progress_bar_config(disable=True)
    comfy = None
    if args.comfyui is not None:
        from benchmarks import comfy_native

        comfy, note = comfy_native.prepare(args, root, pipe)
        result["notes"].append(note if comfy is not None else f"ComfyUI not measured: {note}")
    result["sizes"] = [run_size(argparse.Namespace(**vars(args), width=size, height=size), pipe, dpipe, comfy,
                                half=dtype != torch.float32) for size in args.sizes]
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    result["targets"] = {"load_peak_within_1.2x_weights": load["pack"]["peak_over_weights"] <= 1.2,
                         "import_under_0.5s": result["import_seconds"] < 0.5 if "import_seconds" in result else None}
    if args.gguf:
        del pipe, dpipe
        from benchmarks.gguf_rows import gguf_rows

        result["gguf"] = gguf_rows(args)
    return result


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if all(r["agreement"]["passed"] for r in result["sizes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
