"""The GPU check (benchmarks/gpu_check.py, issue 23): its pieces here, its CPU dry run (heavy), and the CUDA-only
tests it runs as its row 5 on a lent GPU (their names hold "cuda"; skipped here with the reason row 5 looks for)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from aura_flow.weights.writers import quantize_q8_0, write_gguf

ROOT = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def awkward_values(shape, seed=0) -> np.ndarray:
    """Values that test the rounding: mixed magnitudes per block, a zero block, exact .5 ties after scaling,
    bf16-representable values (the model's own), negative zero."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(1e-4, 30, size=(*shape[:-1], 1)).astype(np.float32)
    flat = x.reshape(-1, 32)
    flat[0] = 0.0
    flat[1] = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5] * 4, dtype=np.float32)
    flat[2] = torch.from_numpy(flat[2].copy()).bfloat16().float().numpy()
    flat[3, 5] = -0.0
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 32), (64, 256), (3, 5, 96), (96, 3072)])
def test_q8_0_quantizer_equals_gguf_py_byte_for_byte(device, shape):
    x = awkward_values(shape)
    want = gguf.quants.quantize(x, Q.Q8_0)
    got = quantize_q8_0(torch.from_numpy(x).to(device)).cpu().numpy()
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} bytes differ"


def test_write_gguf_through_the_torch_quantizer_writes_the_same_file(tmp_path):
    from aura_flow.tiny import build_modules, transformer_to_original

    sd = transformer_to_original(build_modules("tiny")[0].state_dict())
    a = write_gguf(tmp_path / "a.gguf", sd, "Q8_0", prefix="model.diffusion_model.", head_dim=8)
    b = write_gguf(tmp_path / "b.gguf", sd, "Q8_0", prefix="model.diffusion_model.", head_dim=8, device="cpu")
    assert a.read_bytes() == b.read_bytes()
    assert any(t.tensor_type == Q.Q8_0 for t in gguf.GGUFReader(b).tensors)


