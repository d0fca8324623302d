"""The GGUF rows: seconds per image and peak RSS while generating, for GGUF Q8_0 / Q4_0 transformers against the
bf16 path on the same weights (the same random model, its transformer quantized by `aura_flow.weights.writers`).

Each row runs in its own interpreter, so that its RSS holds only its own model: import, load (compute in bf16 in
every row, the VAE in fp32), one warm-up image, then --repeats timed images. The peak is the process's peak RSS
during a timed image above its RSS after the imports (so torch's own libraries are not counted), also per stage
of generate (sampling: the transformer's; decoding: the VAE's); the transformer's, text encoder's and VAE's
bytes are what their parameters and buffers hold. Only the transformer is quantized: the rest of the peak (text
encoder, VAE, activations) is the same in every row, so the peak's ratio to bf16 is bounded by the share of the
transformer in it.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.measure import REPO, OtherLoad, Peak, rss

GOALS = {"Q8_0": {"peak": 0.6, "time": 1.5}, "Q4_0": {"peak": 0.4, "time": 1.5}}  # of the bf16 row's


def build(preset: str, cache: Path, qtypes) -> dict:
    """{row name: aura_flow.load keywords}: the preset's random model in the transformer-only layout (text encoder,
    VAE and tokenizer beside it) and its transformer as a GGUF of each type, built once into ``cache``."""
    from safetensors.torch import load_file

    from aura_flow.tiny import PRESETS, build_tiny
    from aura_flow.weights.writers import write_gguf

    dest = cache / f"{preset}-transformer_only-seed0"
    source = dest / "aura_flow_tiny_transformer.safetensors"
    if not source.exists():  # build_tiny writes the transformer last
        t0 = time.perf_counter()
        build_tiny(dest, "transformer_only", preset=preset)
        print(f"built the {preset} model (transformer-only layout) in {time.perf_counter() - t0:.1f}s", flush=True)
    parts = {"text_encoder": dest / "text_encoder.safetensors", "vae": dest / "vae.safetensors",
             "tokenizer": dest / "tokenizer.model"}
    rows = {"bf16": {"checkpoint": source, **parts}}
    weights = None
    for q in qtypes:
        path = dest / f"aura_flow_{preset}_{q}.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            weights = weights if weights is not None else load_file(os.fspath(source))
            part = path.with_suffix(".part")
            write_gguf(part, weights, q, prefix="model.diffusion_model.",
                       head_dim=PRESETS[preset]["transformer"]["attention_head_dim"])
            os.replace(part, path)
            print(f"wrote {path.name} in {time.perf_counter() - t0:.1f}s", flush=True)
        rows[q] = {"checkpoint": path, **parts}
    return rows


def row(spec: str) -> None:
    """One row, in a fresh interpreter (see the module docstring): prints one JSON line."""
    spec = json.loads(spec)
    import torch  # noqa: F401  (imports are not part of the row's memory)
    from diffusers import AuraFlowTransformer2DModel, AutoencoderKL  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401

    import aura_flow
    import aura_flow.pipeline.pipeline  # noqa: F401
    from aura_flow.sampling.loop import prepare_noise
    from aura_flow.weights.devices import module_bytes

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    base = rss()
    t0 = time.perf_counter()
    pipe = aura_flow.load(**spec["load"], dtype="bf16", device="cpu")
    load_seconds = time.perf_counter() - t0
    size = spec["size"]
    noise = prepare_noise((1, 4, size // 8, size // 8), spec["seed"])
    params = dict(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], width=size, height=size,
                  steps=spec["steps"], cfg=spec["cfg"], seed=spec["seed"], sampler="euler", scheduler="normal",
                  shift=1.73, noise=noise)
    image = pipe.generate(**params).tensor[0]  # warm-up
    stages = {}  # the peak of each stage of generate (prompts, sampling, decoding), above `base`

    @contextlib.contextmanager
    def stage(parts):
        with Peak("cpu") as peak:  # resets the high-water mark: stages run one after the other
            yield
        stages[parts[0]] = max(stages.get(parts[0], 0), peak.peak - base)

    times, others = [], []
    for _ in range(spec["repeats"]):
        with OtherLoad() as other:
            t0 = time.perf_counter()
            image = pipe.generate(**params, stage=stage).tensor[0]
            times.append(time.perf_counter() - t0)
        others.append(other.cores or 0.0)
    torch.save(image, spec["image"])
    print(json.dumps({"seconds": min(times), "seconds_max": max(times), "peak_bytes": max(stages.values()),
                      "stage_peak_bytes": stages, "rss_after_load_bytes": rss() - base,
                      "load_seconds": load_seconds, "transformer_bytes": module_bytes(pipe.transformer),
                      "text_encoder_bytes": module_bytes(pipe.text_encoder), "vae_bytes": module_bytes(pipe.vae),
                      "other_load_cores": sum(others) / len(others)}))


def gguf_rows(args) -> dict:
    """The bf16 row and one per ``args.gguf`` type, at the smallest of ``args.sizes``."""
    import tempfile

    import torch

    from aura_flow.pipeline.speed import psnr

    size = min(args.sizes)
    specs = build(args.preset, args.cache, args.gguf)
    out = {"size": size, "steps": args.steps, "repeats": args.repeats, "compute_dtype": "bf16", "rows": {},
           "goals": {q: GOALS[q] for q in args.gguf if q in GOALS}}
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        images = {}
        for name, load in specs.items():
            print(f"GGUF rows: {name}", flush=True)
            images[name] = Path(tmp) / f"{name}.pt"
            spec = json.dumps({"load": {k: str(v) for k, v in load.items()}, "size": size, "steps": args.steps,
                               "cfg": args.cfg, "seed": args.seed, "prompt": args.prompt,
                               "negative_prompt": args.negative_prompt, "repeats": max(1, args.repeats),
                               "threads": args.threads, "image": str(images[name])})
            code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.gguf_rows import row; "
                    f"row({spec!r})")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"GGUF row {name} failed:\n{proc.stderr[-2000:]}")
            out["rows"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        reference = torch.load(images["bf16"])
        for name, r in out["rows"].items():
            r["psnr_vs_bf16_db"] = min(psnr(torch.load(images[name]), reference), 999.0)
    base = out["rows"]["bf16"]
    out["targets"] = {q: {"time": out["rows"][q]["seconds"] / base["seconds"] <= g["time"],
                          "peak": out["rows"][q]["peak_bytes"] / base["peak_bytes"] <= g["peak"]}
                      for q, g in out["goals"].items()}
    return out
