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
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--preset", "tiny", "--size", "64", "--steps", "2",
                           "--repeats", "1", "--modes", "fold_padding,cfg_cutoff,step_cache", "--cache",
                           str(tmp_path / "models"), "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["agreement"]["passed"] is True
    assert result["agreement"]["max_abs_diff"] <= result["agreement"]["tolerance"] == 1e-4
    assert set(result["runs"]) == {"pack", "diffusers", "pack[fold_padding]", "pack[cfg_cutoff]",
                                   "pack[step_cache]"}
    fields = ("seconds_per_image", "seconds_per_image_median", "seconds_per_step", "peak_memory_bytes",
              "speedup_vs_diffusers")
    for name, run in result["runs"].items():
        for field in fields:
            assert isinstance(run[field], (int, float)) and not isinstance(run[field], bool), (name, field)
            assert math.isfinite(run[field]) and run[field] >= 0, (name, field, run[field])
        if name != "pack":
            assert 0 <= run["max_abs_diff_vs_pack"] <= 1 and run["psnr_vs_pack_db"] > 0
    assert result["runs"]["pack[fold_padding]"]["max_abs_diff_vs_diffusers"] <= 1e-4
    for name in ("pack", "diffusers"):
        load = result["load"][name]
        assert load["seconds"] > 0 and load["peak_bytes"] >= 0 and load["peak_over_weights"] >= 0
    assert result["weight_bytes"] > 0 and result["steps"] == 2 and result["width"] == 64
    if (ROOT / "__init__.py").exists():
        assert 0 < result["import_seconds"] < 60
    numbers = list(_numbers(result))
    assert len(numbers) > 40 and all(math.isfinite(v) for _, v in numbers), numbers
    assert "agreement pack vs diffusers" in proc.stdout  # the table is printed too
