"""The benchmark's printed report: a table per image size, the sizes side by side, loading, the GGUF rows."""
from __future__ import annotations

MIB = 2**20


def _load(r: dict) -> str:
    """Other work on the machine during a contender's timed runs, in CPU cores (mean / max)."""
    if r.get("other_load_cores") is None:
        return f"{'n/a':>9}"
    return f"{r['other_load_cores']:4.2f}/{r['other_load_cores_max']:4.2f}"


def size_table(result: dict, size: dict) -> list[str]:
    lines = [f"AuraFlow {result['preset']} preset, {size['width']}x{size['height']}, {result['steps']} steps, cfg "
             f"{result['cfg']}, euler/normal, {result['dtype']}, {result['device']} ({result['threads']} threads, torch "
             f"{result['torch']}, fp32 CPU GEMM {result.get('cpu_gemm', '?')}), best of {result['repeats']} "
             f"alternating runs",
             "",
             f"{'contender':<20} {'s/image':>8} {'median':>8} {'spread':>7} {'other load':>10} {'s/step':>8} "
             f"{'peak MiB':>9} {'vs diffusers':>13} {'vs exact':>9} {'vs default':>11} {'max|diff|':>10} "
             f"{'PSNR dB':>8}",
             "(pack = generate's default speed, pack[exact] = speed=None, the reference of max|diff| and PSNR; spread ="
             " slowest/fastest repeat - 1; other load = other work on the machine while it ran, CPU cores mean/max)"]
    for name, r in size["runs"].items():
        vs = (f"{r['max_abs_diff_vs_exact']:10.2e} {r['psnr_vs_exact_db']:8.1f}" if name != "pack[exact]"
              else f"{'(reference)':>19}")
        lines.append(f"{name:<20} {r['seconds_per_image']:8.3f} {r['seconds_per_image_median']:8.3f} "
                     f"{100 * r['spread']:6.1f}% {_load(r):>10} {r['seconds_per_step']:8.4f} "
                     f"{r['peak_memory_bytes'] / MIB:9.1f} {r['speedup_vs_diffusers']:12.2f}x "
                     f"{r['speedup_vs_exact']:8.2f}x {r['speedup_vs_default']:10.2f}x {vs}")
        if r.get("warmup_seconds") and r["warmup_seconds"] > 3 * r["seconds_per_image"]:
            lines.append(f"{'':<20} (first call {r['warmup_seconds']:.1f}s: build and warm-up)")
    a = size["agreement"]
    lines += ["", f"agreement pack and pack[exact] vs diffusers: max abs diff {a['max_abs_diff']:.2e}, PSNR "
                  f"{a['psnr_db']:.1f} dB ({'passed' if a['passed'] else 'FAILED'}: {a['criterion']})",
              f"pack prompt encoding when not cached: {size['pack_prompt_encode_seconds']:.3f}s (both prompts; "
              f"diffusers encodes on every call, the pack caches repeated prompts)",
              f"load average (1 min) before/after: {size['loadavg_before'][0]:.2f}/{size['loadavg_after'][0]:.2f}"]
    lines += [f"target {k}: {v}" for k, v in size["targets"].items()]
    return lines


def _per_step(size: dict, name: str) -> float:
    """diffusers' seconds a step over ``name``'s (the transformer without the VAE and the prompts; nan for 1 step)."""
    return size["runs"]["diffusers"]["seconds_per_step"] / size["runs"][name]["seconds_per_step"]


def side_by_side(result: dict) -> list[str]:
    """The sizes next to each other: seconds per image and the ratios (best; in brackets the worst case, the pack's
    slowest repeat against diffusers' fastest)."""
    rows = [("diffusers s/image", lambda s: f"{s['runs']['diffusers']['seconds_per_image']:.2f}"),
            ("pack[exact] s/image", lambda s: f"{s['runs']['pack[exact]']['seconds_per_image']:.2f}"),
            ("pack s/image", lambda s: f"{s['runs']['pack']['seconds_per_image']:.2f}"),
            ("pack vs diffusers", lambda s: f"{s['ratio']:.2f}x ({s['ratio_worst']:.2f}x)"),
            ("pack[exact] vs diffusers", lambda s: f"{s['ratio_exact']:.2f}x ({s['ratio_exact_worst']:.2f}x)"),
            ("pack vs diffusers, a step", lambda s: f"{_per_step(s, 'pack'):.2f}x"),
            ("pack[exact] vs diffusers, a step", lambda s: f"{_per_step(s, 'pack[exact]'):.2f}x")]
    if any("comfyui" in s["runs"] for s in result["sizes"]):
        rows.append(("comfyui vs diffusers", lambda s: f"{s['runs']['comfyui']['speedup_vs_diffusers']:.2f}x"
                     if "comfyui" in s["runs"] else "-"))
    rows += [("max |diff| vs diffusers", lambda s: f"{s['agreement']['max_abs_diff']:.1e}"),
             ("largest spread", lambda s: f"{100 * max(r['spread'] for r in s['runs'].values()):.0f}%"),
             ("other load, cores (mean)", lambda s: "n/a" if s["runs"]["pack"].get("other_load_cores") is None else
              f"{sum(r['other_load_cores'] for r in s['runs'].values()) / len(s['runs']):.2f}")]
    sizes = result["sizes"]
    lines = ["", "side by side (ratios: best of the repeats; in brackets the pack's slowest repeat against diffusers' "
                 "fastest)", f"{'':<26}" + "".join(f"{str(s['width']) + 'x' + str(s['height']):<19}" for s in sizes)]
    for label, cell in rows:
        lines.append(f"{label:<26}" + "".join(f"{cell(s):<19}" for s in sizes))
    return lines


