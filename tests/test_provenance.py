"""What an image needs to be made again, in its metadata: short file hashes (cached, never a full path), the
``auraflow`` record of a run (checkpoint, dtype, speed, noise device, LoRAs, version) on the result and written by
AuraFlow Save Image, read back. The command line's side: test_cli_lora.py."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

import aura_flow
from aura_flow.images import read_metadata
from aura_flow.provenance import CHUNK, file_hash, file_record
from lora_files import LAYERS_A, LAYERS_B, write_lora
from workflow_exec import load_pack

pack = load_pack()
N = pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prov_loras")
    return (write_lora(folder / "style_a.safetensors", LAYERS_A, seed=1),
            write_lora(folder / "char_b.safetensors", LAYERS_B, seed=2, style="peft"))


def test_file_hash_reads_both_ends_and_is_cached_per_version(tmp_path):
    path = tmp_path / "model.bin"
    data = os.urandom(3 * CHUNK + 17)
    path.write_bytes(data)
    want = hashlib.sha256(len(data).to_bytes(8, "little") + data[:CHUNK] + data[-CHUNK:]).hexdigest()[:10]
    assert file_hash(path) == want
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert file_hash(small) == hashlib.sha256((3).to_bytes(8, "little") + b"abc").hexdigest()[:10]
    # the middle is not read: a change there keeps the hash (the price of hashing 13 GB files in milliseconds) ...
    middle = bytearray(data)
    middle[len(data) // 2] ^= 1
    path.write_bytes(bytes(middle))
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
    assert file_hash(path) == want
    # ... a change at either end or in size changes it, and a new version is hashed again (not the cached value)
    path.write_bytes(data + b"!")
    assert file_hash(path) not in (want, None)
    assert file_hash(tmp_path / "missing.bin") is None
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "w.safetensors").write_bytes(b"12345")
    (folder / "notes.txt").write_bytes(b"ignored")
    first = file_hash(folder)
    (folder / "notes.txt").write_bytes(b"still ignored")
    assert file_hash(folder) == first
    (folder / "sub" / "w.safetensors").write_bytes(b"123456")
    assert file_hash(folder) != first
    assert file_record(str(small) + ":text_encoders.spiece_model") == {"name": "small.bin:text_encoders.spiece_model",
                                                                       "hash": file_hash(small)}


def test_generation_result_carries_the_record(tiny_models, loras):
    files = tiny_models["transformer_only"]
    pipe = aura_flow.load(**files, dtype="fp32", device="cpu", loras=[(loras[0], 0.5), (loras[1], -1.0)])
    result = pipe.generate(prompt="a fox", seed=3, steps=2, width=64, height=64, sampler="euler", speed="exact",
                           noise_device="gpu")
    record = result.record
    assert record == {
        "version": aura_flow.__version__,
        "checkpoint": {"name": files["checkpoint"].name, "hash": file_hash(files["checkpoint"])},
        "text_encoder": {"name": "text_encoder.safetensors", "hash": file_hash(files["text_encoder"])},
        "vae": {"name": "vae.safetensors", "hash": file_hash(files["vae"])},
        "tokenizer": {"name": "tokenizer.model", "hash": file_hash(files["checkpoint"].parent / "tokenizer.model")},
        "dtype": "fp32", "compute_dtype": "float32", "device": "cpu", "speed": "exact", "noise_device": "gpu",
        "loras": [{"name": "style_a.safetensors", "strength": 0.5, "format": "kohya lora", "layers": len(LAYERS_A),
                   "hash": file_hash(loras[0])},
                  {"name": "char_b.safetensors", "strength": -1.0, "format": "diffusers/peft lora",
                   "layers": len(LAYERS_B), "hash": file_hash(loras[1])}]}
    assert result.metadata() == {"parameters": result.params, "auraflow": record}
    assert str(files["checkpoint"].parent) not in json.dumps(record)  # names, never full paths
    assert result.plan.sampling.noise_device == "gpu"


def test_save_node_adds_the_record_beside_prompt_and_workflow(tiny_models, loras, tmp_path, monkeypatch):
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "output"))
    model, te, vae = N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")
    (styled,) = N["AuraFlowLoraLoader"]().load(model, str(loras[0]), 0.8)
    pos = N["AuraFlowTextEncode"]().encode(te, "a fox")[0]
    latent = N["AuraFlowSampler"]().sample(styled, pos, pos, 1, 2, 1.0, "euler", "normal", 1.73, 1.0, 64, 64, 1,
                                           noise_device="gpu")[0]
    images = N["AuraFlowVAEDecode"]().decode(latent, vae)[0]
    ui = N["AuraFlowSaveImage"]().save(images, "rec", "png", 80, True, prompt={"1": {}},
                                       extra_pnginfo={"workflow": {"w": 1}})["ui"]
    meta = read_metadata(tmp_path / "output" / ui["images"][0]["filename"])
    assert meta["prompt"] == {"1": {}} and meta["workflow"] == {"w": 1}
    record = meta["auraflow"]
    assert record["checkpoint"] == {"name": "diffusers", "hash": file_hash(tiny_models["diffusers"]["checkpoint"])}
    assert record["dtype"] == "fp32" and record["noise_device"] == "gpu" and record["speed"] == "auto"
    assert [(lora["name"], lora["strength"], lora["layers"]) for lora in record["loras"]] == [
        ("style_a.safetensors", 0.8, len(LAYERS_A))]
    # one-node generate carries it too; the base model's record lists no LoRA
    images, _seed = N["AuraFlowGenerate"]().generate(model, prompt="a fox", negative_prompt="", cfg=1.0, seed=1,
                                                     shift=1.73, steps=1, width=64, height=64, sampler="euler",
                                                     scheduler="normal", number_of_images=1, output_format="png",
                                                     output_quality=80)
    ui = N["AuraFlowSaveImage"]().save(images, "gen", "png", 80, True)["ui"]
    record = read_metadata(tmp_path / "output" / ui["images"][0]["filename"])["auraflow"]
    assert record["loras"] == [] and record["noise_device"] == "cpu"
    # embed_workflow off: no metadata at all
    ui = N["AuraFlowSaveImage"]().save(images, "bare", "png", 80, False)["ui"]
    assert read_metadata(tmp_path / "output" / ui["images"][0]["filename"]) == {}
    # a tensor made by another node carries nothing: saved without the record
    ui = N["AuraFlowSaveImage"]().save(images * 1.0, "other", "png", 80, True)["ui"]
    assert "auraflow" not in read_metadata(tmp_path / "output" / ui["images"][0]["filename"])
