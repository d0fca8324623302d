"""Memory flatness: RSS and Python-heap growth over many generations in one process (issue 20).

    python -m benchmarks.memory_flat                    # tiny preset, 10 warm-up + 100 measured images
    python -m benchmarks.memory_flat --preset wide --size 256 --warmup 10 --images 40 --path nodes --lora
    python -m benchmarks.memory_flat --path batch --distinct --sizes 256,320 --top 15 --types 10

It builds (once, under --cache) a random-weight AuraFlow, loads it, generates --warmup images, then --images more
with a new seed each (the prompts cycle through a few, as a user's would; --distinct: a new one each time; --sizes:
the sizes cycle; --lora: two LoRAs alternate; --lora-sweep: a LoRA file never used before each image), and prints
the least-squares slope of the RSS and of tracemalloc's traced bytes per image after the warm-up, in KiB, with the
seconds per image. A flat process grows by well under 1 MiB per image; the issue's goal. Not a timed test: a
benchmark to run by hand.

--path: how the images are made, as a user makes them:
- ``api``: ``pipe.generate()`` (``with_loras`` views for LoRAs), the engine as the CLI and scripts use it;
- ``nodes``: the bundled step-by-step workflow (example_workflows/api/auraflow_txt2img_nodes.json: Loader, Text
  Encode x2, [LoRA Loader], Sampler, VAE Decode, Save Image with the workflow embedded) run once per image by the
  tests' ComfyUI stand-in executor, the loader's output kept between runs as ComfyUI's cache keeps it;
- ``generate_node``: the same with the one-node workflow (auraflow_generate.json: AuraFlow Generate, Save Image);
- ``batch``: one job file through ``aura_flow.batch.run`` with the local backend (manifest, image files, hashes).
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "tests"):  # the engine; the tests' LoRA writer and ComfyUI stand-in executor
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchmarks.measure import rss  # noqa: E402

PROMPTS = ("a fox in the snow", "a watercolor painting of a lighthouse", "a cat on a mat, 3d render",
           "portrait of an old sailor", "a city at night, neon lights")
PATHS = ("api", "nodes", "generate_node", "batch")


def slope(values) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2…"""
    n = len(values)
    mx, my = (n - 1) / 2, sum(values) / n
    den = sum((i - mx) ** 2 for i in range(n)) or 1
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / den


def type_counts() -> collections.Counter:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


class Recorder:
    """After each image: RSS and traced heap (tracemalloc starts after the warm-up), seconds per image."""

    def __init__(self, args):
        self.args, self.n = args, 0
        self.rss, self.heap, self.seconds = [], [], []
        self.before = self.types = None
        self.t = time.perf_counter()

    def image_done(self) -> None:
        self.n += 1
        now = time.perf_counter()
        if self.args.trim:
            from aura_flow.weights.devices import release_freed_memory

            release_freed_memory()
        gc.collect()
        if self.n == self.args.warmup:
            if not self.args.no_trace:
                tracemalloc.start(8)
            self.before = tracemalloc.take_snapshot() if self.args.top else None
            self.types = type_counts() if self.args.types else None
        elif self.n > self.args.warmup:
            self.rss.append(rss() / 2**20)
            self.heap.append(tracemalloc.get_traced_memory()[0] / 2**20 if tracemalloc.is_tracing() else 0.0)
            self.seconds.append(now - self.t)
        if self.n % 10 == 0:
            sys.stderr.write(f"  image {self.n}: RSS {rss() / 2**20:.1f} MiB, {now - self.t:.1f} s\n")
        self.t = time.perf_counter()


def job(args, i: int, loras) -> dict:
    """Image ``i``'s parameters (and LoRA list)."""
    size = args.sizes[i % len(args.sizes)]
    prompt = PROMPTS[i % len(PROMPTS)] + (f", variation {i}" if args.distinct else "")
    return dict(prompt=prompt, seed=1000 + i, steps=args.steps, width=size, height=size, sampler=args.sampler,
                loras=loras(i))


