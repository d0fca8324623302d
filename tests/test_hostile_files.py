"""Hostile values inside model files (issue 20): safetensors headers and shapes, config.json and GGUF metadata
(LoRA files: test_hostile_lora_files.py). Every file is written with its format's own library (safetensors, gguf's GGUFWriter) and then
given a broken value or broken bytes; each case asserts a `LoadError` whose message names the file and the field,
before the big tensors are read, in bounded time, and for some the command line's ``error: ...`` with exit 2."""
from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

import aura_flow
from aura_flow.cli import main
from aura_flow.errors import LoadError
from aura_flow.weights.gguf import load_gguf_transformer


# ------------------------------------------------------------------------------------------------ model files
@pytest.fixture(scope="module")
def parts(tiny_models):
    """The transformer-only (diffusers keys) tiny model: its state dict and the other parts' paths."""
    kw = tiny_models["transformer_only_diffusers"]
    src = Path(kw["checkpoint"])
    return load_file(str(src)), dict(text_encoder=kw["text_encoder"], vae=kw["vae"],
                                     tokenizer=src.parent / "tokenizer.model")


def broken(tmp_path, parts, change, metadata=None, name="transformer.safetensors") -> Path:
    sd = dict(parts[0])
    change(sd)
    path = tmp_path / name
    save_file(sd, str(path), metadata=metadata)
    return path


def load_fails(path, parts, match) -> LoadError:
    with pytest.raises(LoadError, match=match) as info:
        aura_flow.load(path, device="cpu", **parts[1])
    assert str(path) in str(info.value)
    return info.value


def rename_block(sd, old, new):
    for k in [k for k in sd if k.startswith(old)]:
        sd[new + k[len(old):]] = sd.pop(k)


@pytest.mark.parametrize("change, match", [
    (lambda sd: sd.update({"pos_embed.proj.weight": torch.zeros(32, 0)}),
     r"tensor pos_embed.proj.weight has shape \(32, 0\), expected 2 dimensions, none of size 0"),
    (lambda sd: sd.update({"pos_embed.proj.weight": torch.zeros(32, 12)}),
     r"pos_embed.proj.weight has 12 inputs, expected 4 latent channels x patch²"),
    (lambda sd: rename_block(sd, "joint_transformer_blocks.0.", "joint_transformer_blocks.x."),
     r"key 'joint_transformer_blocks.x.\S+' has block index 'x', expected a whole number 0..99999"),
    (lambda sd: rename_block(sd, "single_transformer_blocks.0.", "single_transformer_blocks.99999999999."),
     r"has block index '99999999999', expected a whole number"),
    (lambda sd: sd.update({"pos_embed.pos_embed": torch.zeros(1, 0, 32)}),
     r"tensor pos_embed.pos_embed has shape \(1, 0, 32\), expected 3 dimensions, none of size 0"),
    (lambda sd: sd.update({"proj_out.weight": torch.zeros(20, 32)}),
     r"proj_out.weight has 20 rows, .* expected 4 channels x patch² = 16 rows"),
    (lambda sd: sd.update({"context_embedder.weight": torch.zeros(48, 32)}),
     r"context_embedder.weight gives 48, .*the width 32"),
    (lambda sd: sd.pop("context_embedder.weight"), r"no AuraFlow transformer keys found|no context_embedder.weight"),
    (lambda sd: sd.update({"proj_out.weight": sd["proj_out.weight"].to(torch.int32)}),
     r"transformer weights are not floating point \(e.g. proj_out.weight: int32\)"),
])
def test_transformer_shapes_and_names_are_checked(tmp_path, parts, change, match):
    load_fails(broken(tmp_path, parts, change), parts, match)


