"""Memory flatness: RSS and Python-heap growth over many generations in one process (issue 20).

    python -m benchmarks.memory_flat                    # tiny preset, 10 warm-up + 100 measured images
    python -m benchmarks.memory_flat --images 30 --preset medium --size 128 --lora
    python -m benchmarks.memory_flat --top 15           # also the 15 call sites whose Python heap grew most

It builds (once, under --cache) a random-weight AuraFlow, loads it, generates --warmup images, then --images more
with a new seed each (the prompts cycle through a few, as a user's would; with --lora two LoRAs alternate), and
prints the least-squares slope of the RSS and of tracemalloc's traced bytes per image after the warm-up, in KiB.
A flat process grows by well under 1 MiB per image; the issue's goal. Not a timed test: a benchmark to run by hand.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.measure import rss  # noqa: E402

PROMPTS = ("a fox in the snow", "a watercolor painting of a lighthouse", "a cat on a mat, 3d render",
           "portrait of an old sailor", "a city at night, neon lights")


def slope(values) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2…"""
    n = len(values)
    mx, my = (n - 1) / 2, sum(values) / n
    den = sum((i - mx) ** 2 for i in range(n)) or 1
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / den


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--lora", action="store_true", help="alternate two LoRAs between images")
    ap.add_argument("--save", action="store_true", help="save each image with its metadata, as the CLI does")
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--distinct", action="store_true", help="a new prompt for every image (the text encoder runs "
                                                             "each time and the prompt cache turns over)")
    ap.add_argument("--trim", action="store_true", help="glibc's malloc_trim(0) after each image (an experiment: "
                                                         "is the RSS growth freed memory the allocator keeps?)")
    ap.add_argument("--no-trace", action="store_true", help="RSS only (tracemalloc slows the Python side)")
    ap.add_argument("--top", type=int, default=0, help="print the N call sites whose traced memory grew most")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "aura_flow_bench"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    import aura_flow
    from aura_flow.tiny import build_tiny

    torch.manual_seed(0)
    dest = Path(args.cache) / f"memory-{args.preset}"
    ckpt = dest / "diffusers"
    if not (ckpt / "model_index.json").exists():
        ckpt = build_tiny(dest, "diffusers", preset=args.preset)
    pipe = aura_flow.load(ckpt, device="cpu")
    loras = [[]]
    if args.lora:
        sys.path.insert(0, str(REPO / "tests"))
        from lora_files import LAYERS_A, LAYERS_B, write_lora

        loras = [[(write_lora(dest / "a.safetensors", LAYERS_A, seed=1, preset=args.preset), 0.7)],
                 [(write_lora(dest / "b.safetensors", LAYERS_B, seed=2, style="peft", preset=args.preset), 1.0)]]

    out = Path(tempfile.mkdtemp(prefix="memory_flat_"))

    def one(i):
        model = pipe.with_loras(loras[i % len(loras)]) if args.lora else pipe
        prompt = PROMPTS[i % len(PROMPTS)] + (f", variation {i}" if args.distinct else "")
        result = model.generate(prompt=prompt, seed=i, steps=args.steps, width=args.size,
                                height=args.size, sampler=args.sampler)
        if args.save:
            from aura_flow.cli.generate import write_images

            for path in write_images(result, out):
                Path(path).unlink()
        if args.trim:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)

    for i in range(args.warmup):
        one(i)
    if not args.no_trace:
        tracemalloc.start(8)
    gc.collect()
    before = tracemalloc.take_snapshot() if args.top else None
    rss_mib, heap_mib = [], []
    for i in range(args.warmup, args.warmup + args.images):
        one(i)
        gc.collect()
        rss_mib.append(rss() / 2**20)
        heap_mib.append(tracemalloc.get_traced_memory()[0] / 2**20 if not args.no_trace else 0.0)
    result = {"preset": args.preset, "size": args.size, "steps": args.steps, "warmup": args.warmup,
              "images": args.images, "lora": args.lora,
              "rss_kib_per_image": round(slope(rss_mib) * 1024, 1),
              "heap_kib_per_image": round(slope(heap_mib) * 1024, 2),
              "rss_mib_first_last": [round(rss_mib[0], 1), round(rss_mib[-1], 1)]}
    print(f"{args.images} images after {args.warmup} warm-up ({args.preset}, {args.size}px, {args.steps} steps"
          f"{', 2 LoRAs alternating' if args.lora else ''}): RSS {result['rss_kib_per_image']:+.1f} KiB/image "
          f"({rss_mib[0]:.1f} -> {rss_mib[-1]:.1f} MiB), Python heap {result['heap_kib_per_image']:+.2f} KiB/image")
    if before is not None:
        for stat in tracemalloc.take_snapshot().compare_to(before, "traceback")[:args.top]:
            print(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+6d} blocks  "
                  + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback[:4]))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