def test_transformer_flops_match_the_issue_and_a_hand_count():
    from aura_flow.tiny import transformer_config
    from benchmarks.gpu_rows import transformer_flops

    full = transformer_flops(transformer_config("full"), 1024, 1024) * 25 * 2
    assert 2.1e15 < full < 2.3e15  # the issue: about 2.2 PFLOP for 1024^2, 25 steps, cfg (two calls a step)
    # tiny: width 32, ff hidden 128 (diffusers: 2/3 of 4x, rounded up to 256 -> 256), 1 joint + 1 single block
    cfg = transformer_config("tiny")
    img, txt, w = (64 // 8 // 2) ** 2, 256 + 8, 32
    ff = 256
    joint = (img + txt) * (4 * w * w + 3 * w * ff) + 2 * w * 6 * w + 2 * (img + txt) ** 2 * w
    single = (img + txt) * (4 * w * w + 3 * w * ff) + w * 6 * w + 2 * (img + txt) ** 2 * w
    assert transformer_flops(cfg, 64, 64) == 2 * (joint + single)


def test_the_table_shows_every_row_and_survives_missing_numbers():
    from benchmarks.gpu_report import table

    result = {"settings": {"preset": "full", "size": 1024, "steps": 25, "cfg": 5.0, "dtype": "bf16",
                           "device": "cuda"}, "env": {"gpu": "NVIDIA H200", "torch": "2.11.0"},
              "elapsed_seconds": 321.4, "budget_seconds": 450,
              "rows": {"1_build_load": {"status": "ok", "build": {"seconds": 41.0, "device": "cuda",
                                                                  "bytes_on_disk": 17 * 2**30},
                                        "load": {"seconds": 22.5, "parts_bytes": {"transformer": 13 * 2**30}}},
                       "2_pack_vs_diffusers": {"status": "ok", "floor": {"floor_seconds": 2.8},
                                               "runs": {"_rounds": 3, "pack": {"seconds_per_image_median": 3.5,
                                                                               "peak_bytes": 20 * 2**30,
                                                                               "vs_floor": 1.25}},
                                               "agreement": {"psnr_db": 47.5, "passed": True,
                                                             "max_abs_diff": 0.01}},
                       "3_fp8_gguf": {"status": "error", "error": "OutOfMemoryError: CUDA out of memory"},
                       "5_cuda_tests": {"status": "ok", "passed": 9, "failed": 0, "errors": 0, "skipped": 0},
                       "4_small_gpu": {"status": "skipped", "reason": "budget: 20s left, the row needs about 80s"}}}
    text = table(result)
    lines = text.splitlines()
    assert lines[0].startswith("GPU check: full preset, 1024x1024, 25 steps") and "NVIDIA H200" in lines[0]
    assert "321s of the 450s budget" in lines[0]
    pack = next(line for line in lines if line.startswith("2 pack "))
    assert pack.split()[2:5] == ["ok", "3.50", "20.0"] and "1.25x the 2.8s floor" in pack
    assert "47.5 dB (>= 40: yes)" in text and "built in 41.0s on cuda, 17.0 GiB on disk" in text
    assert any(line.startswith("3 fp8 / GGUF Q8_0") and "error" in line and "OutOfMemoryError" in line
               for line in lines)
    assert "9 passed, 0 failed" in text and "budget: 20s left" in text
    assert table({}).startswith("GPU check: None preset")  # nothing measured yet: still a table


def test_row_5_finds_the_gpu_only_tests_and_reads_pytests_report(tmp_path):
    from benchmarks.gpu_rows import cuda_test_files, junit_counts

    names = {p.name for p in cuda_test_files()}
    assert {"test_noise_device.py", "test_gpu_check.py"} <= names and "test_lora.py" not in names
    (tmp_path / "test_x.py").write_text("import pytest\n"
                                        "def test_a(): pass\n"
                                        "def test_b(): assert 1 == 2\n"
                                        "@pytest.mark.skipif(True, reason='needs a CUDA device')\n"
                                        "def test_c(): pass\n")
    xml = tmp_path / "r.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path / "test_x.py")], cwd=tmp_path, capture_output=True, timeout=120)
    counts = junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 0, 1)
    assert counts["failed_tests"] == ["test_x::test_b"]


