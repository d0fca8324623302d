"""Side-by-side benchmark: the pack against diffusers' AuraFlowPipeline (and ComfyUI) on the same random weights.

    python -m benchmarks.run --preset medium            # CPU: a few seconds an image
    python -m benchmarks.run --preset tiny --size 64 --steps 2 --repeats 1 --json out.json
    /path/to/comfy-venv/bin/python -m benchmarks.run --comfyui /path/to/ComfyUI

It builds a random-weight AuraFlow of the preset's size (cached under --cache), generates the same image with
each contender in one process (same weights, prompt, start noise, euler/normal, steps, cfg), checks that the
decoded images agree, and prints a table and a JSON object: seconds per image and per step, the ratio to
diffusers, peak memory (RSS on CPU, allocated on GPU), load time and load peak against the weight bytes, the
pack's import time, and for each opt-in speed mode (aura_flow.pipeline.speed) its speed-up and PSNR against the exact image.
Contenders: `pack` (generate's default speed, "auto"), `pack[exact]` (speed=None, the reference image),
`diffusers`, `pack[MODE]` for each --modes entry, and `comfyui` with --comfyui.
Each contender is warmed up first; then the runs alternate for --repeats rounds and the best and the median
are reported (the ratio uses the best, the least disturbed by other work on the machine).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TOLERANCE = 1e-4  # max abs difference allowed between the pack's and diffusers' decoded images (0..1 range)
# In half precision diffusers rounds the latent to bf16/fp16 after every step while the pack keeps it in fp32,
# so single pixels drift apart; there the images must agree to this PSNR instead (another schedule, a missed
# step or a wrong position grid all fall far below it).
HALF_PSNR_DB = 40.0
MIB = 2**20

from benchmarks.measure import Contender, Peak, library_bytes, rss  # noqa: E402,F401


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


def weight_bytes(root: Path, itemsize: int = 4) -> int:
    """Bytes of the weights once loaded: transformer and text encoder at ``itemsize`` bytes an element, the VAE
    at 4 (both pipelines run it in fp32)."""
    from safetensors import safe_open

    total = 0
    for part in ("transformer", "text_encoder", "vae"):
        for f in (root / part).glob("*.safetensors"):
            with safe_open(f, "pt") as fh:
                n = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
            total += n * (4 if part == "vae" else itemsize)
    return total


def torch_dtype(name: str, device: str):
    """The dtype the pack's loader picks for ``name`` (auto: fp32 on the CPU, bf16 or fp16 on CUDA)."""
    import torch

    from aura_flow.weights.devices import resolve_dtypes

    return resolve_dtypes(name, torch.device(device))[1]


def load_diffusers(root, device: str, dtype: str):
    """diffusers' AuraFlowPipeline in ``dtype``, its VAE in fp32 as the pack's (its decode casts the latents)."""
    import torch
    from diffusers import AuraFlowPipeline

    dpipe = AuraFlowPipeline.from_pretrained(root, local_files_only=True, torch_dtype=torch_dtype(dtype, device))
    dpipe.vae.to(torch.float32)
    return dpipe.to(device)


def probe(kind: str, arg: str, device: str = "cpu", dtype: str = "auto"):
    """Run in a fresh interpreter by `_subprocess`: prints one JSON line."""
    if kind == "import":  # exactly how ComfyUI imports a custom node folder (nodes.load_custom_node)
        import importlib.util

        path = Path(arg)
        name = str(path).replace(".", "_x_")
        t0 = time.perf_counter()
        spec = importlib.util.spec_from_file_location(name, str(path / "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "torch_imported": "torch" in sys.modules}))
        return
    import torch  # noqa: F401  (imports are not part of the load)
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderKL  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401

    import aura_flow
    import aura_flow.pipeline.pipeline  # noqa: F401

    code = library_bytes()
    with Peak(device) as peak:
        t0 = time.perf_counter()
        if kind == "load-pack":
            model = aura_flow.load(arg, device=device, dtype=dtype)
        else:
            model = load_diffusers(arg, device, dtype)
        seconds = time.perf_counter() - t0
        # read every weight once, so that weights still mapped from the file and not yet paged in count too
        for part in ("transformer", "text_encoder", "vae"):
            for t in getattr(model, part).state_dict().values():
                t.float().sum() if t.dtype.itemsize < 2 else t.sum()
    code = library_bytes() - code
    del model
    # the code pages of shared libraries first used while loading (libtorch, tokenizers: ~8 MiB, a third of the
    # small presets' weights) are not model memory; they are reported apart and left out of the peak on the CPU
    peak_bytes = peak.added if peak.cuda else max(0, peak.added - code)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak_bytes, "library_code_bytes": code}))