def run_api(args, ckpt, loras, rec, out):
    import aura_flow

    pipe = aura_flow.load(ckpt, device="cpu")
    for i in range(args.warmup + args.images):
        p = job(args, i, loras)
        model = pipe.with_loras(p.pop("loras")) if args.lora or args.lora_sweep else pipe
        result = model.generate(**p)
        if args.save:
            from aura_flow.cli.generate import write_images

            for path in write_images(result, out):
                Path(path).unlink()
        del result, model
        rec.image_done()


def run_nodes(args, ckpt, loras, rec, out):
    """The bundled API workflow through the tests' ComfyUI stand-in executor, once per image."""
    import workflow_exec as wx

    os.environ["AURAFLOW_OUTPUT_DIR"] = str(out)
    name = "auraflow_generate" if args.path == "generate_node" else "auraflow_txt2img_nodes"
    base = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))
    editor = json.loads((REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))
    classes = wx.all_classes(wx.load_pack())
    loaded = {}

    class CachedLoader(classes["AuraFlowLoader"]):  # ComfyUI runs an unchanged node once and keeps its outputs
        def load(self, **inputs):
            key = json.dumps(inputs, sort_keys=True)
            if key not in loaded:
                loaded[key] = super().load(**inputs)
            return loaded[key]

    classes = {**classes, "AuraFlowLoader": CachedLoader}
    for i in range(args.warmup + args.images):
        p = job(args, i, loras)
        prompt = json.loads(json.dumps(base))
        for node in list(prompt.values()):
            inputs, kind = node["inputs"], node["class_type"]
            if kind == "AuraFlowLoader":
                inputs.update(checkpoint=str(ckpt))
            elif kind == "AuraFlowTextEncode" and inputs["text"]:
                inputs["text"] = p["prompt"]
            elif kind in ("AuraFlowSampler", "AuraFlowGenerate"):
                inputs.update(seed=p["seed"], steps=p["steps"], width=p["width"], height=p["height"])
                inputs["sampler_name" if kind == "AuraFlowSampler" else "sampler"] = p["sampler"]
                if kind == "AuraFlowGenerate":
                    inputs["prompt"] = p["prompt"]
                model = inputs["model"]
                for j, (path, strength) in enumerate(p["loras"]):  # a LoRA Loader chain before the model input
                    prompt[f"lora{j}"] = {"class_type": "AuraFlowLoraLoader",
                                          "inputs": {"model": model, "lora_name": str(path), "strength": strength}}
                    model = [f"lora{j}", 0]
                inputs["model"] = model
        _, ui = wx.execute(prompt, classes, workflow=editor)
        for entry in ui.values():
            for f in entry.get("images", ()):
                (out / f["subfolder"] / f["filename"]).unlink()
        del ui
        rec.image_done()


