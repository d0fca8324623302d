"""Hostile LoRA files (issue 20): peft metadata (``lora_alpha``, ``r``, ``alpha_pattern`` / ``rank_pattern``),
rank-0, oversized, integer and NaN tensors, paths that are no regular file, the same LoRA twice. Files are written
with safetensors (diffusers/peft and kohya key styles, as tests/lora_files.py does); each broken value is a
`LoadError` naming the file and the field, before the tensors are read where the header tells, and the command line
says it in one ``error:`` line with exit 2."""
from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import aura_flow
from aura_flow.cli import main
from aura_flow.errors import LoadError
from aura_flow.lora import LoraFile, apply_loras, prepare_lora
from aura_flow.lora.peft_config import PatternMatcher
from aura_flow.pipeline.loras import check_loras
from lora_files import LAYERS_A, linear_shapes, write_lora

# ------------------------------------------------------------------------------------------------ LoRA files
SHAPES = linear_shapes()
LAYER = "joint_transformer_blocks.0.attn.to_q"


def peft_lora(path, metadata=None, *, rank=3, layers=(LAYER,), dtype=torch.float32, fill=None) -> Path:
    """A diffusers/peft LoRA (``transformer.<layer>.lora_A/B.weight``) with ``metadata`` as diffusers' peft config."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in layers:
        out_f, in_f = SHAPES[name]
        sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.1).to(dtype)
        sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.1).to(dtype)
    if fill is not None:
        sd[f"transformer.{layers[0]}.lora_A.weight"][0, 0] = fill
    meta = None if metadata is None else {"lora_adapter_metadata": json.dumps(metadata)}
    save_file(sd, str(path), metadata=meta)
    return Path(path)


@pytest.mark.parametrize("config, match", [
    ({"lora_alpha": "abc"}, r"lora_alpha='abc': expected a finite number"),
    ({"lora_alpha": [1]}, r"lora_alpha=\[1\]: expected a finite number"),
    ({"lora_alpha": True}, r"lora_alpha=True: expected a finite number"),
    ({"r": 0}, r"r=0: expected a whole number 1..65536"),
    ({"r": "3"}, r"r='3': expected a whole number"),
    ({"use_rslora": "yes"}, r"use_rslora='yes': expected true or false"),
    ({"alpha_pattern": ["x"]}, r"alpha_pattern=\['x'\]: expected an object of at most 1024"),
    ({"alpha_pattern": {"to_q": "x"}}, r"alpha_pattern\['to_q'\]='x': expected finite numbers"),
    ({"alpha_pattern": {"(to_q": 2}}, r"alpha_pattern='\(to_q': expected regular expressions"),
    ({"alpha_pattern": {"a" * 300: 2}}, r"alpha_pattern='aaaa.*: expected patterns of at most 256 characters"),
    ({"rank_pattern": {"to_q": 0}}, r"rank_pattern\['to_q'\]=0: expected whole numbers"),
    ([1, 2], r"\(the whole config\)=\[1, 2\]"),
])
def test_peft_metadata_values_are_checked_when_the_file_is_opened(tmp_path, config, match):
    path = peft_lora(tmp_path / "meta.safetensors", config)
    with pytest.raises(LoadError, match=rf"meta.safetensors: lora_adapter_metadata {match}"):
        check_loras([(path, 1.0)])


def test_unreadable_peft_metadata_and_sidecars(tmp_path):
    path = tmp_path / "raw.safetensors"
    save_file({f"transformer.{LAYER}.lora_A.weight": torch.zeros(2, 32)}, str(path),
              metadata={"lora_adapter_metadata": "[" * 100000})
    with pytest.raises(LoadError, match=r"raw.safetensors: lora_adapter_metadata is not readable JSON"):
        LoraFile(path)
    peft = tmp_path / "peft"
    peft.mkdir()
    peft_lora(peft / "adapter_model.safetensors")
    (peft / "adapter_config.json").write_text(json.dumps({"lora_alpha": {"a": 1}}))
    with pytest.raises(LoadError, match=r"adapter_config.json: adapter_config.json lora_alpha=\{'a': 1\}"):
        LoraFile(peft)


def test_the_cli_reports_a_bad_lora_alpha_in_one_line(tmp_path, tiny_models, capsys):
    path = peft_lora(tmp_path / "alpha.safetensors", {"lora_alpha": "abc"})
    rc = main(["generate", "--checkpoint", str(tiny_models["diffusers"]["checkpoint"]), "--lora", str(path), "--out",
               str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --lora {path}: ") and "lora_alpha='abc'" in err
    assert "Traceback" not in err


def test_patterns_match_as_peft_does():
    from peft.utils.other import get_pattern_key

    names = [*SHAPES, "a.b.c", "xto_q", "attn_to_q"]
    patterns = ["to_q", "attn.to_q", "0.attn.to_q", "attn", "blocks.0", "ff.linear_1", r"joint_.*\.to_[qk]",
                r".*single.*", "o_q", "attn.to.q", "c", "a.b.c", "b.c", r"(to_q|to_v)", "^joint.*proj"]
    matcher = PatternMatcher("test")
    for name in names:
        for pattern in patterns:
            peft_hit = get_pattern_key([pattern], name) == pattern
            assert (matcher.first({pattern: 1}, name, "alpha_pattern") == 1) == peft_hit, (pattern, name)


def test_alpha_pattern_order_and_scale(tmp_path, tiny_pipe):
    path = peft_lora(tmp_path / "pat.safetensors", {"r": 3, "lora_alpha": 3, "alpha_pattern": {
        "attn.to_q": 6, "to_q": 12}})
    patch = prepare_lora(path, tiny_pipe.transformer).patches[LAYER]
    assert patch.scale == 2.0  # the first matching pattern: 6 / 3


def test_a_backtracking_pattern_is_stopped(tmp_path, tiny_pipe):
    path = peft_lora(tmp_path / "redos.safetensors", {"alpha_pattern": {r"(\w|\w)*[^\w.]": 2.0}})
    t0 = time.monotonic()
    with pytest.raises(LoadError, match=r"redos.safetensors: alpha_pattern pattern '\(\\\\w\|\\\\w\)\*\[\^\\\\w\.\]' takes "
                                        r"too long to match the layer names"):
        prepare_lora(path, tiny_pipe.transformer)
    assert time.monotonic() - t0 < 5


def test_rank_pattern_is_checked_against_the_weights(tmp_path, tiny_pipe):
    path = peft_lora(tmp_path / "rank.safetensors", {"r": 3, "rank_pattern": {"attn.to_q": 8}})
    with pytest.raises(LoadError, match=rf"rank.safetensors: its peft config gives layer {LAYER} rank 8 \(r / "
                                        r"rank_pattern\), but its tensors have rank 3"):
        prepare_lora(path, tiny_pipe.transformer)


@pytest.mark.parametrize("rank, style", [(0, "peft"), (0, "kohya")])
def test_rank_zero_factors(tmp_path, tiny_pipe, rank, style):
    path = write_lora(tmp_path / "zero.safetensors", (LAYER,), rank=rank, style=style)
    with pytest.raises(LoadError, match=r"zero.safetensors: module \S+: rank 0 \(down \(0, 32\), up \(32, 0\)\)"):
        prepare_lora(path, tiny_pipe.transformer)


def test_loha_and_lokr_rank_zero(tmp_path, tiny_pipe):
    stem = "lycoris_" + LAYER.replace(".", "_")
    save_file({f"{stem}.hada_w1_a": torch.zeros(32, 0), f"{stem}.hada_w1_b": torch.zeros(0, 32),
               f"{stem}.hada_w2_a": torch.zeros(32, 0), f"{stem}.hada_w2_b": torch.zeros(0, 32),
               f"{stem}.alpha": torch.tensor(1.0)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoadError, match=r"loha.safetensors: module \S+: hada_w1_a \(32, 0\) and hada_w1_b \(0, 32\): "
                                        r"expected two matrices of rank >= 1"):
        prepare_lora(tmp_path / "loha.safetensors", tiny_pipe.transformer)


def sparse_lora(path, rows: int) -> Path:
    """A safetensors LoRA whose lora_A claims ``rows`` x 32 float32 values; the file is sparse (no disk used)."""
    out_f, in_f = SHAPES[LAYER]
    nbytes = rows * in_f * 4
    head = {f"transformer.{LAYER}.lora_A.weight": {"dtype": "F32", "shape": [rows, in_f],
                                                  "data_offsets": [0, nbytes]},
            f"transformer.{LAYER}.lora_B.weight": {"dtype": "F32", "shape": [out_f, 1],
                                                  "data_offsets": [nbytes, nbytes + out_f * 4]}}
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(8 + len(text) + nbytes + out_f * 4)
    return Path(path)


def test_a_huge_tensor_is_refused_from_the_header(tmp_path, tiny_pipe, monkeypatch):
    path = sparse_lora(tmp_path / "huge.safetensors", rows=1 << 23)  # 1 GiB of lora_A
    read = []
    monkeypatch.setattr(LoraFile, "read", lambda self, keys: read.append(keys) or {})
    with pytest.raises(LoadError, match=r"huge.safetensors: tensor \S+lora_A.weight has shape \(8388608, 32\) "
                                        r"\(268,435,456 values\), more than any patch of a 32x32 layer uses"):
        prepare_lora(path, tiny_pipe.transformer)
    assert read == []


def test_integer_factors_are_refused_from_the_header(tmp_path, tiny_pipe):
    path = peft_lora(tmp_path / "int.safetensors", dtype=torch.int32)
    with pytest.raises(LoadError, match=r"int.safetensors: tensor \S+ is stored as I32, expected floating-point"):
        prepare_lora(path, tiny_pipe.transformer)


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_nan_weights_name_the_lora_not_the_sampler(tmp_path, tiny_pipe, fill):
    path = peft_lora(tmp_path / "nan.safetensors", fill=fill)
    check_loras([(path, 1.0)])  # the header is fine; the values are checked as they are read
    with pytest.raises(LoadError, match=rf"nan.safetensors: tensor transformer.{LAYER}.lora_A.weight holds NaN or "
                                        r"infinite values \(1 of 96\)"):
        tiny_pipe.with_loras([(path, 1.0)]).generate(prompt="a fox", seed=1, steps=1, width=64, height=64)


def test_a_nan_alpha_is_named(tmp_path, tiny_pipe):
    path = write_lora(tmp_path / "alpha.safetensors", (LAYER,), alpha=float("nan"))
    with pytest.raises(LoadError, match=r"alpha.safetensors: tensor \S+\.alpha holds NaN"):
        prepare_lora(path, tiny_pipe.transformer)
    sd = load_file(str(path))
    sd[next(k for k in sd if k.endswith(".alpha"))] = torch.zeros(0)
    save_file(sd, str(path))
    with pytest.raises(LoadError, match=r"alpha.safetensors: module \S+: alpha \S+ holds 0 values, expected one"):
        prepare_lora(path, tiny_pipe.transformer)


def test_a_fifo_is_not_a_missing_file(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(LoadError, match=r"pipe.safetensors: exists but is not a regular file"):
        check_loras([(fifo, 1.0)])
    with pytest.raises(LoadError, match=r"vae='\S+pipe.safetensors' is not a regular file or a folder"):
        aura_flow.load(tmp_path, vae=fifo, device="cpu")
    assert time.monotonic() - t0 < 5


def test_the_same_lora_twice_warns(tmp_path, tiny_pipe, caplog):
    path = write_lora(tmp_path / "twice.safetensors", LAYERS_A)
    caplog.set_level(logging.WARNING)
    entries = check_loras([(path, 0.5), (tmp_path / "." / "twice.safetensors", 0.5)])
    assert len(entries) == 2
    assert "twice.safetensors: the same LoRA is given 2 times" in caplog.text
    caplog.clear()
    report = apply_loras(tiny_pipe.transformer, [(path, 1.0), (path, 1.0)])
    assert len(report.loras) == 2 and "the same LoRA is given 2 times" in caplog.text
    apply_loras(tiny_pipe.transformer, [])


def test_a_dora_magnitude_of_the_wrong_shape(tmp_path, tiny_pipe):
    layer = "joint_transformer_blocks.0.ff.linear_1"
    out_f, in_f = SHAPES[layer]
    assert out_f != in_f
    path = peft_lora(tmp_path / "dora.safetensors", layers=(layer,))
    sd = load_file(str(path))
    sd[f"transformer.{layer}.lora_magnitude_vector"] = torch.ones(in_f)
    save_file(sd, str(path))
    with pytest.raises(LoadError, match=rf"dora.safetensors: DoRA magnitude of \S+ has shape \({in_f},\), expected "
                                        rf"\({out_f},\), \({out_f}, 1\) or \(1, {in_f}\)"):
        prepare_lora(path, tiny_pipe.transformer)
