"""Hostile and broken model folders (issue #13): no code runs from a folder, nothing is read outside it, pickles are
refused by name, and malformed indexes, configs and shards are a LoadError naming the file, found before the big
weights are read. Every case uses real files (copies of the tiny models) and leaves them unchanged."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import safetensors

import aura_flow
from aura_flow.errors import LoadError

STEM = "diffusion_pytorch_model"


@pytest.fixture
def folder(tmp_path, tiny_models) -> Path:
    """A private copy of the tiny diffusers folder (its transformer in 2 shards and an index)."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_models["diffusers"]["checkpoint"], dest)
    return dest


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every safetensors file opened (through the real reader), in order; and tensors read, as ("tensor", key)."""
    seen: list[str] = []
    real_open = safetensors.safe_open

    class Counting:
        def __init__(self, path, *args, **kwargs):
            seen.append(str(path))
            self._h = real_open(path, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._h, name)

        def get_tensor(self, key):
            seen.append(("tensor", key))
            return self._h.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    return seen


def state(root: Path) -> dict:
    """Every file under ``root`` with its size and mtime (links not followed): a load must change none."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def index_of(folder: Path) -> Path:
    return folder / "transformer" / f"{STEM}.safetensors.index.json"


def rewrite_index(folder: Path, change) -> None:
    path = index_of(folder)
    doc = json.loads(path.read_text())
    change(doc["weight_map"])
    path.write_text(json.dumps(doc))


def fails_before_weights(opened, path, match, **kwargs) -> LoadError:
    with pytest.raises(LoadError, match=match) as info:
        aura_flow.load(path, device="cpu", **kwargs)
    assert not any(isinstance(o, tuple) for o in opened), "a tensor was read before the error"
    return info.value


# ------------------------------------------------------------------------------------------------ code execution
def evil_tokenizer(folder: Path, marker: Path) -> Path:
    tok = folder / "tokenizer"
    config = json.loads((tok / "tokenizer_config.json").read_text()) if (tok / "tokenizer_config.json").exists() \
        else {}
    config.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                 "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    return tok


def test_a_tokenizer_folder_never_runs_its_code(folder, tmp_path, opened, monkeypatch):
    marker = tmp_path / "code_ran"
    tok = evil_tokenizer(folder, marker)
    before = state(folder)
    monkeypatch.setattr("sys.stdin", None)  # transformers would ask "[y/N]" on a terminal
    err = fails_before_weights(opened, folder, r"tokenizer_config.json: the tokenizer asks to run Python code from "
                                               r"its folder \(auto_map\); code from a model folder is never run")
    assert "tokenizer.model" in str(err)  # the fix
    # and transformers itself is told never to: without the pack's own check it refuses too
    monkeypatch.setattr("aura_flow.prompts._refuse_code", lambda folder: None)
    with pytest.raises(LoadError, match="cannot load the tokenizer"):
        aura_flow.prompts.PromptTokenizer.load(tok)
    assert not marker.exists()
    assert state(folder) == before


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickled_checkpoints_are_refused_by_name(tmp_path, opened, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04 not even opened")
    err = fails_before_weights(opened, path, rf"model\{suffix}: a pickled PyTorch file \({suffix}\); it is not read, "
                                             "because unpickling can run code. Use the .safetensors version")
    assert opened == [] and isinstance(err, LoadError)


def test_a_folder_with_only_pickles_says_so(folder, opened):
    weights = folder / "vae" / f"{STEM}.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    fails_before_weights(opened, folder, r"vae: no diffusion_pytorch_model\*.safetensors weights found \(only "
                                         r"pickled .bin files, which are not read")


# ------------------------------------------------------------------------------------------------ shard indexes
@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                 "link.safetensors"])
def test_a_shard_index_never_points_outside_its_folder(folder, tmp_path, opened, bad):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(next((folder / "transformer").glob(f"{STEM}-00001-*")), outside)
    (folder / "transformer" / "link.safetensors").symlink_to(outside)
    rewrite_index(folder, lambda m: m.update({k: bad for k in list(m)[:3]}))
    before = state(folder)
    fails_before_weights(opened, folder, rf"index.json: the shard index names '{bad}', outside the model folder")
    assert str(outside) not in opened and not any("transformer" in str(o) for o in opened)
    assert state(folder) == before


