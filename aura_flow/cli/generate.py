"""``generate`` and ``demo`` commands: text to image on the local engine, written to files."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..params import DEFAULTS, OUTPUT_FORMATS, RANGES


def add_generation_flags(p, *, remote: bool = False):
    """One flag per hosted-API parameter (shared with the ``remote`` command)."""
    from ..sampling.registry import REMOTE_SAMPLER_NAMES, REMOTE_SCHEDULER_NAMES, SAMPLER_NAMES, SCHEDULER_NAMES

    p.add_argument("--prompt", default=DEFAULTS["prompt"], help="what to draw")
    p.add_argument("--negative-prompt", default=DEFAULTS["negative_prompt"], help="what to avoid")
    p.add_argument("--cfg", type=float, default=DEFAULTS["cfg"], help=f"guidance {RANGES['cfg'].lo:g}-{RANGES['cfg'].hi:g}")
    p.add_argument("--seed", type=int, default=None, help="0..2^64-1; random when omitted (the seed used is printed)")
    p.add_argument("--shift", type=float, default=DEFAULTS["shift"], help="flow shift 0-10")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="sampling steps 1-100")
    p.add_argument("--width", type=int, default=DEFAULTS["width"], help="image width (multiple of 8)")
    p.add_argument("--height", type=int, default=DEFAULTS["height"], help="image height (multiple of 8)")
    # choices are validated by the engine with the full list in the message; metavar keeps --help short
    p.add_argument("--sampler", default=DEFAULTS["sampler"], metavar="NAME",
                   help="one of: " + ", ".join(REMOTE_SAMPLER_NAMES if remote else SAMPLER_NAMES))
    p.add_argument("--scheduler", default=DEFAULTS["scheduler"], metavar="NAME",
                   help="one of: " + ", ".join(REMOTE_SCHEDULER_NAMES if remote else SCHEDULER_NAMES))
    p.add_argument("--number-of-images", type=int, default=DEFAULTS["number_of_images"], help="1-10")
    p.add_argument("--output-format", default=DEFAULTS["output_format"], choices=OUTPUT_FORMATS)
    p.add_argument("--output-quality", type=int, default=DEFAULTS["output_quality"], help="0-100 (webp/jpg)")
    p.add_argument("--out", default="out", help="folder to write the images into (default: ./out)")


def add_speed_flag(p):
    p.add_argument("--speed", default="auto", metavar="MODE",
                   help="auto (lossless padding fold on the CPU, exact elsewhere), exact, fold_padding, compile, or "
                        "the lossy opt-ins cfg_cutoff, step_cache, fast; named modes add to auto's fold on the CPU "
                        "(see aura_flow/speed.py)")


def generation_params(args) -> dict:
    return {k: getattr(args, k) for k in DEFAULTS}


def register(sub):
    g = sub.add_parser("generate", help="text to image with a local AuraFlow checkpoint")
    g.add_argument("--checkpoint", required=True, help="diffusers folder, all-in-one or transformer .safetensors")
    g.add_argument("--tokenizer", help="tokenizer.model or tokenizer folder (single files)")
    g.add_argument("--text-encoder", help="Pile-T5-XL .safetensors or folder (transformer-only files)")
    g.add_argument("--vae", help="SDXL VAE .safetensors or folder (transformer-only files)")
    g.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    add_speed_flag(g)
    add_generation_flags(g)
    g.set_defaults(func=run_generate)

    d = sub.add_parser("demo", help="build a tiny random-weight AuraFlow once and generate with it (no downloads)")
    d.add_argument("--cache", default=os.environ.get("AURAFLOW_CACHE", str(Path.home() / ".cache" / "aura_flow")),
                   help="where the demo model is built (default ~/.cache/aura_flow, or $AURAFLOW_CACHE)")
    add_speed_flag(d)
    add_generation_flags(d)
    d.set_defaults(func=run_demo, prompt="a watercolor painting of a fox", width=256, height=256, steps=8,
                   sampler="euler")


class ProgressBar:
    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width, self.t0 = stream, width, time.perf_counter()

    def __call__(self, step: int, total: int, _x0=None):
        done = int(self.width * step / max(total, 1))
        rate = (time.perf_counter() - self.t0) / max(step, 1)
        self.stream.write(f"\r[{'#' * done}{'.' * (self.width - done)}] {step}/{total} {rate:.2f}s/step")
        if step >= total:
            self.stream.write("\n")
        self.stream.flush()


def write_images(result, out_dir, fmt: str, quality: int, stem: str = "aura_flow") -> list[str]:
    from ..images import EXT, save_image_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(result.images):
        path = out / f"{stem}_{result.seed}_{i:02d}{EXT[fmt]}"
        save_image_atomic(img, path, fmt, quality, metadata={"parameters": result.params})
        paths.append(str(path))
    return paths


def _generate(pipe, args) -> int:
    from ..params import validate_generation

    params = validate_generation(generation_params(args))
    result = pipe.generate(callback=ProgressBar(), speed=args.speed, **params)
    for path in write_images(result, args.out, params["output_format"], params["output_quality"]):
        sys.stdout.write(path + "\n")
    sys.stderr.write(f"seed: {result.seed}\n")
    return 0


def run_generate(args) -> int:
    from .. import load
    from ..params import validate_generation

    validate_generation(generation_params(args))  # fail before loading 16 GB
    pipe = load(args.checkpoint, tokenizer=args.tokenizer, text_encoder=args.text_encoder, vae=args.vae,
                dtype=args.dtype, device=args.device)
    return _generate(pipe, args)


def run_demo(args) -> int:
    from .. import load
    from ..params import validate_generation
    from ..tiny import build_tiny

    validate_generation(generation_params(args))
    root = Path(args.cache) / "demo-tiny"
    ckpt = root / "diffusers"
    if not (ckpt / "model_index.json").exists():
        sys.stderr.write(f"building the tiny demo model in {root} (once)\n")
        build_tiny(root, "diffusers")
    pipe = load(ckpt, device="cpu")
    return _generate(pipe, args)
