"""Every layout users have, read into components on the CPU, offline, lazily, one copy of the weights in memory.

Layouts (detected from the files themselves):
1. a diffusers folder (``model_index.json``; sharded ``transformer/``, ``*.fp16.safetensors`` variants too), or a
   bare diffusers transformer folder (``config.json``);
2. the all-in-one single file: transformer under ``model.`` (or ``model.diffusion_model.``) in the original key
   names, T5 under ``text_encoders.`` (ComfyUI: ``text_encoders.pile_t5xl.transformer.``), VAE under ``vae.`` in the
   original (ldm) key names;
3. a transformer-only file: safetensors in the original or the diffusers key names (bf16/fp16/fp32, fp8, ComfyUI's
   scaled fp8) or a GGUF, with the text encoder, tokenizer and VAE from separate files or folders.
Every part is located first, from file headers and folder listings (cheap), so a missing text encoder, VAE or
tokenizer is reported before any weights are read. Configs come from the folder's config.json files or are
inferred from tensor shapes. Nothing here touches the network or runs code from a model folder.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoadError, shown
from ..prompts import TOKENIZER_HINT, PromptTokenizer
from .configs import (check_layer_counts, check_t5_config, check_transformer_config, check_types, check_vae_config,
                      warn_unknown)
from .devices import resolve_device, resolve_dtypes
from .layouts import is_gguf, key_name, transformer_prefix
from .modules import text_encoder_from_sd, transformer_from_sd, vae_from_sd
from .reader import SafetensorsReader, folder_files, read_json, refuse_lone_shard, refuse_pickle


MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # a sentencepiece model a checkpoint carries (Pile-T5's: about 0.5 MB)


@dataclass
class Components:
    """What `load_components` read, on the CPU, and where and in which dtypes it is meant to run."""

    transformer: object = None
    text_encoder: object = None
    tokenizer: object = None
    vae: object = None
    sources: dict = field(default_factory=dict)  # part -> the file or folder it came from
    device: object = None  # the torch device the pipeline runs on
    compute_dtype: object = None  # the transformer's and text encoder's compute dtype (the VAE runs in fp32)


@dataclass
class _Located:
    """Where each part comes from, found before any weights are read."""

    transformer: tuple  # ("gguf", path) | ("safetensors", reader, prefix, config or None, source)
    text_encoder: tuple  # ("checkpoint", reader) | ("path", path)
    vae: tuple  # ("checkpoint", reader, prefix) | ("path", path)
    tokenizer: tuple  # ("checkpoint", reader, key) | ("path", path)


def comfyui_tokenizer_path() -> Path | None:
    """ComfyUI's bundled Pile-T5 tokenizer, when running inside ComfyUI (never imports ComfyUI itself)."""
    comfy = sys.modules.get("comfy")
    roots = [Path(p) for p in getattr(comfy, "__path__", [])] if comfy is not None else []
    for root in roots:
        p = root / "text_encoders" / "t5_pile_tokenizer" / "tokenizer.model"
        if p.exists():
            return p
    return None


def _check_path(name, value) -> Path | None:
    if value is None:
        return None
    try:
        p = Path(os.fspath(value)).expanduser()
    except TypeError:
        raise LoadError(f"{name}={shown(value)}: give a path to a file or folder") from None
    if "\0" in str(p):
        raise LoadError(f"{name}={str(p)!r}: a path cannot hold a NUL character")
    if not p.exists():
        raise LoadError(f"{name}={str(p)!r} does not exist")
    if not p.is_file() and not p.is_dir():  # a FIFO or a device would block the reader or never end
        raise LoadError(f"{name}={str(p)!r} is not a regular file or a folder")
    if p.is_file():  # by name, before anything is opened
        refuse_pickle(p)
        refuse_lone_shard(p)
    return p