def test_the_hugging_face_cache_layout_still_loads(folder, tmp_path, tiny_pipe):
    """The hub cache keeps every file as a link into the repository's blobs/: that is not "outside"."""
    repo = tmp_path / "hub" / "models--fal--AuraFlow-tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(folder.rglob("*")):
        target = snapshot / path.relative_to(folder)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        blob = repo / "blobs" / f"{abs(hash(str(path))):x}"
        shutil.copy(path, blob)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    pipe = aura_flow.load(snapshot, device="cpu")
    assert sum(p.numel() for p in pipe.transformer.parameters()) == \
        sum(p.numel() for p in tiny_pipe.transformer.parameters())


@pytest.mark.parametrize("text, match", [
    ("{not json", r"index.json: cannot read the shard index \(JSONDecodeError"),
    ("[1, 2]", "index.json: the shard index is not a JSON object"),
    ('{"weight_map": []}', "index.json: the shard index has no weight_map of tensor names to file names"),
    ('{"weight_map": {"a": 5}}', "index.json: the shard index has no weight_map"),
    ('{"weight_map": {"a": "notes.txt"}}', "index.json: the shard index names 'notes.txt', not a .safetensors file"),
    ("[" * 100000, r"index.json: cannot read the shard index \(RecursionError"),
])
def test_malformed_shard_indexes_name_the_file(folder, opened, text, match):
    index_of(folder).write_text(text)
    fails_before_weights(opened, folder, match)


def test_a_missing_shard_is_named(folder, opened):
    shard = next((folder / "transformer").glob(f"{STEM}-00002-*"))
    shard.unlink()
    fails_before_weights(opened, folder, rf"shard {shard.name} is missing from .*transformer; download it again "
                                         r"\(the index names 2 shards\)")


def test_one_shard_alone_is_refused_with_the_fix(folder, opened):
    shard = next((folder / "transformer").glob(f"{STEM}-00001-*"))
    err = fails_before_weights(opened, shard, "this is shard 1 of 2 of a sharded model; give the folder that holds "
                                              "all 2 shards")
    assert opened == [] and "index.json" in str(err)


# ------------------------------------------------------------------------------------------------ configs
def edit_config(folder: Path, part: str, **values) -> Path:
    path = folder / part / "config.json"
    doc = json.loads(path.read_text())
    doc.update(values)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("values, match", [
    ({"num_mmdit_layers": -1}, r"num_mmdit_layers=-1 makes no model \(allowed: whole numbers 0..1000\)"),
    ({"num_mmdit_layers": 0, "num_single_dit_layers": 0}, "num_mmdit_layers=0 and num_single_dit_layers=0: a model "
                                                          "without layers"),
    ({"attention_head_dim": -8}, "attention_head_dim=-8 makes no model"),
    ({"num_attention_heads": "4"}, "num_attention_heads='4' makes no model"),
    ({"patch_size": 0}, "patch_size=0 makes no model"),
    ({"pos_embed_max_size": 1000}, "pos_embed_max_size=1000 is not a square number"),
    ({"joint_attention_dim": 10**12}, "joint_attention_dim=1000000000000 makes no model"),
])
def test_nonsense_transformer_configs_fail_before_any_weights(folder, opened, values, match):
    edit_config(folder, "transformer", **values)
    err = fails_before_weights(opened, folder, match)
    assert "transformer/config.json" in str(err) and "Download it again" in str(err)
    assert opened == []  # found from the config alone


def test_a_layer_count_that_drops_weights_is_an_error_not_a_debug_line(folder, opened):
    edit_config(folder, "transformer", num_mmdit_layers=0)
    fails_before_weights(opened, folder, "transformer/config.json: num_mmdit_layers=0, but the weights hold 1 of "
                                         "those blocks: the config does not match the weights")


def test_weights_beyond_the_config_are_an_error_in_the_assembly_too(tiny_models):
    """Where no header check ran (a state dict given directly), the assembly refuses blocks it has no place for."""
    import torch
    from safetensors.torch import load_file

    from aura_flow.weights.modules import transformer_from_sd

    src = tiny_models["transformer_only_diffusers"]["checkpoint"]
    sd = load_file(str(src))
    config = json.loads(json.dumps(aura_flow.weights.configs.infer_transformer_config(sd)))
    config["num_single_dit_layers"] = 0
    with pytest.raises(LoadError, match=r"weights have no place in the model its config describes \(e.g. "
                                        r"single_transformer_blocks.0."):
        transformer_from_sd(sd, src, {}, torch.float32, torch.float32, config)