def test_a_conv_patch_embedding_is_named_as_another_family(tmp_path, parts, capsys):
    path = broken(tmp_path, parts, lambda sd: sd.update({"pos_embed.proj.weight": torch.zeros(32, 4, 2, 2)}))
    error = load_fails(path, parts, r"pos_embed.proj.weight is a 4-D convolution \(32, 4, 2, 2\): the patch "
                                    r"embedding of a Stable Diffusion 3 / PixArt / DiT-like transformer")
    assert error.found == "sd3"
    rc = main(["generate", "--checkpoint", str(path), "--text-encoder", str(parts[1]["text_encoder"]), "--vae",
               str(parts[1]["vae"]), "--tokenizer", str(parts[1]["tokenizer"]), "--out", str(tmp_path / "o"),
               "--steps", "1", "--width", "64", "--height", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {path}: pos_embed.proj.weight is a 4-D convolution")
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_a_text_encoder_of_another_width_is_named(tmp_path, parts, tiny_models):
    from aura_flow.tiny import build_tiny

    other = build_tiny(tmp_path / "medium", "transformer_only", preset="medium")
    with pytest.raises(LoadError, match=r"text_encoder.safetensors: the text encoder gives 256-wide embeddings, but "
                                        r"the transformer .* takes 32 \(joint_attention_dim\)"):
        aura_flow.load(tiny_models["transformer_only_diffusers"]["checkpoint"], device="cpu",
                       **dict(parts[1], text_encoder=other.parent / "text_encoder.safetensors"))


def test_a_text_encoder_with_zero_heads(tmp_path, parts):
    key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    sd = load_file(str(parts[1]["text_encoder"]))
    sd[key] = torch.zeros(32, 0)
    save_file(sd, str(tmp_path / "te.safetensors"))
    with pytest.raises(LoadError, match=rf"te.safetensors: tensor {key} has shape \(32, 0\)"):
        aura_flow.load(broken(tmp_path, parts, lambda sd: None), device="cpu",
                       **dict(parts[1], text_encoder=tmp_path / "te.safetensors"))


# ------------------------------------------------------------------------------------------------ config.json
@pytest.fixture
def folder(tmp_path, tiny_models) -> Path:
    import shutil

    dest = tmp_path / "model"
    shutil.copytree(tiny_models["diffusers"]["checkpoint"], dest)
    return dest


def edit(folder, part, **values):
    path = folder / part / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))
    return path


def test_unknown_config_keys_warn_naming_them(folder, caplog):
    edit(folder, "transformer", _secret_switch=1, **{"odd key\n": 2})
    edit(folder, "text_encoder", future_t5_option=True)
    caplog.set_level(logging.WARNING)
    aura_flow.load(folder, device="cpu")
    assert "ignoring config values _secret_switch, 'odd key\\n', which AuraFlowTransformer2DModel" in caplog.text
    assert "text_encoder/config.json: ignoring config values future_t5_option, which UMT5Config" in caplog.text
    assert "_diffusers_version" not in caplog.text  # diffusers' own bookkeeping is expected


@pytest.mark.parametrize("part, values, match", [
    ("transformer", {"_class_name": "SD3Transformer2DModel"},
     r"transformer/config.json: _class_name='SD3Transformer2DModel': the config of another model"),
    ("transformer", {"caption_projection_dim": 48}, r"caption_projection_dim=48 is not the width"),
    ("transformer", {"in_channels": 16}, r"in_channels=16 and out_channels=4 differ"),
    ("text_encoder", {"model_type": "clip_text_model"}, r"text_encoder/config.json: model_type='clip_text_model': "
                                                        r"the config of another model"),
    ("vae", {"_class_name": "AutoencoderTiny"}, r"vae/config.json: _class_name='AutoencoderTiny': not the config of "
                                                r"a VAE"),
])
def test_configs_of_other_models_are_named(folder, part, values, match):
    edit(folder, part, **values)
    with pytest.raises(LoadError, match=match) as info:
        aura_flow.load(folder, device="cpu")
    if values.get("_class_name") == "SD3Transformer2DModel":
        assert info.value.found == "sd3"


# ------------------------------------------------------------------------------------------------ GGUF
@pytest.fixture(scope="module")
def original_sd(tiny_models):
    return load_file(str(tiny_models["transformer_only"]["checkpoint"]))


