"""Pony V7 (AuraFlow v0.3's architecture, 96x96 position grid): its transformer-only file, its diffusers folder
(UMT5EncoderModel + LlamaTokenizerFast, fp16 variant files) and its GGUFs, as tiny models with its config values
(aura_flow.tiny's "pony" preset), load and generate; sizes up to 1536 px a side fall inside its grid and give
diffusers' own numbers; prompts up to 768 tokens are kept whole; the bundled Pony V7 workflow runs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

import aura_flow
from aura_flow.images import read_metadata
from aura_flow.provenance import file_hash
from aura_flow.tiny import PONY_GRID, build_tiny, transformer_config
from aura_flow.weights.writers import build_tiny_gguf
import workflow_exec as wx

GEN = dict(prompt="score_9, a red fox in an autumn forest", seed=7, steps=2, width=64, height=64, sampler="euler",
           cfg=3.5)


@pytest.fixture(scope="module")
def pony(tmp_path_factory):
    root = tmp_path_factory.mktemp("pony")
    diffusers = build_tiny(root / "diffusers", "diffusers", preset="pony", variant="fp16")
    single = build_tiny(root / "single", "transformer_only", preset="pony")
    parts = dict(text_encoder=root / "single" / "text_encoder.safetensors", vae=root / "single" / "vae.safetensors")
    gguf_f32 = build_tiny_gguf(root / "gguf_f32", "F32", preset="pony")
    gguf_q8 = build_tiny_gguf(root / "gguf_q8", "Q8_0", preset="pony")
    return dict(root=root, diffusers=diffusers, single=single, parts=parts, gguf_f32=gguf_f32, gguf_q8=gguf_q8)


@pytest.fixture(scope="module")
def loaded(pony):
    return {
        "diffusers": aura_flow.load(pony["diffusers"], dtype="fp32", device="cpu"),
        "transformer_only": aura_flow.load(pony["single"], **pony["parts"], dtype="fp32", device="cpu"),
        "gguf_f32": aura_flow.load(pony["gguf_f32"], **pony["parts"], dtype="fp32", device="cpu"),
        "gguf_q8": aura_flow.load(pony["gguf_q8"], **pony["parts"], dtype="fp32", device="cpu"),
    }


def run(pipe, hw=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, *hw, generator=g)
    ctx = torch.randn(1, 12, pipe.context_dim, generator=g)
    return pipe.velocity(x, torch.tensor([0.7]), ctx)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_every_layout_has_ponys_config_and_generates(pony, loaded):
    index = json.loads((pony["diffusers"] / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["tokenizer"] == ["transformers", "LlamaTokenizerFast"]
    assert sorted(p.name for p in (pony["diffusers"] / "text_encoder").iterdir()) == ["config.json",
                                                                                     "model.fp16.safetensors"]
    for name, pipe in loaded.items():
        config = pipe.transformer.config
        assert (config.pos_embed_max_size, config.sample_size) == (PONY_GRID ** 2, PONY_GRID), name
        result = pipe.generate(**GEN)
        assert result.tensor.shape == (1, 64, 64, 3) and result.tensor.std() > 0.01, name
    reference = run(loaded["transformer_only"])
    assert rel(run(loaded["gguf_f32"]), reference) < 1e-6  # F32 GGUF: the same weights
    assert rel(run(loaded["diffusers"]), reference) < 3e-3  # its fp16 files: fp16 rounding
    assert 1e-5 < rel(run(loaded["gguf_q8"]), reference) < 5e-2  # Q8_0: quantized, and close
    layer = loaded["gguf_q8"].transformer.single_transformer_blocks[0].ff.linear_1
    assert type(layer).__name__ == "GGUFLinear"


def test_the_llama_tokenizer_folder_is_used(loaded):
    tok = loaded["diffusers"].tokenizer
    assert tok.source.endswith("tokenizer")
    ids, mask = tok("a red fox")
    assert len(ids) == 256 and ids[sum(mask) - 1] == tok.end_id and sum(mask) > 2


def test_sizes_up_to_1536_are_inside_the_grid_and_equal_diffusers(loaded):
    """Non-square sizes beyond AuraFlow v0.1's 64x64 patches, up to 96 patches (1536 px) a side: the position grid
    is cropped, not interpolated, exactly as diffusers' own AuraFlowTransformer2DModel does."""
    from diffusers import AuraFlowTransformer2DModel

    pipe = loaded["transformer_only"]  # read from the original-key file by the pack
    reference = AuraFlowTransformer2DModel(**transformer_config("pony"))  # plain diffusers, the same weights
    reference.load_state_dict({n: p.detach().clone() for n, p in pipe.transformer.state_dict().items()})
    reference.eval()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 12, pipe.context_dim, generator=g)
    for height, width in ((1536, 1280), (1088, 1280)):  # 96x80 and 68x80 patches
        x = torch.randn(1, 4, height // 8, width // 8, generator=g)
        sigma = torch.tensor([0.6])
        ours = pipe.velocity(x, sigma, ctx)
        with torch.no_grad():
            theirs = reference(hidden_states=x, encoder_hidden_states=ctx, timestep=sigma, return_dict=False)[0]
        assert ours.shape == x.shape and rel(ours, theirs) < 1e-5, (height, width)


def test_prompts_up_to_768_tokens_are_encoded_whole(loaded):
    pipe = loaded["transformer_only"]
    words = "a red fox with green eyes sits on a mossy rock in a misty autumn forest,".split()
    prompt, n = "", 0
    while sum(pipe.tokenizer(f"{prompt} {words[n % len(words)]}")[1]) <= 768:  # Pony's trainers' longest
        prompt, n = f"{prompt} {words[n % len(words)]}", n + 1
    ids, mask = pipe.tokenizer(prompt)
    assert 740 < sum(mask) <= 768
    context = pipe.encode_prompt(prompt)
    assert context.shape[1] == len(ids) == sum(mask)  # no truncation, no padding past the prompt
    assert context[0, sum(mask) - 1].abs().sum() > 0


def test_bundled_pony_workflow_runs(pony, tmp_path, monkeypatch):
    """example_workflows/api/auraflow_pony_v7.json with the tiny Pony files under its names, at 64x64, 2 steps."""
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "output"))
    models = tmp_path / "models"
    models.mkdir()
    prompt = json.loads((wx.ROOT / "example_workflows" / "api" / "auraflow_pony_v7.json").read_text())
    loader = next(n for n in prompt.values() if n["class_type"] == "AuraFlowLoader")["inputs"]
    sampler = next(n for n in prompt.values() if n["class_type"] == "AuraFlowSampler")["inputs"]
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["steps"], sampler["cfg"]) == ("euler", "normal",
                                                                                                  40, 3.5)
    for key, source in (("checkpoint", pony["single"]), ("text_encoder", pony["parts"]["text_encoder"]),
                        ("vae", pony["parts"]["vae"])):
        shutil.copy(source, models / loader[key])
        loader[key] = str(models / loader[key])
    shutil.copy(pony["single"].parent / "tokenizer.model", models / "tokenizer.model")
    loader["weight_dtype"] = "fp32"
    sampler.update(width=64, height=64, steps=2)
    classes = wx.all_classes()
    _outputs, ui = wx.execute(prompt, classes)
    (saved,) = [tmp_path / "output" / f["subfolder"] / f["filename"] for entry in ui.values() for f in entry["images"]]
    with Image.open(saved) as im:
        assert im.size == (64, 64)
        record = read_metadata(im)["auraflow"]
    assert record["checkpoint"] == {"name": "pony-v7-base.safetensors", "hash": file_hash(pony["single"])}
    assert record["text_encoder"]["name"] == "pony_v7_text_encoder.fp16.safetensors"
    assert record["vae"]["name"] == "pony_v7_vae.fp16.safetensors"