def test_text_encoder_and_vae_configs(folder, opened):
    edit_config(folder, "text_encoder", num_layers=0)
    fails_before_weights(opened, folder, "text_encoder/config.json: num_layers=0: a model without layers")
    edit_config(folder, "text_encoder", num_layers=1, d_model="wide")
    fails_before_weights(opened, folder, "text_encoder/config.json: d_model='wide' makes no model")
    edit_config(folder, "text_encoder", d_model=json.loads((folder / "transformer" / "config.json").read_text())[
        "joint_attention_dim"])
    edit_config(folder, "vae", norm_num_groups=7)
    fails_before_weights(opened, folder, "vae/config.json: norm_num_groups=7 does not divide block_out_channels")
    (folder / "vae" / "config.json").write_text("\xff\xfe")
    fails_before_weights(opened, folder, r"vae/config.json: cannot read the config \(")


def test_unknown_config_values_are_ignored_with_a_warning(folder, caplog, tiny_pipe):
    edit_config(folder, "transformer", some_future_option=True)
    caplog.set_level(logging.WARNING)
    pipe = aura_flow.load(folder, device="cpu")
    assert "ignoring config values some_future_option" in caplog.text
    assert pipe.transformer.config.num_mmdit_layers == tiny_pipe.transformer.config.num_mmdit_layers


@pytest.mark.parametrize("value", ["abc", "7", "0", "-8", "1e3", "9" * 5000])
def test_a_broken_head_dim_in_the_metadata_is_a_load_error(tmp_path, tiny_models, value):
    from safetensors.torch import load_file, save_file

    src = Path(tiny_models["transformer_only_diffusers"]["checkpoint"])
    path = tmp_path / src.name
    save_file(load_file(str(src)), str(path), metadata={"aura_flow.attention_head_dim": value})
    kw = {k: v for k, v in tiny_models["transformer_only_diffusers"].items() if k != "checkpoint"}
    with pytest.raises(LoadError, match=rf"{path.name}: its metadata aura_flow.attention_head_dim=.* is not a whole "
                                        r"number that divides the transformer width 32"):
        aura_flow.load(path, tokenizer=src.parent / "tokenizer.model", device="cpu", **kw)


def test_missing_parts_are_found_before_any_tensor_is_read(tmp_path, tiny_models, opened):
    src = Path(tiny_models["transformer_only"]["checkpoint"])
    lone = tmp_path / src.name
    shutil.copy(src, lone)
    fails_before_weights(opened, lone, "has no text encoder")
    fails_before_weights(opened, lone, "has no VAE", text_encoder=tiny_models["transformer_only"]["text_encoder"])
    fails_before_weights(opened, lone, "no tokenizer found; give one as tokenizer=PATH",
                         text_encoder=tiny_models["transformer_only"]["text_encoder"],
                         vae=tiny_models["transformer_only"]["vae"])


def test_paths_that_are_no_files_never_block(tmp_path, folder):
    import time

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(LoadError, match="is not a regular file or a folder"):
        aura_flow.load(fifo, device="cpu")
    with pytest.raises(LoadError, match=r"checkpoint=123: give a path"):
        aura_flow.load(123, device="cpu")
    (folder / "vae" / "config.json").unlink()
    os.mkfifo(folder / "vae" / "config.json")
    with pytest.raises(LoadError, match="vae/config.json: the config is not a regular file"):
        aura_flow.load(folder, device="cpu")
    assert time.monotonic() - t0 < 10


def test_a_gguf_header_with_impossible_counts_is_a_load_error(tmp_path, tiny_models):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (10**12).to_bytes(8, "little") * 2)
    parts = tiny_models["transformer_only"]
    with pytest.raises(LoadError, match=r"hostile.gguf: not a readable GGUF file: the metadata count claims "):
        aura_flow.load(path, text_encoder=parts["text_encoder"], vae=parts["vae"],
                       tokenizer=Path(parts["vae"]).parent / "tokenizer.model", device="cpu")
