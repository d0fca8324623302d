"""The benchmark command runs end to end on the tiny preset and emits JSON whose numbers are numbers and whose
agreement check passed. No timing is asserted: timing lives in the benchmark's own output."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _numbers(tree, path=""):
    """Every numeric leaf of a JSON tree as (path, value); bools and strings are not numbers."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.mark.heavy
def test_benchmark_command_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--preset", "tiny", "--size", "64,96", "--steps",
                           "2", "--repeats", "1", "--modes", "fold_padding,cfg_cutoff,step_cache", "--cache",
                           str(tmp_path / "models"), "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [s["width"] for s in result["sizes"]] == [64, 96]  # two sizes side by side, one model load
    size = result["sizes"][0]
    assert size["agreement"]["passed"] is True and result["sizes"][1]["agreement"]["passed"] is True
    assert size["agreement"]["max_abs_diff"] <= size["agreement"]["tolerance"] == 1e-4
    assert set(size["runs"]) == {"pack", "pack[exact]", "diffusers", "pack[fold_padding]", "pack[cfg_cutoff]",
                                 "pack[step_cache]"}
    fields = ("seconds_per_image", "seconds_per_image_median", "seconds_per_step", "peak_memory_bytes",
              "speedup_vs_diffusers", "speedup_vs_exact", "speedup_vs_default", "spread")
    for name, run in size["runs"].items():
        for field in fields:
            assert isinstance(run[field], (int, float)) and not isinstance(run[field], bool), (name, field)
            assert math.isfinite(run[field]) and run[field] >= 0, (name, field, run[field])
        assert 0 <= run["max_abs_diff_vs_exact"] <= 1 and run["psnr_vs_exact_db"] > 0
        assert run["seconds_per_image_max"] >= run["seconds_per_image_median"] >= run["seconds_per_image"]
        assert run["other_load_cores"] is None or run["other_load_cores"] >= 0  # None only without /proc/stat
    runs = size["runs"]
    assert runs["pack[exact]"]["max_abs_diff_vs_exact"] == 0 and runs["pack[exact]"]["speedup_vs_exact"] == 1
    assert runs["pack"]["speedup_vs_default"] == 1
    # the default on the CPU is the lossless fold: the same image as pack[fold_padding], within 1e-4 of diffusers
    for name in ("pack", "pack[fold_padding]"):
        assert runs[name]["max_abs_diff_vs_diffusers"] <= 1e-4
    assert 0 < runs["pack"]["max_abs_diff_vs_exact"] < 1e-4
    assert size["ratio"] == runs["pack"]["speedup_vs_diffusers"] and size["ratio_worst"] <= size["ratio"]
    assert len(result["machine"]["loadavg"]) == 3 and result["cpu_gemm"] in ("onednn", "blas")
    for name in ("pack", "diffusers"):
        load = result["load"][name]
        assert load["seconds"] > 0 and load["peak_bytes"] >= 0 and load["peak_over_weights"] >= 0
        assert load["library_code_bytes"] >= 0
    assert result["weight_bytes"] > 0 and result["steps"] == 2
    if (ROOT / "__init__.py").exists():
        assert 0 < result["import_seconds"] < 60
    numbers = list(_numbers(result))
    assert len(numbers) > 40 and all(math.isfinite(v) for _, v in numbers), numbers
    assert "agreement pack and pack[exact] vs diffusers" in proc.stdout  # the tables are printed too
    assert "side by side" in proc.stdout and "other load" in proc.stdout


@pytest.mark.heavy
def test_benchmark_in_half_precision_compares_like_with_like(tmp_path):
    """--dtype bf16 loads both pipelines in bf16 (VAE in fp32): diffusers rounds its latent to bf16 every step and
    the pack does not, so the images are held to a PSNR rather than to 1e-4."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--preset", "tiny", "--size", "64", "--steps", "2",
                           "--repeats", "1", "--modes", "", "--dtype", "bf16", "--cache", str(tmp_path / "models"),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    size = result["sizes"][0]
    assert result["dtype"] == "bfloat16" and set(size["runs"]) == {"pack", "pack[exact]", "diffusers"}
    agreement = size["agreement"]
    assert agreement["passed"] is True and agreement["criterion"] == "PSNR >= 40 dB"
    assert 40 <= agreement["psnr_db"] < 999 and agreement["max_abs_diff"] > 0  # bf16 rounding, not a copy
    from safetensors.torch import load_file

    numel = {part: sum(t.numel() for f in (tmp_path / "models").rglob(f"{part}/*.safetensors")
                       for t in load_file(f).values()) for part in ("transformer", "text_encoder", "vae")}
    # transformer and text encoder at 2 bytes an element, the VAE (fp32 in both pipelines) at 4
    assert result["weight_bytes"] == 2 * (numel["transformer"] + numel["text_encoder"]) + 4 * numel["vae"]
    assert "pack_1.25x_vs_diffusers_at_40dB" in size["targets"]


@pytest.mark.heavy
def test_wide_preset_builds_and_runs_a_step(tmp_path):
    """The benchmark's default preset: AuraFlow's real widths (12 heads x 256, 2048-wide text, the 96x96 position
    grid, the real VAE) with one block of each kind, built and run for one step at a small size in both pipelines."""
    from aura_flow.tiny import transformer_config

    cfg = transformer_config("wide")
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["joint_attention_dim"]) == (12, 256, 2048)
    assert cfg["pos_embed_max_size"] == 96 * 96
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--size", "64", "--steps", "1", "--repeats",
                           "1", "--cache", str(tmp_path / "models"), "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["preset"] == "wide" and result["steps"] == 1
    size = result["sizes"][0]
    assert size["width"] == 64 and size["agreement"]["passed"] is True
    assert set(size["runs"]) == {"pack", "pack[exact]", "diffusers"}  # no lossy modes by default on wide
