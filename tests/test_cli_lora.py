"""``--lora PATH[:STRENGTH]`` and ``--noise-device`` on ``generate`` and ``demo``: parsed (Windows drive letters too),
checked before the model loads with errors in flag words, applied, and recorded in the images' metadata."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import aura_flow
from aura_flow.cli import main
from aura_flow.cli.flags import parse_lora_flag
from aura_flow.errors import ParameterError
from aura_flow.images import read_metadata
from aura_flow.provenance import file_hash
from lora_files import LAYERS_A, LAYERS_B, write_lora
from workflow_exec import ROOT

SMALL = ["--steps", "2", "--width", "64", "--height", "64", "--sampler", "euler", "--seed", "9"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_loras")
    return (write_lora(folder / "style_a.safetensors", LAYERS_A, seed=1),
            write_lora(folder / "char_b.safetensors", LAYERS_B, seed=2, style="peft"))


def test_cli_generate_with_loras_writes_the_record(tiny_models, loras, tmp_path, capsys):
    files = tiny_models["transformer_only"]
    args = ["generate", "--checkpoint", str(files["checkpoint"]), "--text-encoder", str(files["text_encoder"]),
            "--vae", str(files["vae"]), "--dtype", "fp32", "--device", "cpu", "--prompt", "a fox",
            "--lora", f"{loras[0]}:0.5", "--lora", str(loras[1]), "--output-format", "png", "--out",
            str(tmp_path / "out"), *SMALL]
    assert main(args) == 0
    (path,) = capsys.readouterr().out.split()
    meta = read_metadata(path)
    assert meta["parameters"]["seed"] == 9 and meta["parameters"]["prompt"] == "a fox"
    record = meta["auraflow"]
    assert [(lora["name"], lora["strength"]) for lora in record["loras"]] == [("style_a.safetensors", 0.5),
                                                                              ("char_b.safetensors", 1.0)]
    assert record["checkpoint"]["hash"] == file_hash(files["checkpoint"]) and record["noise_device"] == "cpu"
    # the same image as the Python API with the same LoRAs
    pipe = aura_flow.load(**files, dtype="fp32", device="cpu", loras=[(loras[0], 0.5), (loras[1], 1.0)])
    want = pipe.generate(prompt="a fox", seed=9, steps=2, width=64, height=64, sampler="euler").images[0]
    assert Image.open(path).tobytes() == want.tobytes()


def test_lora_flag_parsing_and_errors_in_flag_words(tiny_models, loras, tmp_path, capsys):
    assert parse_lora_flag("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_flag("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_flag("style.safetensors:-1.5") == ("style.safetensors", -1.5)
    assert parse_lora_flag(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
    assert parse_lora_flag(r"C:\loras\style.safetensors:0.25") == (r"C:\loras\style.safetensors", 0.25)
    assert parse_lora_flag("C:style.safetensors") == ("C:style.safetensors", 1.0)  # a drive-relative path
    with pytest.raises(ParameterError, match=r"--lora style.safetensors:abc: 'abc' after the last ':' is not a "
                                             r"strength; write PATH:STRENGTH with a number"):
        parse_lora_flag("style.safetensors:abc")
    with pytest.raises(ParameterError, match=r"strength 11 is out of range; allowed: -10 to 10"):
        parse_lora_flag("style.safetensors:11")
    with pytest.raises(ParameterError, match="out of range"):
        parse_lora_flag("style.safetensors:nan")
    files = tiny_models["transformer_only"]
    base = ["generate", "--checkpoint", str(files["checkpoint"]), "--out", str(tmp_path / "o"), *SMALL]
    assert main(base + ["--lora", f"{loras[0]}:12"]) == 2
    assert f"error: --lora {loras[0]}:12: strength 12 is out of range" in capsys.readouterr().err
    assert main(base + ["--lora", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --lora {tmp_path / 'missing.safetensors'}: ") and "LoRA file not found" in err
    assert main(base + ["--noise-device", "gpu", "--cfg", "30"]) == 2
    assert "error: --cfg=30" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was loaded or written


@pytest.mark.heavy
def test_demo_command_with_a_lora_end_to_end(tmp_path, loras):
    """``python -m aura_flow demo --lora`` in a subprocess: the image, its record, and the same image as the API."""
    env = dict(os.environ, AURAFLOW_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "aura_flow", "demo", "--lora", f"{loras[0]}:-0.75", "--output-format", "png",
           "--out", str(tmp_path / "out"), *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (path,) = proc.stdout.split()
    record = read_metadata(path)["auraflow"]
    assert [(lora["name"], lora["strength"]) for lora in record["loras"]] == [("style_a.safetensors", -0.75)]
    assert "LoRAs active: style_a.safetensors@-0.75" in proc.stderr
    pipe = aura_flow.load(tmp_path / "cache" / "demo-tiny" / "diffusers", device="cpu", loras=[(loras[0], -0.75)])
    want = pipe.generate(prompt="a watercolor painting of a fox", seed=9, steps=2, width=64, height=64,
                         sampler="euler")
    assert Image.open(path).tobytes() == want.images[0].tobytes()
    assert not torch.equal(want.tensor, aura_flow.load(tmp_path / "cache" / "demo-tiny" / "diffusers", device="cpu")
                           .generate(prompt="a watercolor painting of a fox", seed=9, steps=2, width=64, height=64,
                                     sampler="euler").tensor)
