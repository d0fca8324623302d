"""AuraFlow Loader lists .gguf files from ComfyUI's models/unet and models/diffusion_models (ComfyUI's own lists
leave them out) under this pack's own folder key, resolves and loads them; ComfyUI-GGUF's ``unet_gguf`` key is left
alone. ComfyUI's folder_paths is stood in for by a module with the same table and lookups (its real behaviour is
checked in tests/comfyui)."""
from __future__ import annotations

import os
import shutil
import sys
import types

import pytest
import torch

from aura_flow.weights.writers import build_tiny_gguf, write_gguf
from workflow_exec import inputs_of, load_pack

pack = load_pack()
N = pack.NODE_CLASS_MAPPINGS
folders = sys.modules[f"{pack.__name__}.nodes.comfyui.folders"]


def fake_folder_paths(models) -> types.ModuleType:
    """ComfyUI's folder_paths table and lookups (folder_paths.py: get_folder_paths, get_filename_list,
    get_full_path), over ``models``."""
    fp = types.ModuleType("folder_paths")
    pt = {".safetensors", ".ckpt", ".pt", ".bin", ".sft"}
    fp.folder_names_and_paths = {
        "checkpoints": ([str(models / "checkpoints")], pt),
        "diffusion_models": ([str(models / "unet"), str(models / "diffusion_models")], pt),
        "text_encoders": ([str(models / "text_encoders")], pt), "vae": ([str(models / "vae")], pt),
        "loras": ([str(models / "loras")], pt), "diffusers": ([str(models / "diffusers")], ["folder"]),
    }

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        found = set()
        for base in paths:
            for root, _dirs, files in os.walk(base):
                found |= {os.path.relpath(os.path.join(root, f), base) for f in files
                          if os.path.splitext(f)[1].lower() in exts}
        return sorted(found)

    def get_full_path(name, filename):
        if name not in fp.folder_names_and_paths:
            return None
        for base in fp.folder_names_and_paths[name][0]:
            if os.path.isfile(os.path.join(base, filename)):
                return os.path.join(base, filename)
        return None

    fp.get_folder_paths, fp.get_filename_list, fp.get_full_path = get_folder_paths, get_filename_list, get_full_path
    return fp


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    dest = tmp_path_factory.mktemp("gguf_listing")
    return build_tiny_gguf(dest, "Q8_0")


def test_loader_lists_resolves_and_loads_ggufs(gguf_model, tmp_path, monkeypatch):
    models = tmp_path / "models"
    for sub in ("checkpoints", "unet", "diffusion_models", "text_encoders", "vae", "loras"):
        (models / sub).mkdir(parents=True)
    src = gguf_model.parent
    shutil.copy(gguf_model, models / "unet" / "aura_Q8_0.gguf")
    shutil.copy(gguf_model, models / "diffusion_models" / "pony-v7-base-Q8_0.gguf")
    shutil.copy(src / "tokenizer.model", models / "unet" / "tokenizer.model")
    shutil.copy(src / "text_encoder.safetensors", models / "text_encoders" / "te.safetensors")
    shutil.copy(src / "vae.safetensors", models / "vae" / "vae.safetensors")
    (models / "diffusion_models" / "other.safetensors").write_bytes(b"")
    (models / "unet" / "notes.txt").write_bytes(b"")
    fp = fake_folder_paths(models)
    theirs = ([str(models / "unet")], {".gguf"})
    fp.folder_names_and_paths["unet_gguf"] = theirs  # ComfyUI-GGUF's own key
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    options = inputs_of(N["AuraFlowLoader"])["checkpoint"][0]
    assert options == ["aura_Q8_0.gguf", "other.safetensors", "pony-v7-base-Q8_0.gguf"]
    assert fp.folder_names_and_paths["unet_gguf"] is theirs
    # the key shares diffusion_models' list: a path added later (extra_model_paths.yaml) is searched too
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(gguf_model, extra / "late.gguf")
    fp.folder_names_and_paths["diffusion_models"][0].append(str(extra))
    assert "late.gguf" in inputs_of(N["AuraFlowLoader"])["checkpoint"][0]
    model, _te, _vae = N["AuraFlowLoader"]().load("aura_Q8_0.gguf", text_encoder="te.safetensors",
                                                 vae="vae.safetensors", weight_dtype="fp32")
    assert model.sources["transformer"] == str(models / "unet" / "aura_Q8_0.gguf")
    layer = model.transformer.joint_transformer_blocks[0].attn.to_q
    assert type(layer).__name__ == "GGUFLinear"  # kept quantized
    images, _seed = N["AuraFlowGenerate"]().generate(model, prompt="a fox", negative_prompt="", cfg=1.0, seed=1,
                                                     shift=1.73, steps=1, width=64, height=64, sampler="euler",
                                                     scheduler="normal", number_of_images=1, output_format="png",
                                                     output_quality=80)
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all() and images.std() > 0
    with pytest.raises(FileNotFoundError, match=r"checkpoint 'gone.gguf' not found in models/checkpoints, "
                                                r"models/diffusion_models, models/unet, models/diffusers"):
        N["AuraFlowLoader"]().load("gone.gguf")


def test_a_gguf_of_another_model_is_refused_naming_it(tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "unet").mkdir(parents=True)
    write_gguf(models / "unet" / "flux-dev-Q4_0.gguf", {"img_in.weight": torch.randn(64, 64)}, "Q4_0", arch="flux")
    monkeypatch.setitem(sys.modules, "folder_paths", fake_folder_paths(models))
    assert "flux-dev-Q4_0.gguf" in inputs_of(N["AuraFlowLoader"])["checkpoint"][0]
    with pytest.raises(Exception, match=r"a GGUF of architecture 'flux', not an AuraFlow transformer"):
        N["AuraFlowLoader"]().load("flux-dev-Q4_0.gguf")  # named before the missing text encoder is


def test_outside_comfyui_no_gguf_list():
    assert folders.gguf_names() == [] and folders.register_gguf_folder() is False
