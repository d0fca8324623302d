"""``generate`` and ``demo`` commands: text to image on the local engine, written to files.

Every parameter is checked (into a plan) and the output folder tested before the model is loaded."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .flags import (HelpFormatter, add_generation_flags, add_local_flags, add_model_flags, add_speed_flag,
                    check_lora_flags, check_output_folder, generation_params)


def register(sub):
    g = sub.add_parser("generate", help="text to image with a local AuraFlow checkpoint",
                       formatter_class=HelpFormatter)
    add_model_flags(g, required=True)
    add_speed_flag(g)
    add_local_flags(g)
    add_generation_flags(g)
    g.set_defaults(func=run_generate, parser=g)

    d = sub.add_parser("demo", help="build a tiny random-weight AuraFlow once and generate with it (no downloads)",
                       formatter_class=HelpFormatter)
    d.add_argument("--cache", default=os.environ.get("AURAFLOW_CACHE", str(Path.home() / ".cache" / "aura_flow")),
                   help="where the demo model is built ($AURAFLOW_CACHE overrides the default)")
    add_speed_flag(d)
    add_local_flags(d)
    add_generation_flags(d)
    d.set_defaults(func=run_demo, parser=d, prompt="a watercolor painting of a fox", width=256, height=256, steps=8,
                   sampler="euler")


class ProgressBar:
    def __init__(self, stream=None, width: int = 30):
        self.stream, self.width, self.t0 = stream or sys.stderr, width, time.perf_counter()

    def __call__(self, step: int, total: int, _x0=None):
        done = int(self.width * step / max(total, 1))
        rate = (time.perf_counter() - self.t0) / max(step, 1)
        self.stream.write(f"\r[{'#' * done}{'.' * (self.width - done)}] {step}/{total} {rate:.2f}s/step")
        if step >= total:
            self.stream.write("\n")
        self.stream.flush()


def write_images(result, out_dir, stem: str = "aura_flow"):
    """Each image as ``<stem>_<seed>_<i>.<ext>`` in ``out_dir``, never replacing a file (``_1``, ``_2``... when
    taken), with the parameters and the ``auraflow`` record (files, hashes, dtype, LoRAs...) embedded; yields the
    paths as they are written."""
    from ..images import save_new_image

    plan = result.plan
    for i, img in enumerate(result.images):
        yield str(save_new_image(img, out_dir, f"{stem}_{result.seed}_{i:02d}", plan.output_format,
                                 plan.output_quality, metadata=result.metadata()))


def _plan(args):
    """Every parameter, every --lora (file header and strength) and the output folder, before the model loads."""
    from ..plan import plan_generation

    plan = plan_generation(generation_params(args), speed=args.speed, noise_device=args.noise_device)
    args.loras = check_lora_flags(args.loras)
    check_output_folder(args.out)
    return plan


def _generate(pipe, plan, args) -> int:
    result = pipe.generate(plan, callback=ProgressBar())
    try:
        for path in write_images(result, args.out):
            sys.stdout.write(path + "\n")
    except OSError as exc:  # a full disk, a folder removed meanwhile: each image is whole or absent
        sys.stderr.write(f"error: cannot write the images into --out {args.out} ({exc.strerror or exc}); free some "
                         f"space or give another folder. seed: {result.seed}\n")
        return 1
    sys.stderr.write(f"seed: {result.seed}\n")
    return 0


def run_generate(args) -> int:
    plan = _plan(args)  # every parameter and the output folder, before torch and before loading 16 GB
    from ..pipeline.pipeline import load

    pipe = load(args.checkpoint, tokenizer=args.tokenizer, text_encoder=args.text_encoder, vae=args.vae,
                dtype=args.dtype, device=args.device, loras=args.loras)
    return _generate(pipe, plan, args)


def run_demo(args) -> int:
    plan = _plan(args)  # before torch is imported
    root = Path(args.cache).expanduser() / "demo-tiny"
    ckpt = root / "diffusers"
    build = not (ckpt / "model_index.json").exists()
    if build:
        check_output_folder(root, "--cache")
    from ..pipeline.pipeline import load
    from ..tiny import build_tiny

    if build:
        sys.stderr.write(f"building the tiny demo model in {root} (once)\n")
        build_tiny(root, "diffusers")
    pipe = load(ckpt, device="cpu", loras=args.loras)
    return _generate(pipe, plan, args)