def write_gguf(path, sd, arch="aura", extra=None) -> Path:
    """``sd`` in F32 through gguf's own writer; ``extra(writer)`` adds metadata."""
    writer = gguf.GGUFWriter(str(path), arch)
    if extra:
        extra(writer)
    for name, t in sd.items():
        writer.add_tensor(name, t.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def gguf_fails(path, match) -> LoadError:
    t0 = time.monotonic()
    with pytest.raises(LoadError, match=match) as info:
        load_gguf_transformer(path, torch.float32)
    assert str(path) in str(info.value) and time.monotonic() - t0 < 10
    return info.value


def test_a_valid_gguf_still_loads(tmp_path, original_sd):
    shape = list(original_sd["positional_encoding"].shape)
    path = write_gguf(tmp_path / "ok.gguf", original_sd, extra=lambda w: (
        w.add_uint32("aura_flow.attention_head_dim", 8),
        w.add_array("comfy.gguf.orig_shape.positional_encoding", shape)))
    model = load_gguf_transformer(path, torch.float32)
    assert model.config.attention_head_dim == 8 and model.pos_embed.pos_embed.shape == tuple(shape)


def test_an_architecture_that_is_not_utf8(tmp_path, original_sd):
    path = write_gguf(tmp_path / "arch.gguf", original_sd, arch="ZZZZ")
    data = path.read_bytes()
    path.write_bytes(data.replace(b"ZZZZ", b"\xff\xfe\xfd\xfc", 1))
    gguf_fails(path, r"arch.gguf: not a readable GGUF file: metadata 'general.architecture' b'\\xff\\xfe\\xfd\\xfc' "
                     r"is not UTF-8 text")


def header(*pairs, tensors=0) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", 3, tensors, len(pairs))
    for key, body in pairs:
        out += struct.pack("<Q", len(key)) + key + body
    return out


@pytest.mark.parametrize("body, match", [
    (struct.pack("<IIQ", 9, 4, 10**8), r"metadata 'big' claims 100,000,000 items, but only \d+ bytes follow"),
    (struct.pack("<IIQ", 9, 8, 10**8), r"metadata 'big' claims 100,000,000 items"),
    (struct.pack("<IIQ", 9, 9, 10**8), r"metadata 'big' claims 100,000,000 items"),
    (struct.pack("<IQ", 8, 10**12), r"metadata 'big' needs 1,000,000,000,000 bytes at offset \d+, past the end"),
    (struct.pack("<II", 9, 77) + b"\0" * 8, r"metadata 'big': unknown array item type 77"),
    (struct.pack("<I", 42), r"metadata 'big': unknown value type 42"),
    (struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 3 + struct.pack("<IQ", 4, 0),
     r"metadata 'big': arrays nested over 3 deep"),
])
def test_metadata_counts_are_checked_against_the_bytes(tmp_path, body, match):
    path = tmp_path / "counts.gguf"
    path.write_bytes(header((b"general.architecture", struct.pack("<IQ", 8, 4) + b"aura"), (b"big", body))
                     + b"\0" * 100)
    assert path.stat().st_size < 300
    gguf_fails(path, "counts.gguf: not a readable GGUF file: " + match)


def test_a_tensor_table_that_claims_more_than_the_file_holds(tmp_path):
    path = tmp_path / "tensors.gguf"
    path.write_bytes(header((b"general.architecture", struct.pack("<IQ", 8, 4) + b"aura"), tensors=10**6))
    gguf_fails(path, r"the tensor count claims 1,000,000 tensors, but only 0 bytes follow")


@pytest.mark.parametrize("shape, kind", [([-1, 256, 32], "int"), (["1", "256", "32"], "str"), ([1, 256, 33], "int"),
                                         ([0, 256, 32], "int"), ([1, 1, 1, 1, 256, 32], "int"), ([], "text")])
def test_a_broken_orig_shape_is_named(tmp_path, original_sd, shape, kind):
    def extra(writer):
        if kind == "text":
            writer.add_string("comfy.gguf.orig_shape.positional_encoding", "1,256,32")
        else:
            writer.add_array("comfy.gguf.orig_shape.positional_encoding", shape)

    path = write_gguf(tmp_path / "shape.gguf", original_sd, extra=extra)
    gguf_fails(path, r"shape.gguf: GGUF metadata comfy.gguf.orig_shape.positional_encoding=.* is not a shape of "
                     r"8,192 elements")


@pytest.mark.parametrize("value", ["abc", 7, 0])
def test_a_gguf_head_dim_that_does_not_divide(tmp_path, original_sd, value):
    key = "aura_flow.attention_head_dim"
    path = write_gguf(tmp_path / "head.gguf", original_sd, extra=lambda w: w.add_string(key, value)
                      if isinstance(value, str) else w.add_uint32(key, value))
    gguf_fails(path, rf"head.gguf: its metadata {key}='{value}' is not a whole number that divides the transformer "
                     r"width 32")


def test_a_truncated_gguf_is_refused_before_reading(tmp_path, original_sd):
    path = write_gguf(tmp_path / "cut.gguf", original_sd)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 64)
    gguf_fails(path, r"cut.gguf: not a readable GGUF file: tensor '\S+' \([\d,]+ values\) ends at byte [\d,]+, past "
                     r"the end of the [\d,]+-byte file")


