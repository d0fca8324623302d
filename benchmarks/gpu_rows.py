"""The rows of the GPU check (benchmarks/gpu_check.py): each takes the `Check` and its row dict, fills the row
with numbers as they come (saving after each step), and hands on what later rows need in ``ck.state``."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.measure import REPO, Contender

GIB = 2**30
CUDA_MARK = "needs a CUDA device"  # the skip reason of the suite's CUDA-only tests: how row 5 finds their files


# ---------------------------------------------------------------- helpers
def _sync(ck) -> None:
    if ck.cuda:
        import torch

        torch.cuda.synchronize()


def _parts_bytes(pipe) -> dict:
    from aura_flow.weights.devices import module_bytes

    return {name: module_bytes(getattr(pipe, name)) for name in ("transformer", "text_encoder", "vae")}


def _device_bytes(pipe, device) -> int:
    """Bytes of the pipeline's parts that sit on ``device`` now (an offloaded text encoder does not count)."""
    import torch

    device = torch.device(device)
    return sum(b for name, b in _parts_bytes(pipe).items() if pipe.part_device(name).type == device.type)


def transformer_flops(config: dict, width: int, height: int, text_tokens: int = 256) -> float:
    """FLOPs of one transformer call on one image, from the shapes: every linear of every block (image-stream
    layers on the image tokens, context-stream layers on the text and register tokens, the single blocks' on
    both, the modulation layers on one vector) and the attention products (2 x tokens^2 x width multiply-adds
    a block). The embedders and the final layer are left out (under 0.1%)."""
    import torch
    from diffusers import AuraFlowTransformer2DModel

    from aura_flow.weights.configs import constructor_config

    with torch.device("meta"):
        model = AuraFlowTransformer2DModel(**constructor_config(AuraFlowTransformer2DModel, config, "flops"))
    p = model.config.patch_size
    image = (height // 8 // p) * (width // 8 // p)
    text = text_tokens + model.register_tokens.shape[1]
    width_ = model.config.num_attention_heads * model.config.attention_head_dim
    macs = 0
    for kind, blocks in (("joint", model.joint_transformer_blocks), ("single", model.single_transformer_blocks)):
        for block in blocks:
            for name, m in block.named_modules():
                if not isinstance(m, torch.nn.Linear):
                    continue
                if name.startswith("norm"):
                    tokens = 1
                elif kind == "single":
                    tokens = image + text
                else:
                    tokens = text if ("add_" in name or "context" in name) else image
                macs += tokens * m.in_features * m.out_features
            macs += 2 * (image + text) ** 2 * width_
    return 2.0 * macs


def _gen_args(ck) -> argparse.Namespace:
    a = ck.args
    return argparse.Namespace(prompt=a.prompt, negative_prompt=a.negative_prompt, width=a.size, height=a.size,
                              steps=a.steps, cfg=a.cfg, seed=a.seed, device=a.device)


def _time_contenders(ck, row_part: dict, contenders, repeats: int, reserve: float) -> None:
    """Warm each contender up, then alternate timed rounds (at most ``repeats``, fewer when the budget minus
    ``reserve`` would not hold them); fills ``row_part[name]``."""
    for c in contenders:
        ck.log(f"  warm-up: {c.name}")
        c.measure(ck.args.device, warmup=True)
        row_part[c.name] = {"warmup_seconds": round(c.warmup_seconds, 3)}
        ck.save()
    per_round = sum(c.warmup_seconds for c in contenders)
    rounds = max(1, min(repeats, int((ck.left() - reserve) // max(per_round, 1e-3))))
    row_part["_rounds"] = rounds
    for r in range(rounds):
        for c in (contenders if r % 2 == 0 else contenders[::-1]):
            c.measure(ck.args.device)
        for c in contenders:
            row_part[c.name].update(_summary(c))
        ck.log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{c.name} {c.times[-1]:.2f}s" for c in contenders))
        ck.save()


def _summary(c: Contender) -> dict:
    return {"seconds_per_image_median": round(statistics.median(c.times), 4), "seconds_per_image_best":
            round(min(c.times), 4), "times": [round(t, 4) for t in c.times], "working_bytes": max(c.peaks),
            "seconds_per_step": round(statistics.median(c.step_times), 5) if c.step_times else None}


def _psnr(a, b) -> float:
    from aura_flow.pipeline.speed import psnr

    return round(min(psnr(a, b), 999.0), 2)


# ---------------------------------------------------------------- row 1: build, save, load
def row_build_load(ck, row) -> None:
    import torch

    import aura_flow
    from aura_flow.tiny import build_tiny

    a = ck.args
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    folder = a.cache / f"{a.preset}-{a.dtype}-{a.device.split(':')[0]}-seed{a.seed}"
    root = folder / "diffusers"
    build = row["build"] = {"folder": str(root), "device": a.device, "dtype": a.dtype}
    if (root / "model_index.json").exists():  # written last by build_tiny: a whole model from an earlier run
        build["reused"] = True
    else:
        need = _preset_bytes(a.preset, dtype.itemsize) * 1.05
        free = shutil.disk_usage(_existing(a.cache)).free
        build["disk_free_bytes"] = free
        if free < need:
            raise RuntimeError(f"{a.cache}: {free / GIB:.1f} GiB free, the model needs {need / GIB:.1f} GiB; give "
                               f"--cache on a larger disk")
        shutil.rmtree(folder, ignore_errors=True)
        ck.log(f"building the {a.preset} preset on {a.device} ({a.dtype} files) under {folder}")
        t0 = time.perf_counter()
        build_tiny(folder, "diffusers", preset=a.preset, seed=a.seed, device=a.device, dtype=dtype)
        _sync(ck)
        build["seconds"] = round(time.perf_counter() - t0, 2)
        ck.free()
    build["bytes_on_disk"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    ck.log(f"model: {build['bytes_on_disk'] / GIB:.2f} GiB on disk" +
           (f", built in {build['seconds']}s" if "seconds" in build else " (reused)"))
    ck.save()
    ck.state["root"] = root
    t0 = time.perf_counter()
    pipe = aura_flow.load(root, device=a.device, dtype=a.dtype)
    _sync(ck)
    load = row["load"] = {"seconds": round(time.perf_counter() - t0, 2), "parts_bytes": _parts_bytes(pipe),
                          "offload_text_encoder": pipe.offload_text_encoder, "page_cache": "warm (just written)"
                          if "seconds" in build else "as left by the earlier run"}
    if ck.cuda:
        load["allocated_bytes"] = torch.cuda.memory_allocated()
    ck.log(f"aura_flow.load: {load['seconds']}s")
    ck.state.update(pipe=pipe, load_seconds=load["seconds"], parts_bytes=load["parts_bytes"])


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _preset_bytes(preset: str, itemsize: int) -> int:
    """Bytes of the preset's three parts at ``itemsize`` (shapes only, on the meta device)."""
    import torch
    from diffusers import AuraFlowTransformer2DModel, AutoencoderKL
    from transformers import UMT5EncoderModel

    from aura_flow.tiny import t5_config, transformer_config, vae_config

    with torch.device("meta"):
        parts = (AuraFlowTransformer2DModel(**transformer_config(preset)), UMT5EncoderModel(t5_config(preset, 96)),
                 AutoencoderKL(**vae_config(preset)))
    return sum(p.numel() for m in parts for p in m.parameters()) * itemsize


# ---------------------------------------------------------------- row 2: the pack against diffusers
def row_pack_vs_diffusers(ck, row) -> None:
    import torch

    from benchmarks.measure import load_diffusers
    from benchmarks.side_by_side import HALF_PSNR_DB, diffusers_contender, pack_contender
    from aura_flow.sampling.loop import prepare_noise

    a, pipe = ck.args, ck.state["pipe"]
    g = _gen_args(ck)
    t0 = time.perf_counter()
    dpipe = load_diffusers(ck.state["root"], a.device, a.dtype)
    dpipe.set_progress_bar_config(disable=True)
    _sync(ck)
    row["diffusers_load_seconds"] = round(time.perf_counter() - t0, 2)
    ck.log(f"diffusers loaded in {row['diffusers_load_seconds']}s")
    shape = (1, 4, a.size // 8, a.size // 8)
    noise = prepare_noise(shape, a.seed)  # ComfyUI's CPU noise, passed to diffusers as its latents
    contenders = [pack_contender(pipe, g, noise, name="pack"), diffusers_contender(dpipe, g, noise)]
    if a.sampler != "euler":
        contenders.append(pack_contender(pipe, g, noise, name=f"pack[{a.sampler}]", sampler=a.sampler))
    runs = row["runs"] = {}
    _time_contenders(ck, runs, contenders, a.repeats, reserve=estimate(ck, 3) + estimate(ck, 5))
    weights = {"pack": _device_bytes(pipe, a.device), "diffusers": sum(
        sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
        for m in (dpipe.transformer, dpipe.text_encoder, dpipe.vae))}
    for c in contenders:
        r = runs[c.name]
        r["weights_bytes"] = weights["diffusers" if c.name == "diffusers" else "pack"]
        r["peak_bytes"] = r["weights_bytes"] + r["working_bytes"]
    pack, diff = contenders[0], contenders[1]
    row["agreement"] = {"psnr_db": _psnr(pack.image, diff.image),
                        "max_abs_diff": round((pack.image - diff.image).abs().max().item(), 6),
                        "criterion_db": HALF_PSNR_DB if a.dtype != "fp32" else None, "sampler": "euler",
                        "compared": "pack (euler, generate's default speed) against diffusers (its flow-match euler)"}
    row["agreement"]["passed"] = row["agreement"]["psnr_db"] >= HALF_PSNR_DB
    flops = transformer_flops(dict(pipe.transformer.config), a.size, a.size)
    calls = a.steps * (2 if a.cfg != 1.0 else 1)
    floor = flops * calls / (a.peak_tflops * 1e12)
    row["floor"] = {"transformer_flops_per_call": flops, "calls": calls, "flops_per_image": flops * calls,
                    "peak_tflops": a.peak_tflops, "floor_seconds": round(floor, 4)}
    for name, r in runs.items():
        if not name.startswith("_"):
            r["vs_floor"] = round(r["seconds_per_image_median"] / floor, 3)
    d = runs["diffusers"]["seconds_per_image_median"]
    row["pack_speedup_vs_diffusers"] = round(d / runs["pack"]["seconds_per_image_median"], 3)
    ck.state.update(image_seconds=runs[contenders[-1].name]["seconds_per_image_median"],
                    reference=contenders[-1].image, reference_row=runs[contenders[-1].name])
    ck.save()

    # noise_device="gpu": the pack draws its start noise with the device's generator, as diffusers does
    need = 2 * ck.state["image_seconds"] + estimate(ck, 3) + estimate(ck, 5)
    if ck.left() < need:
        row["gpu_noise"] = {"skipped": f"budget: {ck.left():.0f}s left, needs about {need:.0f}s with rows 3 and 5"}
        return
    ck.log("  gpu noise: pack (noise_device='gpu') and diffusers (its own generator, same seed)")
    from diffusers.utils.torch_utils import randn_tensor

    dt = dpipe.transformer.dtype
    ours = prepare_noise(shape, a.seed, a.device)
    theirs = randn_tensor(shape, generator=torch.Generator(a.device).manual_seed(a.seed), device=torch.device(
        a.device), dtype=dt)
    gpu = row["gpu_noise"] = {"noise_equal_after_rounding": bool(torch.equal(ours.to(dt), theirs)),
                              "noise_max_abs_diff": (ours - theirs.float()).abs().max().item()}
    image = pipe.generate(prompt=a.prompt, negative_prompt=a.negative_prompt, width=a.size, height=a.size,
                          steps=a.steps, cfg=a.cfg, seed=a.seed, sampler="euler", scheduler="normal", shift=1.73,
                          noise_device="gpu").tensor[0]
    out = dpipe(prompt=a.prompt, negative_prompt=a.negative_prompt, height=a.size, width=a.size,
                num_inference_steps=a.steps, guidance_scale=a.cfg, output_type="np",
                generator=torch.Generator(a.device).manual_seed(a.seed))
    theirs_image = torch.from_numpy(out.images[0])
    gpu.update(psnr_db=_psnr(image, theirs_image), max_abs_diff=round((image - theirs_image).abs().max().item(), 6),
               psnr_vs_cpu_noise_db=_psnr(image, pack.image))
    gpu["passed"] = gpu["psnr_db"] >= HALF_PSNR_DB
    del dpipe, contenders, diff


# ---------------------------------------------------------------- row 3: fp8 storage and GGUF Q8_0 against bf16
def row_fp8_gguf(ck, row) -> None:
    import aura_flow
    from aura_flow.sampling.loop import prepare_noise
    from aura_flow.tiny import transformer_to_original
    from aura_flow.weights.writers import write_gguf
    from benchmarks.side_by_side import pack_contender

    a, root = ck.args, ck.state["root"]
    g = _gen_args(ck)
    noise = prepare_noise((1, 4, a.size // 8, a.size // 8), a.seed)
    pipe = ck.state.pop("pipe", None)
    if "reference" not in ck.state:  # row 2 did not run: time the bf16 pipeline here
        pipe = pipe or aura_flow.load(root, device=a.device, dtype=a.dtype)
        ref = pack_contender(pipe, g, noise, name=a.dtype, sampler=a.sampler)
        _time_contenders(ck, row.setdefault("runs", {}), [ref], 1, reserve=0)
        ck.state.update(reference=ref.image, reference_row=row["runs"][a.dtype],
                        image_seconds=row["runs"][a.dtype]["seconds_per_image_median"])
    base = ck.state["reference_row"]
    row["reference"] = {"name": f"{a.dtype}, the pack's {a.sampler} row", **{
        k: base.get(k) for k in ("seconds_per_image_median", "peak_bytes", "weights_bytes", "working_bytes")}}
    gguf_path = a.cache / f"{a.preset}-{a.dtype}-{a.device.split(':')[0]}-seed{a.seed}-Q8_0.gguf"
    q = row["gguf_write"] = {"path": str(gguf_path)}
    load, image = ck.state.get("load_seconds", 30), ck.state.get("image_seconds", 10)
    one = 1.5 * load + 2 * image + 10  # a quantized load, a warm-up and one timed image
    if pipe is None:
        pipe = aura_flow.load(root, device=a.device, dtype=a.dtype)
    transformer_bytes = _parts_bytes(pipe)["transformer"]
    free = shutil.disk_usage(_existing(a.cache)).free
    if gguf_path.exists():
        q["reused"] = True
    elif free < transformer_bytes * 0.6:
        q["skipped"] = f"{free / GIB:.1f} GiB free on {a.cache}, the GGUF needs {transformer_bytes * 0.55 / GIB:.1f}"
    elif ck.left() < 2 * one + 0.5 * load + estimate(ck, 5):
        q["skipped"] = f"budget: {ck.left():.0f}s left, fp8 and GGUF need about {2 * one + 0.5 * load:.0f}s"
    else:
        ck.log(f"  quantizing the transformer to GGUF Q8_0 ({'torch on ' + a.device if ck.cuda else 'gguf-py'})")
        t0 = time.perf_counter()
        sd = transformer_to_original(pipe.transformer.state_dict())
        part = gguf_path.with_suffix(".part")
        write_gguf(part, sd, "Q8_0", prefix="model.diffusion_model.", device=a.device if ck.cuda else None,
                   head_dim=pipe.transformer.config.attention_head_dim)
        os.replace(part, gguf_path)
        del sd
        q.update(seconds=round(time.perf_counter() - t0, 2), bytes=gguf_path.stat().st_size)
        ck.log(f"  wrote {q['bytes'] / GIB:.2f} GiB in {q['seconds']}s")
    del pipe
    ck.free()
    ck.save()
    rows = [("fp8_e4m3fn", dict(checkpoint=root, dtype="fp8_e4m3fn"))]
    if gguf_path.exists():
        rows.append(("gguf_Q8_0", dict(checkpoint=gguf_path, text_encoder=root / "text_encoder", vae=root / "vae",
                                       tokenizer=root / "tokenizer", dtype=a.dtype)))
    runs = row.setdefault("runs", {})
    for i, (name, kw) in enumerate(rows):
        if ck.left() < one:
            runs[name] = {"skipped": f"budget: {ck.left():.0f}s left, needs about {one:.0f}s"}
            continue
        ck.log(f"  loading {name}")
        t0 = time.perf_counter()
        qpipe = aura_flow.load(device=a.device, **kw)
        _sync(ck)
        load_seconds = round(time.perf_counter() - t0, 2)
        c = pack_contender(qpipe, g, noise, name=name, sampler=a.sampler)
        later = (len(rows) - 1 - i) * one + estimate(ck, 5)  # what the rows after it need
        _time_contenders(ck, runs, [c], a.repeats, reserve=later)
        r = runs[name]
        r.update(load_seconds=load_seconds, weights_bytes=_device_bytes(qpipe, a.device),
                 transformer_bytes=_parts_bytes(qpipe)["transformer"])
        r["peak_bytes"] = r["weights_bytes"] + r["working_bytes"]
        r["psnr_vs_reference_db"] = _psnr(c.image, ck.state["reference"])
        if base.get("seconds_per_image_median"):
            r["time_vs_reference"] = round(r["seconds_per_image_median"] / base["seconds_per_image_median"], 3)
        if base.get("peak_bytes"):
            r["peak_vs_reference"] = round(r["peak_bytes"] / base["peak_bytes"], 3)
        del qpipe, c
        ck.free()
        ck.save()


# ---------------------------------------------------------------- row 4: a small GPU, in a subprocess
def row_small_gpu(ck, row) -> None:
    a = ck.args
    ck.state.pop("pipe", None)  # the parent's copy is not the subprocess's, but free the device for it anyway
    ck.free()
    row["cap_gib"] = a.small_gib
    if not ck.cuda:
        row["status"] = "skipped"
        row["reason"] = "needs CUDA (the memory cap is torch.cuda's); the same code ran on the CPU without a cap"
    parts = ck.state.get("parts_bytes") or {}
    if parts:
        from aura_flow.weights.devices import WORKING_MEMORY

        need = sum(parts.values()) + WORKING_MEMORY
        row["bf16_needs_bytes"] = need
        row["bf16_needs"] = (f"{a.dtype} needs about {need / GIB:.1f} GiB on the device (transformer "
                             f"{parts['transformer'] / GIB:.1f}, text encoder {parts['text_encoder'] / GIB:.1f}, VAE "
                             f"{parts['vae'] / GIB:.1f}, working memory {WORKING_MEMORY / GIB:.0f}); without the text "
                             f"encoder {(need - parts['text_encoder']) / GIB:.1f} GiB")
    spec = {"root": str(ck.state["root"]), "device": a.device, "dtype": a.dtype, "cap_gib": a.small_gib,
            "size": a.size, "steps": a.steps, "cfg": a.cfg, "seed": a.seed, "sampler": a.sampler,
            "prompt": a.prompt, "negative_prompt": a.negative_prompt, "all": not ck.cuda}
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.gpu_small import main; main()"
    timeout = max(5.0, ck.left() - 5)
    ck.log(f"  subprocess, {timeout:.0f}s at most")
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                              timeout=timeout, env=_env())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the small-GPU subprocess ran past {timeout:.0f}s (the budget) and was stopped") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the small-GPU subprocess exited with {proc.returncode}: {proc.stdout[-1500:]}")
    row["attempts"] = json.loads(lines[-1])["attempts"]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error",
                DIFFUSERS_VERBOSITY="error", HF_HUB_OFFLINE="1")


# ---------------------------------------------------------------- row 5: the CUDA-only tests
def cuda_test_files(tests: Path = REPO / "tests") -> list[Path]:
    """The test files that hold CUDA-only tests (skipped with the reason `CUDA_MARK` where there is no GPU)."""
    return [p for p in sorted(tests.glob("test_*.py")) if CUDA_MARK in p.read_text(encoding="utf-8")]


def junit_counts(xml_file: Path) -> dict:
    """passed/failed/errors/skipped and the names of the failed tests, from pytest's --junitxml file."""
    root = ET.parse(xml_file).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.findall("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
            "failed": count["failures"], "errors": count["errors"], "skipped": count["skipped"], "failed_tests": failed}


def row_cuda_tests(ck, row) -> None:
    files = cuda_test_files()
    xml = ck.args.out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", f"--junitxml={xml}",
           *[str(f.relative_to(REPO)) for f in files]]
    row["command"] = " ".join(cmd[1:])
    timeout = max(5.0, min(300.0, ck.left() - 5))
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pytest ran past {timeout:.0f}s and was stopped") from None
    row["exit_status"] = proc.returncode
    row["output_tail"] = (proc.stdout + proc.stderr)[-1500:]
    if not xml.exists():
        raise RuntimeError(f"pytest exited with {proc.returncode} and wrote no report: {row['output_tail']}")
    row.update(junit_counts(xml))
    xml.unlink()
    ck.log(f"  {row['passed']} passed, {row['failed']} failed, {row['errors']} errors, {row['skipped']} skipped")
    if not ck.cuda:
        row["status"], row["reason"] = "skipped", "needs CUDA (the tests ran and skipped themselves)"
    elif row["failed"] or row["errors"] or proc.returncode not in (0, 5):
        row["status"] = "failed"


# ---------------------------------------------------------------- estimates and the table of rows
ROW_FUNCTIONS = {1: row_build_load, 2: row_pack_vs_diffusers, 3: row_fp8_gguf, 4: row_small_gpu, 5: row_cuda_tests}


def estimate(ck, number: int) -> float:
    """Seconds row ``number`` needs at the least (a load, a warm-up and one timed image of each contender), from
    the load and image times earlier rows measured."""
    load, image = ck.state.get("load_seconds"), ck.state.get("image_seconds")
    if number == 5:
        return 40.0
    if number == 1 or load is None:
        return 10.0
    image = image or 10.0
    if number == 2:
        return load + 7 * image
    if number == 3:
        return 1.5 * load + 2 * image + 10  # fp8 alone; the GGUF runs when there is time for both
    return 2 * load + 2 * image + 20