@pytest.mark.parametrize("argv, message", [
    (["--size", "1000"], "--size=1000: give a multiple of 16"),
    (["--steps", "0"], "--steps=0: give at least 1"),
    (["--rows", "1,7"], "--rows=1,7: give row numbers 1-5"),
])
def test_bad_flags_are_named_before_any_work(tmp_path, argv, message):
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "o"), *argv],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- CUDA-only (row 5 of the check runs these)
@CUDA
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_cuda_gguf_dequantization_matches_the_cpu(qtype):
    from aura_flow.weights.gguf_dequant import dequantize
    from aura_flow.weights.writers import random_blocks

    blocks = random_blocks(Q[qtype], 512, np.random.default_rng(1))
    raw = torch.from_numpy(blocks.reshape(-1))
    n = 512 * gguf.GGML_QUANT_SIZES[Q[qtype]][0]
    cpu = dequantize(raw, Q[qtype], (n // 256, 256), torch.float32)
    gpu = dequantize(raw.cuda(), Q[qtype], (n // 256, 256), torch.float32)
    assert gpu.is_cuda and torch.isfinite(gpu).all()
    if qtype in ("Q8_0", "Q4_0"):  # one multiplication a value: IEEE float32 gives the same bits everywhere
        assert torch.equal(gpu.cpu(), cpu)
    else:
        assert torch.allclose(gpu.cpu(), cpu, rtol=1e-6, atol=1e-9)
    half = dequantize(raw.cuda(), Q[qtype], (n // 256, 256), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.cpu().float(), cpu, rtol=8e-3, atol=1e-9)


@CUDA
def test_cuda_fp8_layer_decodes_as_on_the_cpu_and_keeps_its_storage():
    from aura_flow.weights.quantized_linear import ScaledFp8Linear

    w = torch.randn(256, 128)
    scale = w.abs().amax(dim=1) / 448
    layer = ScaledFp8Linear((w / scale[:, None]).to(torch.float8_e4m3fn), scale, torch.randn(256))
    cpu = layer.compute_weight(torch.float32, torch.device("cpu"))
    layer.to("cuda")
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.is_cuda
    assert torch.equal(layer.compute_weight(torch.float32, torch.device("cuda")).cpu(), cpu)
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16 and torch.isfinite(layer(x)).all()


@CUDA
def test_cuda_pipeline_matches_the_cpu_and_offloading_changes_nothing(tmp_path):
    import aura_flow
    from aura_flow.pipeline.speed import psnr
    from aura_flow.tiny import build_tiny

    root = build_tiny(tmp_path, "diffusers")
    gen = dict(prompt="a fox", seed=3, steps=3, width=64, height=64, sampler="uni_pc")
    cpu = aura_flow.load(root, device="cpu").generate(**gen).tensor
    gpu_pipe = aura_flow.load(root, device="cuda", dtype="fp32", offload_text_encoder=False)
    gpu = gpu_pipe.generate(**gen).tensor
    assert psnr(gpu, cpu) > 40
    waiting = aura_flow.load(root, device="cuda", dtype="fp32", offload_text_encoder=True)
    assert waiting.part_device("text_encoder").type == "cpu"
    assert torch.equal(waiting.generate(**gen).tensor, gpu)
    assert waiting.part_device("text_encoder").type == "cpu"  # back on the CPU after encoding
    drawn = gpu_pipe.generate(**gen, noise_device="gpu")
    assert drawn.record["noise_device"] == "gpu" and not torch.equal(drawn.tensor, gpu)
    bf16 = aura_flow.load(root, device="cuda", dtype="bf16").generate(**gen).tensor
    assert psnr(bf16, cpu) > 30


# ---------------------------------------------------------------- the CPU dry run (CI)
@pytest.mark.heavy
def test_the_cpu_dry_run_fills_every_row(tmp_path, capsys):
    """The command CI runs (benchmarks/README.md, "GPU"): every row's code on the CPU, with numbers; its table goes
    to the test run's own output, so CI's log shows it."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--preset", "wide", "--steps", "2",
           "--size", "128", "--dtype", "fp32", "--repeats", "1", "--budget", "2400", "--out", str(out),
           "--cache", str(tmp_path / "cache")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["1_build_load", "2_pack_vs_diffusers", "3_fp8_gguf", "5_cuda_tests", "4_small_gpu"]
    assert rows["1_build_load"]["status"] == "ok" and rows["1_build_load"]["load"]["seconds"] > 0
    two = rows["2_pack_vs_diffusers"]
    assert two["status"] == "ok"
    for name in ("pack", "diffusers", "pack[uni_pc]"):
        assert two["runs"][name]["seconds_per_image_median"] > 0 and two["runs"][name]["vs_floor"] > 0
    assert two["agreement"]["psnr_db"] >= 40 and two["gpu_noise"]["psnr_db"] >= 40
    assert two["floor"]["flops_per_image"] > 0
    three = rows["3_fp8_gguf"]
    assert three["status"] == "ok" and three["gguf_write"]["bytes"] > 0
    for name in ("fp8_e4m3fn", "gguf_Q8_0"):
        assert three["runs"][name]["seconds_per_image_median"] > 0 and three["runs"][name]["psnr_vs_reference_db"] > 20
    five = rows["5_cuda_tests"]
    assert five["status"] == "skipped" and five["skipped"] >= 5 and five["failed"] == five["errors"] == 0
    four = rows["4_small_gpu"]
    assert four["status"] == "skipped" and "needs CUDA" in four["reason"]
    assert [a["dtype"] for a in four["attempts"]] == ["fp32", "fp8_e4m3fn"]
    assert all(a["ok"] and a["seconds_per_image"] > 0 for a in four["attempts"])
    text = (out / "gpu_check.txt").read_text()
    with capsys.disabled():
        sys.stdout.write("\n" + text)
    assert text in run.stdout and "2 pack vs diffusers" in text