def _locate_transformer(ckpt: Path, found: dict) -> tuple:
    """The transformer's source; for a diffusers folder also fills ``found`` with its text encoder, VAE and
    tokenizer folders."""
    if not ckpt.is_dir():
        if is_gguf(ckpt):
            from .gguf import check_gguf  # the gguf package: only for GGUF files

            check_gguf(ckpt)  # another model's GGUF is named now, not after a search for its text encoder
            return ("gguf", ckpt)
        reader = SafetensorsReader([ckpt])
        keys = list(reader.keys())
        prefix = transformer_prefix(ckpt, keys)
        if any(k.startswith("text_encoders.") for k in keys):
            found["text_encoder"] = ("checkpoint", reader)
            spiece = next((k for k in keys if k.startswith("text_encoders.") and k.endswith("spiece_model")), None)
            if spiece is not None:  # ComfyUI serializes the tokenizer into the checkpoint
                found["tokenizer"] = ("checkpoint", reader, spiece)
        vae_prefix = "vae." if any(k.startswith("vae.") for k in keys) else \
            "first_stage_model." if any(k.startswith("first_stage_model.") for k in keys) else None
        if vae_prefix:
            found["vae"] = ("checkpoint", reader, vae_prefix)
        return ("safetensors", reader, prefix, None, ckpt)
    if not (ckpt / "model_index.json").exists():
        if (ckpt / "config.json").exists():  # a bare diffusers transformer folder
            return _diffusers_transformer(ckpt)
        raise LoadError(f"{ckpt}: a folder without model_index.json or config.json; expected a diffusers "
                        f"AuraFlow folder (like fal/AuraFlow-v0.3)")
    tdir = ckpt / "transformer"
    if not tdir.is_dir():
        raise LoadError(f"{ckpt}: diffusers folder without transformer/")
    for part, sub in (("text_encoder", "text_encoder"), ("vae", "vae"), ("tokenizer", "tokenizer")):
        if (ckpt / sub).is_dir():
            found[part] = ("path", ckpt / sub)
    return _diffusers_transformer(tdir)


def _diffusers_transformer(folder: Path) -> tuple:
    """A diffusers transformer folder: its config checked, and against its weights' headers."""
    config = check_transformer_config(read_json(folder / "config.json"), folder / "config.json")
    reader = SafetensorsReader(folder_files(folder, "diffusion_pytorch_model"))
    check_layer_counts(config, reader.keys(), folder / "config.json")
    return ("safetensors", reader, "", config, folder)


def _locate(ckpt: Path, tok_path, te_path, vae_path) -> _Located:
    found: dict = {}
    transformer = _locate_transformer(ckpt, found)
    text_encoder = ("path", te_path) if te_path is not None else found.get("text_encoder")
    if text_encoder is None:
        raise LoadError(f"{ckpt}: has no text encoder; give one as text_encoder=PATH (a Pile-T5-XL .safetensors or a "
                        f"diffusers text_encoder folder)")
    vae = ("path", vae_path) if vae_path is not None else found.get("vae")
    if vae is None:
        raise LoadError(f"{ckpt}: has no VAE; give one as vae=PATH (the SDXL VAE .safetensors or a diffusers vae "
                        f"folder)")
    tokenizer = ("path", tok_path) if tok_path is not None else found.get("tokenizer")
    if tokenizer is None and te_path is not None and te_path.is_dir():
        for cand in (te_path / "tokenizer", te_path.parent / "tokenizer", te_path / "tokenizer.model"):
            if cand.exists():
                tokenizer = ("path", cand)
                break
    if tokenizer is None and not ckpt.is_dir() and (ckpt.parent / "tokenizer.model").exists():
        tokenizer = ("path", ckpt.parent / "tokenizer.model")
    if tokenizer is None and comfyui_tokenizer_path() is not None:
        tokenizer = ("path", comfyui_tokenizer_path())
    if tokenizer is None:
        raise LoadError(f"{ckpt}: no tokenizer found; {TOKENIZER_HINT}, or put tokenizer.model next to the checkpoint")
    return _Located(transformer, _component_folder(text_encoder, "text_encoder", check_t5_config),
                    _component_folder(vae, "vae", check_vae_config), tokenizer)


