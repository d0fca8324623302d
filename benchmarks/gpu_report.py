"""The GPU check's environment record and its short text table (benchmarks/gpu_check.py)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

GIB = 2**30


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(args) -> dict:
    """Versions, the GPU, its driver, the machine's memory and the cache disk's free space."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           **{name: _version(name) for name in ("diffusers", "transformers", "gguf", "safetensors", "numpy",
                                                "torchsde", "huggingface-hub", "tokenizers")},
           "cpu_count": os.cpu_count(), "command": " ".join([sys.executable, "-m", "benchmarks.gpu_check",
                                                              *sys.argv[1:]])}
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        env["ram_total_gib"] = round(int(info["MemTotal"].split()[0]) / 2**20, 1)
        env["ram_available_gib"] = round(int(info["MemAvailable"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    cache = Path(args.cache)
    while not cache.exists():
        cache = cache.parent
    env["cache_disk_free_gib"] = round(shutil.disk_usage(cache).free / GIB, 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                   gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:200]
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
    return env


# ---------------------------------------------------------------- the table
def _num(value, fmt: str = "{:.2f}", missing: str = "-") -> str:
    return missing if value is None else fmt.format(value)


def _gib(value) -> str:
    return _num(None if value is None else value / GIB, "{:.1f}")


def _line(name: str, status: str, seconds=None, peak=None, note: str = "") -> str:
    return f"{name:<26} {status:<8} {_num(seconds):>8} {_gib(peak):>9}  {note}".rstrip()


def _row_lines(key: str, row: dict, settings: dict) -> list[str]:
    status = row.get("status", "?")
    label = {"1_build_load": "1 build + load", "2_pack_vs_diffusers": "2 pack vs diffusers",
             "3_fp8_gguf": "3 fp8 / GGUF Q8_0", "4_small_gpu": "4 small GPU", "5_cuda_tests": "5 CUDA tests"}.get(
        key, key)
    if status in ("skipped", "error") and not any(k in row for k in ("load", "runs", "attempts", "passed")):
        return [_line(label, status, note=(row.get("reason") or row.get("error") or "")[:150])]
    out = []
    if key == "1_build_load":
        b, ld = row.get("build", {}), row.get("load", {})
        built = "reused" if b.get("reused") else f"built in {_num(b.get('seconds'), '{:.1f}')}s on {b.get('device')}"
        out.append(_line("1 build (random weights)", status, note=f"{built}, {_gib(b.get('bytes_on_disk'))} GiB on "
                                                                  f"disk"))
        if ld:
            out.append(_line("1 aura_flow.load", status, note=f"{_num(ld.get('seconds'), '{:.1f}')}s, weights "
                                                                f"{_gib(sum(ld.get('parts_bytes', {}).values()))} GiB"))
    elif key == "2_pack_vs_diffusers":
        floor = row.get("floor", {}).get("floor_seconds")
        for name, r in row.get("runs", {}).items():
            if name.startswith("_") or "seconds_per_image_median" not in r:
                continue
            out.append(_line(f"2 {name}", status, r["seconds_per_image_median"], r.get("peak_bytes"),
                             f"{_num(r.get('vs_floor'), '{:.3g}')}x the {_num(floor, '{:.3g}')}s floor; working "
                             f"{_gib(r.get('working_bytes'))} GiB"))
        ag, gn = row.get("agreement"), row.get("gpu_noise")
        if ag:
            out.append(_line("2 PSNR pack vs diffusers", status, note=f"{ag['psnr_db']} dB (>= 40: "
                                                                      f"{'yes' if ag['passed'] else 'NO'}), max|diff| "
                                                                      f"{ag['max_abs_diff']}"))
        if gn and "skipped" in gn:
            out.append(_line("2 gpu noise vs diffusers", "skipped", note=gn["skipped"]))
        elif gn:
            out.append(_line("2 gpu noise vs diffusers", status, note=f"{gn.get('psnr_db')} dB (>= 40: "
                                                                      f"{'yes' if gn.get('passed') else 'NO'}), same "
                                                                      f"noise: {gn.get('noise_equal_after_rounding')}"))
        if "pack_speedup_vs_diffusers" in row:
            out.append(_line("2 pack vs diffusers", status, note=f"{row['pack_speedup_vs_diffusers']}x (medians)"))
    elif key == "3_fp8_gguf":
        ref = row.get("reference", {})
        out.append(_line(f"3 reference {settings.get('dtype', '')}", status, ref.get("seconds_per_image_median"),
                         ref.get("peak_bytes"), ref.get("name", "")))
        q = row.get("gguf_write", {})
        if "skipped" in q or "seconds" in q:
            out.append(_line("3 GGUF Q8_0 written", status, note=q.get("skipped") or f"{q['seconds']}s, "
                                                                                      f"{_gib(q.get('bytes'))} GiB"))
        for name, r in row.get("runs", {}).items():
            if name.startswith("_") or name == settings.get("dtype"):
                continue
            if "skipped" in r:
                out.append(_line(f"3 {name}", "skipped", note=r["skipped"]))
                continue
            out.append(_line(f"3 {name}", status, r.get("seconds_per_image_median"), r.get("peak_bytes"),
                             f"{_num(r.get('time_vs_reference'))}x time, {_num(r.get('peak_vs_reference'))}x peak, "
                             f"PSNR {r.get('psnr_vs_reference_db')} dB, load {r.get('load_seconds')}s"))
    elif key == "4_small_gpu":
        for a in row.get("attempts", []):
            note = (f"{a['dtype']}: load {a.get('load_seconds')}s, text encoder on CPU: "
                    f"{a.get('text_encoder_waits_on_cpu')}") if a.get("ok") else f"{a['dtype']}: {a.get('error')}"
            out.append(_line(f"4 {row.get('cap_gib', '?'):g} GiB cap", status, a.get("seconds_per_image"),
                             a.get("peak_bytes"), note[:150]))
        if row.get("reason"):
            out.append(_line("4 small GPU", status, note=row["reason"]))
    elif key == "5_cuda_tests":
        out.append(_line(label, status, note=f"{row.get('passed')} passed, {row.get('failed')} failed, "
                                            f"{row.get('errors')} errors, {row.get('skipped')} skipped"
                                            + (f" ({row['reason']})" if row.get("reason") else "")))
    if status == "error":
        out.append(_line(label, "error", note=row.get("error", "")[:150]))
    return out or [_line(label, status)]


def table(result: dict) -> str:
    """The short table: one line per measured thing (s/image: median; peak: weights on the device + the working
    memory of the run), then the environment in one line."""
    s, env = result.get("settings", {}), result.get("env", {})
    head = (f"GPU check: {s.get('preset')} preset, {s.get('size')}x{s.get('size')}, {s.get('steps')} steps, cfg "
            f"{s.get('cfg')}, {s.get('dtype')} on {s.get('device')} ({env.get('gpu') or 'no GPU'}); "
            f"{result.get('elapsed_seconds', 0):.0f}s of the {result.get('budget_seconds', 0):.0f}s budget")
    lines = [head, f"{'row':<26} {'status':<8} {'s/image':>8} {'peak GiB':>9}  notes"]
    for key, row in result.get("rows", {}).items():
        lines.extend(_row_lines(key, row, s))
    lines.append("env: " + ", ".join(f"{k} {env[k]}" for k in ("torch", "torch_cuda", "diffusers", "transformers",
                                                                 "gguf", "nvidia_smi", "cache_disk_free_gib")
                                     if env.get(k) is not None))
    return "\n".join(lines)
