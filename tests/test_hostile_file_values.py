"""Classes of hostile file values found by mutating the tiny models' files (issue 20), one regression test each: a
value read from a file that reached Python or a library unchecked. Files are written with safetensors, gguf's
GGUFWriter and json; each case asserts a `LoadError` naming the file and the field (and the command line's one
``error:`` line where the class first showed there)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import aura_flow
from aura_flow.errors import LoadError
from test_hostile_files import fp8_transformer


@pytest.fixture
def tiny(tiny_models, tmp_path):
    """A private copy of the transformer-only (diffusers keys) tiny model."""
    kw = tiny_models["transformer_only_diffusers"]
    dest = tmp_path / "tiny"
    shutil.copytree(Path(kw["checkpoint"]).parent, dest)
    return dict(checkpoint=dest / Path(kw["checkpoint"]).name, text_encoder=dest / "text_encoder.safetensors",
                vae=dest / "vae.safetensors", tokenizer=dest / "tokenizer.model")


@pytest.fixture
def folder(tiny_models, tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_models["diffusers"]["checkpoint"], dest)
    return dest


def edit(path: Path, **values) -> Path:
    doc = json.loads(path.read_text())
    doc.update(values)
    path.write_text(json.dumps(doc))
    return path


def test_a_linear_weight_with_conv_dimensions(tiny):
    """(out, in, 1, 1) fits (out, in) but for size-1 dimensions, which other tensors may drop; a linear layer keeps
    its weight as stored, so it must be (out, in) exactly (it was 'too many values to unpack')."""
    key = "joint_transformer_blocks.0.attn.to_k.weight"
    sd = load_file(str(tiny["checkpoint"]))
    sd[key] = sd[key].reshape(32, 32, 1, 1)
    save_file(sd, str(tiny["checkpoint"]))
    with pytest.raises(LoadError, match=rf"transformer tensor {key} has shape \(32, 32, 1, 1\), expected \(32, 32\)"):
        aura_flow.load(device="cpu", **tiny)


@pytest.mark.parametrize("part, values, match", [
    ("vae", {"use_post_quant_conv": 0}, r"use_post_quant_conv=0 is not true or false, as AutoencoderKL takes it"),
    ("vae", {"scaling_factor": "0.13"}, r"scaling_factor='0.13' is not a finite number"),
    ("text_encoder", {"is_gated_act": -1}, r"text_encoder/config.json: is_gated_act=-1 is not true or false, as "
                                           r"UMT5Config takes it"),
    ("text_encoder", {"feed_forward_proj": 7}, r"feed_forward_proj=7 is not text"),
    ("text_encoder", {"layer_norm_epsilon": -2 ** 70}, r"text_encoder/config.json: not a T5 encoder config"),
    ("transformer", {"sample_size": 64.0}, r"sample_size=64.0 makes no model|sample_size=64.0 is not a whole number"),
])
def test_config_values_of_the_wrong_type(folder, part, values, match):
    """A flag given as a number would build another model (a VAE without its post-quant conv drops those weights
    with a warning); a value transformers' own validation refuses raised its own exception type."""
    edit(folder / part / "config.json", **values)
    with pytest.raises(LoadError, match=match) as info:
        aura_flow.load(folder, device="cpu")
    assert str(folder) in str(info.value)


def test_a_tokenizer_config_value_of_the_wrong_type(folder):
    """model_max_length as text loaded, then failed inside transformers at the first prompt (a TypeError)."""
    edit(folder / "tokenizer" / "tokenizer_config.json", model_max_length="many")
    with pytest.raises(LoadError, match=r"model/tokenizer: cannot load the tokenizer"):
        aura_flow.load(folder, device="cpu")


def test_an_ldm_vae_missing_a_bias_its_weight_has(tiny_models, tmp_path):
    """diffusers' converter takes a missing tensor as None (it was an AttributeError on None later)."""
    src = Path(tiny_models["single_file"]["checkpoint"])
    sd = load_file(str(src))
    del sd["vae.encoder.down.0.downsample.conv.bias"]
    save_file(sd, str(tmp_path / "all.safetensors"))
    with pytest.raises(LoadError, match=r"all.safetensors: the VAE is missing 1 weights \(e.g. encoder.down_blocks.0."
                                        r"downsamplers.0.conv.bias, in diffusers' names\)"):
        aura_flow.load(tmp_path / "all.safetensors", device="cpu", tokenizer=src.parent / "tokenizer.model")


def test_fp8_values_where_a_float32_scale_is_expected(tiny_models, tmp_path):
    """An fp8 scale (torch has no isfinite for fp8) loads as its float value; a NaN one is named."""
    path, extra = fp8_transformer(tiny_models, tmp_path)
    sd = load_file(str(path))
    scale = next(k for k in sd if k.endswith(".scale_weight"))
    sd[scale] = sd[scale].to(torch.float8_e4m3fn)
    save_file(sd, str(path))
    assert aura_flow.load(path, device="cpu", **extra).transformer is not None
    sd[scale] = torch.tensor(float("nan")).to(torch.float8_e4m3fn)
    save_file(sd, str(path))
    with pytest.raises(LoadError, match=rf"the fp8 scale of {scale[:-len('.scale_weight')]}.weight has shape \(\) "
                                        r"and dtype float8_e4m3fn, expected one finite float"):
        aura_flow.load(path, device="cpu", **extra)