def run_batch(args, ckpt, loras, rec, out):
    from aura_flow.batch import progress as bp
    from aura_flow.batch.runner import run

    class Measured(bp.Progress):
        def finished(self, job, ok, images=0):
            super().finished(job, ok, images)
            if not ok:
                raise RuntimeError(f"job on line {job.line} failed")
            for name in os.listdir(out):  # the images written so far (the manifest stays, as in a real batch)
                if not name.endswith(".jsonl"):
                    (out / name).unlink()
            rec.image_done()

    jobs = out.parent / "jobs.jsonl"
    with open(jobs, "w", encoding="utf-8") as fh:
        for i in range(args.warmup + args.images):
            p = job(args, i, loras)
            p["loras"] = [[str(path), s] for path, s in p["loras"]]
            fh.write(json.dumps({k: v for k, v in p.items() if v != []}) + "\n")
    summary = run(jobs, out, backend="local", progress=Measured(every_seconds=3600), checkpoint=str(ckpt),
                  device="cpu")
    if summary.done != args.warmup + args.images:
        raise RuntimeError(f"the batch did {summary.done} jobs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default="api", choices=PATHS, help="how the images are made (see above)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sizes", default=None, help="sizes to cycle through, e.g. 256,320,384 (default: --size)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--lora", action="store_true", help="alternate two LoRAs between images")
    ap.add_argument("--lora-sweep", action="store_true", help="a LoRA file not used before for every image (a "
                                                               "user trying one LoRA after another)")
    ap.add_argument("--save", action="store_true", help="api: save each image with its metadata, as the CLI does "
                                                         "(the other paths always save)")
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--distinct", action="store_true", help="a new prompt for every image (the text encoder runs "
                                                             "each time and the prompt cache turns over)")
    ap.add_argument("--trim", action="store_true", help="glibc's malloc_trim(0) after each image as well (an "
                                                         "experiment: is the RSS growth freed memory the allocator "
                                                         "keeps?)")
    ap.add_argument("--no-trace", action="store_true", help="RSS only (tracemalloc slows the Python side)")
    ap.add_argument("--top", type=int, default=0, help="print the N call sites whose traced memory grew most")
    ap.add_argument("--types", type=int, default=0, help="print the N object types whose count grew most")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "aura_flow_bench"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.size]
    if args.images < 2:
        ap.error(f"--images {args.images}: give at least 2 (a slope needs two points)")

    import torch

    from aura_flow.tiny import build_tiny

    torch.manual_seed(0)
    dest = Path(args.cache) / f"memory-{args.preset}"
    ckpt = dest / "diffusers"
    if not (ckpt / "model_index.json").exists():
        ckpt = build_tiny(dest, "diffusers", preset=args.preset)
    work = Path(tempfile.mkdtemp(prefix="memory_flat_"))
    out = work / "out"
    out.mkdir()

    def loras(i):
        return []

    if args.lora or args.lora_sweep:
        from lora_files import LAYERS_A, LAYERS_B, write_lora

        pair = [[(write_lora(dest / "a.safetensors", LAYERS_A, seed=1, preset=args.preset), 0.7)],
                [(write_lora(dest / "b.safetensors", LAYERS_B, seed=2, style="peft", preset=args.preset), 1.0)]]

        def loras(i):  # noqa: F811
            if args.lora_sweep:  # written just before its image: a file, and a path, never seen before
                return [(write_lora(work / f"sweep{i}.safetensors", LAYERS_A, seed=10 + i, preset=args.preset), 0.8)]
            return pair[i % 2]

    rec = Recorder(args)
    {"api": run_api, "nodes": run_nodes, "generate_node": run_nodes, "batch": run_batch}[args.path](
        args, ckpt, loras, rec, out)
    what = [args.path, args.preset, "x".join(map(str, args.sizes)) + "px", f"{args.steps} steps"]
    what += ["distinct prompts"] * args.distinct + ["2 LoRAs alternating"] * args.lora
    what += ["a new LoRA each image"] * args.lora_sweep + ["malloc_trim"] * args.trim
    result = {"path": args.path, "preset": args.preset, "sizes": args.sizes, "steps": args.steps,
              "warmup": args.warmup, "images": args.images, "distinct": args.distinct, "lora": args.lora,
              "lora_sweep": args.lora_sweep, "rss_kib_per_image": round(slope(rec.rss) * 1024, 1),
              "heap_kib_per_image": round(slope(rec.heap) * 1024, 2),
              # the second half alone: a cache still filling early (8 prompts, 8 LoRA files) shows as a step there
              "rss_kib_per_image_2nd_half": round(slope(rec.rss[len(rec.rss) // 2:]) * 1024, 1),
              "rss_mib_first_last": [round(rec.rss[0], 1), round(rec.rss[-1], 1)],
              "seconds_per_image": round(sum(rec.seconds) / len(rec.seconds), 2),
              "rss_mib": [round(v, 1) for v in rec.rss]}
    print(f"{args.images} images after {args.warmup} warm-up ({', '.join(what)}): RSS "
          f"{result['rss_kib_per_image']:+.1f} KiB/image ({rec.rss[0]:.1f} -> {rec.rss[-1]:.1f} MiB; second half "
          f"{result['rss_kib_per_image_2nd_half']:+.1f}), Python heap "
          f"{result['heap_kib_per_image']:+.2f} KiB/image, {result['seconds_per_image']:.2f} s/image")
    if rec.before is not None:
        for stat in tracemalloc.take_snapshot().compare_to(rec.before, "traceback")[:args.top]:
            print(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+6d} blocks  "
                  + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(stat.traceback)[::-1][:6]))
    if rec.types is not None:
        grown = type_counts()
        grown.subtract(rec.types)
        print("object counts grown: " + ", ".join(f"{k} {v:+d}" for k, v in grown.most_common(args.types)))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