def gguf_table(rows: dict) -> list[str]:
    lines = ["", f"GGUF, each row in its own interpreter ({rows['size']}x{rows['size']}, {rows['steps']} steps, "
                 f"compute {rows['compute_dtype']}, best of {rows['repeats']}; peak = the process's peak RSS while "
                 f"generating, above it after imports)",
             f"{'row':<8} {'s/image':>8} {'vs bf16':>8} {'peak MiB':>9} {'vs bf16':>8} {'sampling':>9} {'vs bf16':>8} "
             f"{'decoding':>9} {'transformer':>12} {'vs bf16':>8} {'PSNR dB':>8} {'other load':>10}  goal (issue 10)"]
    base = rows["rows"]["bf16"]
    for name, r in rows["rows"].items():
        goal = rows["goals"].get(name)
        met = "" if goal is None else (f"time <= {goal['time']}x: {r['seconds'] / base['seconds'] <= goal['time']}, "
                                       f"peak <= {goal['peak']}x: {r['peak_bytes'] / base['peak_bytes'] <= goal['peak']}")
        sampling, decoding = (r["stage_peak_bytes"][k] for k in ("transformer", "vae"))
        lines.append(f"{name:<8} {r['seconds']:8.2f} {r['seconds'] / base['seconds']:7.2f}x "
                     f"{r['peak_bytes'] / MIB:9.0f} {r['peak_bytes'] / base['peak_bytes']:7.2f}x {sampling / MIB:9.0f} "
                     f"{sampling / base['stage_peak_bytes']['transformer']:7.2f}x {decoding / MIB:9.0f} "
                     f"{r['transformer_bytes'] / MIB:12.0f} {r['transformer_bytes'] / base['transformer_bytes']:7.2f}x "
                     f"{'(ref)' if name == 'bf16' else format(r['psnr_vs_bf16_db'], '.1f'):>8} "
                     f"{r['other_load_cores']:10.2f}  {met}")
    parts = {k: base[f"{k}_bytes"] / MIB for k in ("text_encoder", "vae")}
    lines.append(f"(MiB; sampling/decoding: the peak of that stage; the rows share the text encoder "
                 f"{parts['text_encoder']:.0f} MiB and the VAE {parts['vae']:.0f} MiB, which GGUF does not quantize)")
    return lines


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; load average before {m['loadavg'][0]:.2f}, after "
             f"{m.get('loadavg_after', [float('nan')])[0]:.2f}"]
    for size in result["sizes"]:
        lines += ["", *size_table(result, size)]
    if len(result["sizes"]) > 1:
        lines += side_by_side(result)
    lines += ["", f"{'load':<20} {'seconds':>8} {'peak MiB':>9} {'peak/weights':>13} {'lib code MiB':>13}   "
                  f"(weights {result['weight_bytes'] / MIB:.1f} MiB, fresh interpreter, every weight read once; "
                  f"library code paged in is not counted in the peak)"]
    for name, r in result["load"].items():
        lines.append(f"{name:<20} {r['seconds']:8.3f} {r['peak_bytes'] / MIB:9.1f} {r['peak_over_weights']:12.2f}x "
                     f"{r['library_code_bytes'] / MIB:13.1f}")
    if "import_seconds" in result:
        lines.append(f"\npack import (as ComfyUI imports the folder): {result['import_seconds']:.3f}s"
                     f"{' (loads torch)' if result['import_loads_torch'] else ''}")
    if result.get("gguf"):
        lines += gguf_table(result["gguf"])
    lines += [f"target {k}: {v}" for k, v in result["targets"].items()]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