def test_the_cli_says_a_hostile_gguf_in_one_line(tmp_path, parts, capsys):
    path = tmp_path / "loop.gguf"
    path.write_bytes(header((b"general.architecture", struct.pack("<IQ", 8, 4) + b"aura"),
                            (b"big", struct.pack("<IIQ", 9, 8, 10**8))))
    t0 = time.monotonic()
    rc = main(["generate", "--checkpoint", str(path), "--text-encoder", str(parts[1]["text_encoder"]), "--vae",
               str(parts[1]["vae"]), "--tokenizer", str(parts[1]["tokenizer"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {path}: not a readable GGUF file") and "Traceback" not in err
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------------------------------------ other layouts
def test_original_keys_with_a_non_numeric_block(tmp_path, tiny_models):
    kw = tiny_models["transformer_only"]
    sd = load_file(str(kw["checkpoint"]))
    for k in [k for k in sd if k.startswith("double_layers.0.")]:
        sd["double_layers.first." + k[len("double_layers.0."):]] = sd.pop(k)
    save_file(sd, str(tmp_path / "orig.safetensors"))
    with pytest.raises(LoadError, match=r"orig.safetensors: key 'double_layers.first.\S+' has block index 'first', "
                                        r"expected a whole number"):
        aura_flow.load(tmp_path / "orig.safetensors", device="cpu", text_encoder=kw["text_encoder"], vae=kw["vae"],
                       tokenizer=Path(kw["vae"]).parent / "tokenizer.model")


def test_a_single_file_with_a_damaged_tokenizer_and_vae(tmp_path, tiny_models):
    src = Path(tiny_models["single_file"]["checkpoint"])
    sd = load_file(str(src))
    spiece = "text_encoders.pile_t5xl.spiece_model"  # where ComfyUI serializes the tokenizer
    sd[spiece] = torch.full((64,), 7, dtype=torch.uint8)
    save_file(sd, str(tmp_path / "all.safetensors"))
    with pytest.raises(LoadError, match=rf"all.safetensors: the tokenizer stored as {spiece} \(64 uint8 values\) is no "
                                        r"sentencepiece model"):
        aura_flow.load(tmp_path / "all.safetensors", device="cpu")
    sd = load_file(str(src))
    for k in [k for k in sd if k.startswith("vae.encoder.down.1.")]:
        sd["vae.encoder.down.one." + k[len("vae.encoder.down.1."):]] = sd.pop(k)
    save_file(sd, str(tmp_path / "all.safetensors"))
    with pytest.raises(LoadError, match=r"all.safetensors: key 'encoder.down.one.\S+' has block index 'one'"):
        aura_flow.load(tmp_path / "all.safetensors", device="cpu", tokenizer=src.parent / "tokenizer.model")


def fp8_transformer(tiny_models, tmp_path):
    """The tiny transformer written as an fp8 file (``tmp_path/fp8.safetensors``), and the other parts' paths
    (``aura_flow.load`` keywords) to load it with."""
    from aura_flow.weights.writers import write_fp8

    kw = tiny_models["transformer_only"]
    extra = dict(text_encoder=kw["text_encoder"], vae=kw["vae"], tokenizer=Path(kw["vae"]).parent / "tokenizer.model")
    return write_fp8(tmp_path / "fp8.safetensors", load_file(str(kw["checkpoint"])), prefix=""), extra


def test_fp8_metadata_and_scales(tmp_path, tiny_models):
    path, extra = fp8_transformer(tiny_models, tmp_path)
    sd = load_file(str(path))
    scale = next(k for k in sd if k.endswith(".scale_weight"))
    save_file(sd, str(path), metadata={"_quantization_metadata": "{not json"})
    with pytest.raises(LoadError, match=r"fp8.safetensors: metadata _quantization_metadata is not readable JSON"):
        aura_flow.load(path, device="cpu", **extra)
    save_file(sd, str(path), metadata={"_quantization_metadata": json.dumps({"layers": {"a": ["x"]}})})
    with pytest.raises(LoadError, match=r"fp8.safetensors: layer 'a' is quantized as \['x'\]"):
        aura_flow.load(path, device="cpu", **extra)
    sd[scale] = torch.ones(5)
    save_file(sd, str(path))
    with pytest.raises(LoadError, match=rf"fp8.safetensors: the fp8 scale of {scale[:-len('.scale_weight')]}.weight "
                                        r"has shape \(5,\) and dtype float32, expected one finite float or one per row"):
        aura_flow.load(path, device="cpu", **extra)