def _plan_transformer(where: tuple, storage, compute):
    """``(the transformer on the meta device, checked against its headers, nothing read; finish)``: ``finish()``
    reads it."""
    if where[0] == "gguf":
        from .gguf import load_gguf_transformer

        return load_gguf_transformer(where[1], compute, deferred=True)
    _kind, reader, prefix, config, source = where
    sd = reader.lazy(prefix, strip=False, dtype=compute, keep_fp8=True)
    return transformer_from_sd(sd, source, reader.metadata, storage, compute, config, deferred=True)


def _component_folder(where: tuple, sub: str, check) -> tuple:
    """A text encoder or VAE given as a folder: ``("folder", the folder holding its weights, its config.json's
    values checked with ``check``, or None)``, found before any weights are read; other sources as they are."""
    if where[0] != "path" or not where[1].is_dir():
        return where
    path = where[1]
    if not (path / "config.json").exists() and (path / sub).is_dir():  # a whole diffusers folder
        path = path / sub
    cfg_file = path / "config.json"
    return ("folder", path, check(read_json(cfg_file), cfg_file) if cfg_file.exists() else None)


def _plan_text_encoder(where: tuple, dtype):
    """The text encoder planned (see `_plan_transformer`)."""
    if where[0] == "checkpoint":
        reader = where[1]
        sd, source, config = ({k: v for k, v in reader.lazy("text_encoders.", dtype=dtype).items()
                               if not k.endswith("spiece_model")}, reader.files[0], None)
    elif where[0] == "folder":
        _kind, path, values = where
        config = _t5_config(values, path / "config.json") if values is not None else None
        sd, source = SafetensorsReader(folder_files(path, "model")).lazy(dtype=dtype), path
    else:
        sd, source, config = SafetensorsReader([where[1]]).lazy(dtype=dtype), where[1], None
    return text_encoder_from_sd(sd, source, config, deferred=True)


def _t5_config(values: dict, cfg_file: Path):
    """A UMT5Config from a config.json's checked values (never code: ``auto_map`` and the like are not followed)."""
    from transformers import UMT5Config

    kind = values.get("model_type", "umt5")
    if kind not in ("t5", "umt5", "mt5"):
        raise LoadError(f"{cfg_file}: model_type={shown(kind)}: the config of another model, not a T5 encoder; "
                        "AuraFlow's text encoder is Pile-T5-XL (give it as text_encoder=PATH)")
    defaults = UMT5Config().to_dict()
    check_types(values, defaults, "UMT5Config", cfg_file)
    warn_unknown(values, {*defaults, "auto_map"}, "UMT5Config", cfg_file)
    try:
        return UMT5Config(**{k: v for k, v in values.items() if k not in ("architectures", "auto_map")})
    except Exception as exc:  # TypeError, ValueError, huggingface_hub's StrictDataclassError for a value's type
        raise LoadError(f"{cfg_file}: not a T5 encoder config ({exc.__class__.__name__}: {str(exc)[:200]}); download "
                        "the text encoder again") from None


def _plan_vae(where: tuple):
    """The VAE planned (see `_plan_transformer`); it runs in float32."""
    import torch

    if where[0] == "checkpoint":
        _kind, reader, prefix = where
        sd, source, config = reader.lazy(prefix, dtype=torch.float32), reader.files[0], None
    elif where[0] == "folder":
        _kind, path, config = where
        sd, source = SafetensorsReader(folder_files(path, "diffusion_pytorch_model")).lazy(dtype=torch.float32), path
    else:
        sd, source, config = SafetensorsReader([where[1]]).lazy(dtype=torch.float32), where[1], None
    return vae_from_sd(sd, source, config, deferred=True)