def _subprocess(kind: str, arg, device: str = "cpu", dtype: str = "auto") -> dict:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.run import probe; "
            f"probe({kind!r}, {str(arg)!r}, {device!r}, {dtype!r})")
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- contenders
def pack_contender(pipe, args, noise, speed="auto", name="pack"):
    def run():
        stamps = []
        r = pipe.generate(prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width,
                          height=args.height, steps=args.steps, cfg=args.cfg, seed=args.seed, sampler="euler",
                          scheduler="normal", shift=1.73, noise=noise, speed=speed,
                          callback=lambda i, n, x0: stamps.append(time.perf_counter()))
        return r.tensor[0], stamps

    return Contender(name, run)


def diffusers_contender(dpipe, args, noise):
    import torch

    def run():
        stamps = []

        def on_step(p, i, t, kw):
            stamps.append(time.perf_counter())
            return {}

        out = dpipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                    num_inference_steps=args.steps, guidance_scale=args.cfg, latents=noise.clone().to(args.device),
                    output_type="np", callback_on_step_end=on_step)
        return torch.from_numpy(out.images[0]), stamps

    return Contender("diffusers", run)


# ---------------------------------------------------------------- the whole benchmark
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="medium", choices=("tiny", "medium", "full"),
                    help="model size (aura_flow.tiny.PRESETS); full is the real 6.8B shape (needs ~40 GB)")
    ap.add_argument("--size", type=int, default=256, help="image width and height in pixels (default 256)")
    ap.add_argument("--steps", type=int, default=16)
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
                    help="comma-separated aura_flow.pipeline.speed modes to measure ('' for none; default cfg_cutoff,"
                         "step_cache,fast, and fold_padding where the default speed does not already fold); add "
                         "compile to time torch.compile (its first build takes about a minute on a CPU)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aura_flow_bench",
                    help="folder for the built models")
    ap.add_argument("--comfyui", type=Path, default=None, help="a ComfyUI checkout: also time its native AuraFlow")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    args.width = args.height = args.size
    if args.modes is None:
        from aura_flow.pipeline.speed import resolve

        args.modes = ("" if resolve("auto", args.device) else "fold_padding,") + "cfg_cutoff,step_cache,fast"
    args.modes = [m for m in args.modes.split(",") if m]
    return args


