"""Every tensor of every part is checked from the file headers against the model they describe before any tensor
is read (issue 20): files written with safetensors' and gguf's own writers, then given a tensor whose header claims
an absurd shape over a sparse data region (4 GiB that the disk does not hold: reading it would take that much
memory), a wrong dtype, a truncated data region, or a config that does not match. Each is a `LoadError`
naming the file, the tensor, what was found and what was expected, within seconds; a tensor no part uses is never
read at all (the same 4 GiB tensor beside a valid model loads). The reads are counted through the real reader, and
the process's peak memory must not grow by the tensor's size."""
from __future__ import annotations

import json
import math
import resource
import shutil
import time
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

import aura_flow
from aura_flow.errors import LoadError
from test_hostile_files import write_gguf

BIG = (1 << 15, 1 << 15)  # float32: 4 GiB (safetensors maps the whole file: not more than the machine can map)
GIB = 1 << 30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def with_sparse_tensor(path: Path, key: str, shape, dtype: str = "F32", itemsize: int = 4) -> Path:
    """``path`` (a safetensors file) with ``key`` added at the end of its data region, the region extended sparsely
    to hold it: a header any safetensors reader takes, over bytes the disk does not hold."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    nbytes = math.prod(shape) * itemsize
    header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(body), len(body) + nbytes]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw + body)
        fh.truncate(8 + len(raw) + len(body) + nbytes)
    return path


@pytest.fixture
def parts(tiny_models, tmp_path):
    """A private copy of the transformer-only (diffusers keys) tiny model: its files, as load() takes them."""
    kw = tiny_models["transformer_only_diffusers"]
    src = Path(kw["checkpoint"]).parent
    dest = tmp_path / "tiny"
    shutil.copytree(src, dest)
    return dict(checkpoint=dest / Path(kw["checkpoint"]).name, text_encoder=dest / "text_encoder.safetensors",
                vae=dest / "vae.safetensors", tokenizer=dest / "tokenizer.model")


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The keys of every tensor read through safetensors (the real reader, counted)."""
    seen: list[str] = []
    real_open = safetensors.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self._h = real_open(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._h, name)

        def get_tensor(self, key):
            seen.append(key)
            return self._h.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    return seen


def refused(parts, match, **change) -> LoadError:
    t0 = time.monotonic()
    with pytest.raises(LoadError, match=match) as info:
        aura_flow.load(device="cpu", **{**parts, **change})
    assert time.monotonic() - t0 < 10
    return info.value


def replace_sparse(path: Path, key: str, shape, **kw) -> Path:
    sd = load_file(str(path))
    del sd[key]
    save_file(sd, str(path))
    return with_sparse_tensor(path, key, shape, **kw)


@pytest.mark.parametrize("part, key, expected", [
    ("checkpoint", "joint_transformer_blocks.0.attn.to_q.weight", r"transformer tensor joint_transformer_blocks.0.attn"
                                                                  r".to_q.weight has shape \(32768, 32768\), "
                                                                  r"expected \(32, 32\)"),
    ("vae", "decoder.conv_in.bias", r"VAE weight decoder.conv_in.bias has shape \(32768, 32768\), expected \(32,\)"),
    ("text_encoder", "encoder.final_layer_norm.weight", r"text encoder weight encoder.final_layer_norm.weight has "
                                                        r"shape \(32768, 32768\), expected \(32,\)"),
])
def test_a_huge_tensor_is_refused_from_its_header(parts, reads, part, key, expected):
    path = replace_sparse(parts[part], key, BIG)
    assert path.stat().st_size > 4 * GIB
    before = peak_rss()
    error = refused(parts, expected)
    assert str(path) in str(error) and key not in reads and peak_rss() - before < GIB


def test_a_tensor_no_part_uses_is_never_read(parts, caplog, reads):
    with_sparse_tensor(parts["checkpoint"], "someone_elses.weight", BIG)
    before = peak_rss()
    pipe = aura_flow.load(device="cpu", **parts)
    assert pipe.transformer.config.num_mmdit_layers == 1 and peak_rss() - before < GIB
    assert "someone_elses.weight" not in reads and "ignoring 1 tensors that are not part of the transformer" in \
        caplog.text


def test_nothing_is_read_before_the_last_block_is_checked(parts, reads):
    """The wrong tensor is the transformer's last one: every part's header is checked before any part is read."""
    key = "single_transformer_blocks.0.ff.linear_2.weight"
    sd = load_file(str(parts["checkpoint"]))
    sd[key] = torch.zeros(32, 48)
    save_file(sd, str(parts["checkpoint"]))
    refused(parts, rf"transformer tensor {key} has shape \(32, 48\), expected \(256, 32\)")
    assert reads == []


def test_a_truncated_data_region_is_named(parts):
    path = parts["checkpoint"]
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    refused(parts, r"not a readable safetensors file \(tensor '\S+' ends at byte [\d,]+, past the end of the "
                   r"[\d,]+-byte file: the download is truncated\)")
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    refused(parts, r"its header claims 1,099,511,627,776 bytes, but the file holds 10\)")


@pytest.mark.parametrize("dtype, itemsize, match", [
    ("F8_E8M0", 1, r"tensor 'proj_out.weight' is stored as F8_E8M0, a type this pack does not read"),
    ("C64", 8, r"tensor 'proj_out.weight' is stored as C64"),
    ("I64", 8, r"transformer weights are not floating point \(e.g. proj_out.weight: int64\)"),
])
def test_a_weight_type_that_is_not_a_float_is_named(parts, reads, dtype, itemsize, match):
    replace_sparse(parts["checkpoint"], "proj_out.weight", (16, 32), dtype=dtype, itemsize=itemsize)
    refused(parts, match)
    assert reads == []


def test_a_config_width_that_the_weights_do_not_have(tmp_path, tiny_models, reads):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["diffusers"]["checkpoint"], folder)
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, num_attention_heads=8, caption_projection_dim=64)))
    with pytest.raises(LoadError, match=r"model/transformer: transformer tensor register_tokens has shape "
                                        r"\(1, 8, 32\), expected \(1, 8, 64\)"):
        aura_flow.load(folder, device="cpu")
    assert reads == []


def test_a_gguf_tensor_info_is_checked_before_a_block_is_read(tmp_path, tiny_models):
    """A GGUF (gguf's own writer) whose tensor info claims a terabyte over a sparse file: refused from the info."""
    from aura_flow.weights.gguf import load_gguf_transformer

    sd = load_file(str(tiny_models["transformer_only"]["checkpoint"]))
    path = write_gguf(tmp_path / "big.gguf", sd)
    data = bytearray(path.read_bytes())
    name = b"double_layers.0.attn.w1q.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    assert data[at:at + 20] == (2).to_bytes(4, "little") + (32).to_bytes(8, "little") * 2
    data[at + 4:at + 20] = (1 << 18).to_bytes(8, "little") + (1 << 20).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with open(path, "r+b") as fh:
        fh.truncate(len(data) + (1 << 40))
    t0 = time.monotonic()
    with pytest.raises(LoadError, match=r"big.gguf: transformer tensor joint_transformer_blocks.0.attn.add_q_proj."
                                        r"weight has shape \(1048576, 262144\), expected \(32, 32\)"):
        load_gguf_transformer(path, torch.float32)
    assert time.monotonic() - t0 < 10