def _read_tokenizer(where: tuple) -> PromptTokenizer:
    import torch

    if where[0] == "checkpoint":
        _kind, reader, key = where
        shape, kind = reader.header(key)
        if kind != "U8" or len(shape) != 1 or shape[0] > MAX_TOKENIZER_BYTES:
            raise LoadError(f"{reader.files[0]}: the tokenizer stored as {key_name(key)} is {kind} of shape {shape}, "
                            f"expected a sentencepiece model as up to {MAX_TOKENIZER_BYTES:,} U8 bytes; it is not "
                            "read. The checkpoint is damaged: give a tokenizer as tokenizer=PATH")
        data = reader.get(key)
        try:
            return PromptTokenizer.from_sentencepiece_bytes(data.reshape(-1).view(torch.uint8).numpy().tobytes(),
                                                            f"{reader.files[0]}:{key[len('text_encoders.'):]}")
        except (RuntimeError, ValueError, TypeError) as exc:  # sentencepiece's own errors for a damaged model
            raise LoadError(f"{reader.files[0]}: the tokenizer stored as {key} ({data.numel():,} "
                            f"{str(data.dtype).replace('torch.', '')} values) is no sentencepiece model "
                            f"({str(exc)[:120]}); the checkpoint is damaged. Give a tokenizer as tokenizer=PATH") \
                from None
    return PromptTokenizer.load(where[1])


def _source(where: tuple) -> str:
    return str(where[1].files[0] if where[0] == "checkpoint" else where[-1] if where[0] == "safetensors"
               else where[1])


def _check_parts_fit(text_encoder, vae, transformer, ckpt, where: _Located) -> None:
    """The parts' sizes against each other (each file may be fine alone): the text encoder's width is what the
    transformer's context embedder takes, the VAE's latent channels what the transformer samples."""
    width, wanted = text_encoder.config.d_model, transformer.config.joint_attention_dim
    if width != wanted:
        raise LoadError(f"{_source(where.text_encoder)}: the text encoder gives {width}-wide embeddings, but the "
                        f"transformer {ckpt} takes {wanted} (joint_attention_dim); they are of different models. "
                        "Use the text encoder made for this checkpoint (Pile-T5-XL: 2048)")
    channels, wanted = vae.config.latent_channels, transformer.config.in_channels
    if channels != wanted:
        raise LoadError(f"{_source(where.vae)}: the VAE has {channels} latent channels, but the transformer {ckpt} "
                        f"samples {wanted}; they are of different models. Use the SDXL VAE (4 channels)")


def load_components(checkpoint, *, tokenizer=None, text_encoder=None, vae=None, dtype="auto", device="auto"):
    """Read every component from disk onto the CPU (the caller moves them); see `aura_flow.load` for the arguments.

    Every part is located, then checked against the model its headers and config describe (each tensor's shape
    and dtype, the parts against each other) before any weights are read; tensors are converted to their target
    dtype as they are read, so a component is never held twice, and tensors no part uses are never read."""
    dev = resolve_device(device)
    storage, compute = resolve_dtypes(dtype, dev)
    ckpt = _check_path("checkpoint", checkpoint)
    if ckpt is None:
        raise LoadError("checkpoint is required: a diffusers folder, an all-in-one .safetensors or a transformer file")
    where = _locate(ckpt, _check_path("tokenizer", tokenizer), _check_path("text_encoder", text_encoder),
                    _check_path("vae", vae))
    vae, finish_vae = _plan_vae(where.vae)  # each part checked from its headers, nothing read yet
    text_encoder, finish_te = _plan_text_encoder(where.text_encoder, compute)
    transformer, finish_transformer = _plan_transformer(where.transformer, storage, compute)
    _check_parts_fit(text_encoder, vae, transformer, ckpt, where)
    c = Components(device=dev, compute_dtype=compute)
    c.tokenizer = _read_tokenizer(where.tokenizer)  # the small parts first: a broken one fails before the big one
    c.vae = finish_vae()
    c.text_encoder = finish_te()
    c.transformer = finish_transformer()
    c.sources = {"transformer": str(ckpt), "text_encoder": _source(where.text_encoder), "vae": _source(where.vae),
                 "tokenizer": c.tokenizer.source}
    return c
