"""ComfyUI owns the pack's weights, in a real ComfyUI: its log says "Requested to load" for each part on the first
run and nothing on a rerun, /free unloads them, an inpainting workflow keeps the unmasked latent, and (in a
subprocess on ComfyUI's own modules, inside_residency.py) a tiny memory budget gives a partially loaded transformer
with the same latent, ComfyUI unloads the pack's models for a core model and the other way round, and AuraFlow
Sampler matches ComfyUI's KSampler on the same weights, also when it takes that core MODEL. See conftest.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from aura_flow import headless

from comfyui_support import PACK_DIR_NAME, ROOT, comfy_python, workflow_files

pytestmark = pytest.mark.comfyui
PARTS = ("AuraFlowTextEncoder", "AuraFlowTransformer", "AuraFlowAutoencoder")


def requested(log: str) -> list[str]:
    return [line.split("Requested to load ", 1)[1].strip() for line in log.splitlines()
            if "Requested to load " in line]


def nodes_workflow(prompt_text: str, seed: int) -> dict:
    """The bundled loader -> encode -> sampler -> VAE Decode -> save workflow, small; weight_dtype fp32 (what auto
    gives on a CPU) so no earlier test's cached loader output serves it."""
    (path,) = [p for p in workflow_files("api") if p.stem == "auraflow_txt2img_nodes"]
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "AuraFlowLoader":
            inputs["weight_dtype"] = "fp32"
        elif node["class_type"] == "AuraFlowTextEncode" and inputs["text"]:
            inputs["text"] = prompt_text
        elif node["class_type"] == "AuraFlowSampler":
            inputs.update(seed=seed, steps=2, width=64, height=64)
    return prompt


def run_and_log(server, prompt, tmp_path) -> list[str]:
    before = len(server.log())
    paths = headless.run_workflow(prompt, server.url, out_dir=tmp_path / uuid.uuid4().hex, timeout=600, poll=0.2)
    assert paths
    time.sleep(0.3)  # the log file is written by another process
    return requested(server.log()[before:])


def test_comfyui_loads_the_pack_models_once_and_unloads_them_on_free(comfy_server, tmp_path):
    text = f"a lighthouse {uuid.uuid4().hex[:8]}"
    first = run_and_log(comfy_server, nodes_workflow(text, 1), tmp_path)
    assert first == list(PARTS), comfy_server.log()[-3000:]
    rerun = run_and_log(comfy_server, nodes_workflow(text, 2), tmp_path)  # sampler and decode run again
    assert rerun == []
    client = headless.ComfyClient(comfy_server.url)
    status, _body = client.request("POST", "/free", {"unload_models": True})
    assert status == 200
    time.sleep(2.0)  # the prompt worker wakes on the flag and unloads every model
    after_free = run_and_log(comfy_server, nodes_workflow(text, 3), tmp_path)
    assert after_free == ["AuraFlowTransformer", "AuraFlowAutoencoder"]  # the encodings are cached outputs


def test_inpainting_workflow_keeps_the_unmasked_latent(comfy_server, tmp_path):
    """LoadImage -> VAE Encode -> Set Latent Noise Mask (right half) -> AuraFlow Sampler; both latents saved: the
    left half comes back unchanged, as with ComfyUI's KSampler (inside_residency.py compares with KSampler)."""
    from safetensors.torch import load_file

    tag = uuid.uuid4().hex[:8]
    prompt = {
        "1": {"class_type": "AuraFlowLoader", "inputs": {
            "checkpoint": "aura_flow_0.3.safetensors", "text_encoder": "(from checkpoint)", "vae": "(from checkpoint)",
            "tokenizer": "(from checkpoint)", "weight_dtype": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear", "width": 64,
                                                     "height": 64, "crop": "disabled"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "6": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
        "7": {"class_type": "MaskComposite", "inputs": {"destination": ["5", 0], "source": ["6", 0], "x": 32, "y": 0,
                                                        "operation": "add"}},
        "8": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["7", 0]}},
        "9": {"class_type": "AuraFlowTextEncode", "inputs": {"text": f"a red door {tag}", "text_encoder": ["1", 1]}},
        "10": {"class_type": "AuraFlowTextEncode", "inputs": {"text": "", "text_encoder": ["1", 1]}},
        "11": {"class_type": "AuraFlowSampler", "inputs": {
            "model": ["1", 0], "positive": ["9", 0], "negative": ["10", 0], "latent_image": ["8", 0], "seed": 4,
            "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "shift": 1.73, "denoise": 1.0,
            "width": 64, "height": 64, "batch_size": 1}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": f"res_{tag}/input"}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": f"res_{tag}/output"}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "15": {"class_type": "AuraFlowSaveImage", "inputs": {"images": ["14", 0], "filename_prefix": f"res_{tag}/img",
                                                             "format": "png", "quality": 80,
                                                             "embed_workflow": False}},
    }
    headless.run_workflow(prompt, comfy_server.url, out_dir=tmp_path, timeout=600, poll=0.2)
    folder = comfy_server.base / "output" / f"res_{tag}"
    (given,) = [load_file(str(p))["latent_tensor"] for p in folder.glob("input*.latent")]
    (got,) = [load_file(str(p))["latent_tensor"] for p in folder.glob("output*.latent")]
    assert given.shape == got.shape == (1, 4, 8, 8)
    assert (got[..., :4] - given[..., :4]).abs().max().item() < 1e-5  # mask 0: the input latent, as KSampler
    assert (got[..., 4:] - given[..., 4:]).abs().mean().item() > 0.05  # mask 1: regenerated


def test_residency_partial_load_and_ksampler_parity_inside_comfyui(comfy_base, tmp_path):
    """inside_residency.py on ComfyUI's own modules (see its docstring); its measurements are asserted there and
    here."""
    from aura_flow.tiny import build_tiny
    from aura_flow.weights.writers import build_tiny_gguf

    checkout, _base = comfy_base
    pack = tmp_path / "custom_nodes" / PACK_DIR_NAME
    pack.mkdir(parents=True)
    for part in ("__init__.py", "aura_flow", "nodes", "web"):
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, pack / part)
    build_tiny(tmp_path / "tiny", "transformer_only")
    build_tiny_gguf(tmp_path / "gguf", "Q8_0")
    done = subprocess.run([comfy_python(checkout), str(Path(__file__).with_name("inside_residency.py")),
                           str(checkout), str(pack), str(tmp_path / "tiny")],
                          cwd=checkout, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["first_run"] == list(PARTS) and report["rerun"] == []
    for key in ("partial", "partial_gguf"):
        part = report[key]
        assert part["log"][0].startswith("loaded partially") and part["diff"] <= 1e-6 and part["lowvram"]
        assert 0 < part["loaded_bytes"] < part["size"] and 0 < part["streamed_layers"] < part["layers"]
    assert report["after_core"] == ["AuraFlow"] and report["after_pack"] == ["AuraFlowTransformer"]
    assert report["inpaint_vs_ksampler"] < 1e-4 and report["kept_ours"] < 1e-5 and report["changed"] > 0.1
    assert report["inpaint_native_vs_ksampler"] < 1e-6 and report["options_vs_ksampler"] < 1e-4