def test_a_lora_with_nan_in_fp8(tmp_path, tiny_pipe):
    """A LoRA stored in fp8 is checked for NaN too (it was torch's NotImplementedError: no isfinite for fp8)."""
    from lora_files import write_lora

    path = write_lora(tmp_path / "l.safetensors", style="peft")
    sd = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in load_file(str(path)).items()}
    first = next(k for k in sd if k.endswith("lora_A.weight"))
    sd[first][0, 0] = float("nan")
    save_file(sd, str(path))
    with pytest.raises(LoadError, match=rf"l.safetensors: tensor {first} holds NaN or infinite values \(1 of"):
        tiny_pipe.set_loras([(path, 1.0)])
    tiny_pipe.set_loras([])


def test_a_position_table_beyond_any_image(tiny):
    """A grid the shapes agree on but no image needs (512 x 512 positions): the table would take gigabytes at the
    real width, so it is refused from the header."""
    from test_header_shapes import replace_sparse

    replace_sparse(tiny["checkpoint"], "pos_embed.pos_embed", (1, 512 * 512, 32))
    with pytest.raises(LoadError, match=r"pos_embed_max_size=262,144 positions is over 65,536 \(a 256x256 grid"):
        aura_flow.load(device="cpu", **tiny)


@pytest.mark.parametrize("kind", ["int32", "float64"])
def test_a_gguf_weight_of_a_type_no_weight_has(tiny_models, tmp_path, kind):
    """gguf's writer takes integer and float64 arrays; the loader said 'update gguf' for them."""
    import gguf

    from aura_flow.weights.gguf import load_gguf_transformer

    sd = load_file(str(tiny_models["transformer_only"]["checkpoint"]))
    path = tmp_path / "int.gguf"
    writer = gguf.GGUFWriter(str(path), "aura")
    for name, t in sd.items():
        writer.add_tensor(name, (t * 100).to(getattr(torch, kind)).numpy() if name == "final_linear.weight"
                          else t.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoadError, match=r"int.gguf: tensor final_linear.weight is (I32|F64), not a weight type of an "
                                        r"AuraFlow GGUF"):
        load_gguf_transformer(path, torch.float32)


def test_a_key_of_many_dots(tiny, caplog):
    """A tensor name of 200,000 dots beside the model was walked in quadratic time (no answer for minutes) and said
    whole in the warning."""
    import time

    sd = load_file(str(tiny["checkpoint"]))
    sd["joint_transformer_blocks.0." + "a." * 200_000 + "weight"] = torch.zeros(1)
    save_file(sd, str(tiny["checkpoint"]))
    t0 = time.monotonic()
    aura_flow.load(device="cpu", **tiny)
    assert time.monotonic() - t0 < 30 and "ignoring 1 tensors that are not part of the transformer (e.g. " \
        "'joint_transformer_blocks.0.a.a.a" in caplog.text and len(caplog.text) < 20_000


@pytest.mark.heavy
def test_a_file_of_many_tensors(tiny, tmp_path):
    """100,001 tensors are refused before each one's header is looked at (a model file and a LoRA)."""
    from lora_files import write_lora

    many = {f"junk.{i}": torch.zeros(1) for i in range(100_001)}
    save_file(many, str(tmp_path / "many.safetensors"))
    with pytest.raises(LoadError, match=r"many.safetensors: holds 100,001 tensors, more than any model this pack"):
        aura_flow.load(device="cpu", **dict(tiny, checkpoint=tmp_path / "many.safetensors"))
    lora = load_file(str(write_lora(tmp_path / "lora.safetensors")))
    save_file({**many, **lora}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(LoadError, match=r"lora.safetensors: holds 100,0\d\d tensors, more than a LoRA"):
        aura_flow.load(device="cpu", loras=[(tmp_path / "lora.safetensors", 1.0)], **tiny)


def test_a_serialized_tokenizer_of_another_type_is_not_read(tiny_models, tmp_path):
    """ComfyUI stores the sentencepiece model as U8 bytes; a float tensor there was read and handed over as bytes."""
    src = Path(tiny_models["single_file"]["checkpoint"])
    sd = load_file(str(src))
    spiece = "text_encoders.pile_t5xl.spiece_model"
    sd[spiece] = torch.zeros(3, 4)
    save_file(sd, str(tmp_path / "all.safetensors"))
    with pytest.raises(LoadError, match=rf"all.safetensors: the tokenizer stored as {spiece} is F32 of shape \(3, 4\), "
                                        r"expected a sentencepiece model as up to 67,108,864 U8 bytes; it is not read"):
        aura_flow.load(tmp_path / "all.safetensors", device="cpu")