def run(args) -> dict:
    import torch

    from aura_flow.pipeline.speed import MODES, psnr

    unknown = [m for m in args.modes if m not in MODES or m == "exact"]
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)}; valid: {', '.join(m for m in MODES if m != 'exact')}")
    if args.threads:
        torch.set_num_threads(args.threads)
    notes = []
    root = build_model(args.preset, args.cache)
    dtype = torch_dtype(args.dtype, args.device)
    wbytes = weight_bytes(root, dtype.itemsize)
    half = dtype != torch.float32
    result = {"preset": args.preset, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
              "width": args.width, "height": args.height,
              "steps": args.steps, "cfg": args.cfg, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "weight_bytes": wbytes, "model": str(root)}

    # loading and importing, each in a fresh interpreter
    load = {}
    for name, kind in (("pack", "load-pack"), ("diffusers", "load-diffusers")):
        r = min((_subprocess(kind, root, args.device, args.dtype) for _ in range(2)), key=lambda d: d["seconds"])
        load[name] = {"seconds": r["seconds"], "peak_bytes": r["peak_bytes"],
                      "peak_over_weights": r["peak_bytes"] / wbytes, "library_code_bytes": r["library_code_bytes"]}
    result["load"] = load
    if (REPO / "__init__.py").exists():
        imports = [_subprocess("import", REPO) for _ in range(3)]
        result["import_seconds"] = min(i["seconds"] for i in imports)
        result["import_loads_torch"] = any(i["torch_imported"] for i in imports)
    else:
        notes.append("no __init__.py at the repository root yet: the pack's import time was not measured")

    # generation, side by side in this process
    import aura_flow
    from aura_flow.sampling.loop import prepare_noise
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    pipe = aura_flow.load(root, device=args.device, dtype=args.dtype)
    dpipe = load_diffusers(root, args.device, args.dtype)
    dpipe.set_progress_bar_config(disable=True)
    noise = prepare_noise((1, 4, args.height // 8, args.width // 8), args.seed)

    # pack[exact] (speed=None) is the reference image for every diff and PSNR; pack is generate's default
    contenders = [pack_contender(pipe, args, noise, speed=None, name="pack[exact]"),
                  diffusers_contender(dpipe, args, noise), pack_contender(pipe, args, noise)]
    contenders += [pack_contender(pipe, args, noise, speed=m, name=f"pack[{m}]") for m in args.modes]
    if args.comfyui is not None:
        from benchmarks import comfy_native

        comfy, note = comfy_native.contender(args, root, pipe, noise)
        notes.append(note if comfy is not None else f"ComfyUI not measured: {note}")
        if comfy is not None:
            contenders.insert(3, comfy)
    for c in contenders:
        print(f"warm-up: {c.name}", flush=True)
        c.measure(args.device, warmup=True)
    for r in range(args.repeats):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            c.measure(args.device)
        print(f"round {r + 1}/{args.repeats} done", flush=True)
    encodes = []  # what the pack's prompt encoding costs when not cached (diffusers encodes on every call)
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        for text in (args.prompt, args.negative_prompt):
            pipe._prompt_cache.pop(text, None)
            pipe.encode_prompt(text)
        encodes.append(time.perf_counter() - t0)
    result["pack_prompt_encode_seconds"] = min(encodes)

    exact, diff, pack = contenders[0], contenders[1], contenders[2]
    best = {c.name: c.summary()["seconds_per_image"] for c in contenders}
    runs = {}
    for c in contenders:
        s = c.summary()
        s["speedup_vs_diffusers"] = best["diffusers"] / s["seconds_per_image"]
        s["speedup_vs_exact"] = best["pack[exact]"] / s["seconds_per_image"]
        s["speedup_vs_default"] = best["pack"] / s["seconds_per_image"]
        s["max_abs_diff_vs_diffusers"] = (c.image - diff.image).abs().max().item()
        s["max_abs_diff_vs_exact"] = (c.image - exact.image).abs().max().item()
        s["psnr_vs_exact_db"] = min(psnr(c.image, exact.image), 999.0)  # JSON has no infinity
        s["psnr_vs_diffusers_db"] = min(psnr(c.image, diff.image), 999.0)
        runs[c.name] = s
    result["runs"] = runs

    def agrees(r):
        return r["psnr_vs_diffusers_db"] >= HALF_PSNR_DB if half else r["max_abs_diff_vs_diffusers"] <= TOLERANCE

    both = ("pack", "pack[exact]")
    result["agreement"] = {"max_abs_diff": max(runs[n]["max_abs_diff_vs_diffusers"] for n in both),
                           "psnr_db": min(runs[n]["psnr_vs_diffusers_db"] for n in both),
                           "criterion": f"PSNR >= {HALF_PSNR_DB:g} dB" if half else f"max abs diff <= {TOLERANCE:g}",
                           "tolerance": None if half else TOLERANCE, "passed": all(agrees(runs[n]) for n in both),
                           "compared": "pack (default) and pack[exact] against diffusers"}
    result["ratio"] = runs["pack"]["speedup_vs_diffusers"]
    result["ratio_median"] = runs["diffusers"]["seconds_per_image_median"] / runs["pack"]["seconds_per_image_median"]
    result["ratio_exact"] = runs["pack[exact]"]["speedup_vs_diffusers"]
    within = {n: r["speedup_vs_diffusers"] for n, r in runs.items()
              if n.startswith("pack") and agrees(r)}
    result["targets"] = {  # the targets; each is measured, none is assumed
        f"pack_1.25x_vs_diffusers_{'at_40dB' if half else 'within_1e-4'}": {n: v >= 1.25 for n, v in within.items()},
        "modes_1.5x_at_30dB": {m: runs[f"pack[{m}]"]["speedup_vs_exact"] >= 1.5
                               and runs[f"pack[{m}]"]["speedup_vs_diffusers"] >= 1.5
                               and runs[f"pack[{m}]"]["psnr_vs_exact_db"] >= 30 for m in args.modes
                               if m != "fold_padding"},
        "load_peak_within_1.2x_weights": load["pack"]["peak_over_weights"] <= 1.2,
        "import_under_0.5s": result["import_seconds"] < 0.5 if "import_seconds" in result else None,
    }
    result["notes"] = notes
    return result


def table(result: dict) -> str:
    mib = lambda b: f"{b / MIB:8.1f}"  # noqa: E731
    lines = [f"AuraFlow {result['preset']} preset, {result['width']}x{result['height']}, {result['steps']} steps, "
             f"cfg {result['cfg']}, euler/normal, {result['dtype']}, {result['device']} ({result['threads']} threads, "
             f"torch {result['torch']}), best of {result['repeats']} alternating runs",
             "",
             f"{'contender':<20} {'s/image':>8} {'median':>8} {'s/step':>8} {'peak MiB':>9} {'vs diffusers':>13} "
             f"{'vs exact':>9} {'vs default':>11} {'max|diff|':>10} {'PSNR dB':>8}",
             "(pack = generate's default speed, pack[exact] = speed=None, the reference of max|diff| and PSNR)"]
    for name, r in result["runs"].items():
        vs = (f"{r['max_abs_diff_vs_exact']:10.2e} {r['psnr_vs_exact_db']:8.1f}" if name != "pack[exact]"
              else f"{'(reference)':>19}")
        lines.append(f"{name:<20} {r['seconds_per_image']:8.3f} {r['seconds_per_image_median']:8.3f} "
                     f"{r['seconds_per_step']:8.4f} {mib(r['peak_memory_bytes']):>9} "
                     f"{r['speedup_vs_diffusers']:12.2f}x {r['speedup_vs_exact']:8.2f}x "
                     f"{r['speedup_vs_default']:10.2f}x {vs}")
        if r.get("warmup_seconds") and r["warmup_seconds"] > 3 * r["seconds_per_image"]:
            lines.append(f"{'':<20} (first call {r['warmup_seconds']:.1f}s: build and warm-up)")
    a = result["agreement"]
    lines += ["", f"agreement pack and pack[exact] vs diffusers: max abs diff {a['max_abs_diff']:.2e}, PSNR "
                  f"{a['psnr_db']:.1f} dB ({'passed' if a['passed'] else 'FAILED'}: {a['criterion']})",
              f"pack prompt encoding when not cached: {result['pack_prompt_encode_seconds']:.3f}s (both prompts; "
              f"diffusers encodes on every call, the pack caches repeated prompts)",
              "", f"{'load':<20} {'seconds':>8} {'peak MiB':>9} {'peak/weights':>13} {'lib code MiB':>13}   "
                  f"(weights {result['weight_bytes'] / MIB:.1f} MiB, fresh interpreter, every weight read once; "
                  f"library code paged in is not counted in the peak)"]
    for name, r in result["load"].items():
        lines.append(f"{name:<20} {r['seconds']:8.3f} {mib(r['peak_bytes']):>9} {r['peak_over_weights']:12.2f}x "
                     f"{mib(r['library_code_bytes']):>13}")
    if "import_seconds" in result:
        lines.append(f"\npack import (as ComfyUI imports the folder): {result['import_seconds']:.3f}s"
                     f"{' (loads torch)' if result['import_loads_torch'] else ''}")
    for k, v in result["targets"].items():
        lines.append(f"target {k}: {v}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if result["agreement"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
