"""Every layout users have, read into components on the CPU, offline, lazily, one copy of the weights in memory.

Layouts (detected from the files themselves):
1. a diffusers folder (``model_index.json``; sharded ``transformer/``, ``*.fp16.safetensors`` variants too);
2. the all-in-one single file: transformer under ``model.`` (or ``model.diffusion_model.``) in the original key
   names, T5 under ``text_encoders.`` (ComfyUI: ``text_encoders.pile_t5xl.transformer.``), VAE under ``vae.`` in the
   original (ldm) key names;
3. a transformer-only file in the original or the diffusers key names, with the text encoder, tokenizer and VAE
   from separate files or folders.
Configs come from the folder's config.json files or are inferred from tensor shapes. Original key names are
converted with diffusers' own converters. Nothing here touches the network.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoadError
from ..prompts import TOKENIZER_HINT, PromptTokenizer
from .devices import resolve_device, resolve_dtypes
from .layouts import DIFFUSERS_TRANSFORMER_KEYS, ORIGINAL_TRANSFORMER_KEYS, describe, find_prefix
from .modules import text_encoder_from_sd, transformer_from_sd, vae_from_sd
from .reader import SafetensorsReader, folder_files, read_json


@dataclass
class Components:
    """What `load_components` read, on the CPU, and where and in which dtypes it is meant to run."""

    transformer: object = None
    text_encoder: object = None
    tokenizer: object = None
    vae: object = None
    sources: dict = field(default_factory=dict)  # part -> the file or folder it came from
    device: object = None  # the torch device the pipeline runs on
    storage_dtype: object = None  # the transformer's weights as stored (fp8 when asked)
    compute_dtype: object = None  # the transformer's and text encoder's compute dtype (the VAE runs in fp32)


def _load_text_encoder_path(path: Path, dtype):
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists() and (path / "text_encoder").is_dir():
            path, cfg_file = path / "text_encoder", path / "text_encoder" / "config.json"
        from transformers import UMT5Config

        config = UMT5Config(**{k: v for k, v in read_json(cfg_file).items() if k not in ("architectures",)}) \
            if cfg_file.exists() else None
        reader = SafetensorsReader(folder_files(path, "model"))
        return text_encoder_from_sd(reader.take(dtype=dtype), path, config)
    return text_encoder_from_sd(SafetensorsReader([path]).take(dtype=dtype), path)


def _load_vae_path(path: Path):
    import torch

    if path.is_dir():
        if not (path / "config.json").exists() and (path / "vae").is_dir():
            path = path / "vae"
        config = read_json(path / "config.json") if (path / "config.json").exists() else None
        return vae_from_sd(SafetensorsReader(folder_files(path, "diffusion_pytorch_model")).take(dtype=torch.float32), path,
                            config)
    return vae_from_sd(SafetensorsReader([path]).take(dtype=torch.float32), path)


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
    p = Path(os.fspath(value)).expanduser()
    if not p.exists():
        raise LoadError(f"{name}={str(p)!r} does not exist")
    return p


def load_components(checkpoint, *, tokenizer=None, text_encoder=None, vae=None, dtype="auto", device="auto"):
    """Read every component from disk onto the CPU (the caller moves them); see `load` for the arguments.

    Tensors are converted to their target dtype as they are read, so a component is never held twice."""
    import torch


    dev = resolve_device(device)
    storage, compute = resolve_dtypes(dtype, dev)
    ckpt = _check_path("checkpoint", checkpoint)
    if ckpt is None:
        raise LoadError("checkpoint is required: a diffusers folder, an all-in-one .safetensors or a transformer file")
    tok_path = _check_path("tokenizer", tokenizer)
    te_path = _check_path("text_encoder", text_encoder)
    vae_path = _check_path("vae", vae)
    c = Components(device=dev, storage_dtype=storage, compute_dtype=compute)

    if ckpt.is_dir():
        if not (ckpt / "model_index.json").exists():
            if (ckpt / "config.json").exists():  # a bare diffusers transformer folder
                reader = SafetensorsReader(folder_files(ckpt, "diffusion_pytorch_model"))
                c.transformer = transformer_from_sd(reader.take(dtype=compute), ckpt, reader.metadata, storage, compute,
                                                     read_json(ckpt / "config.json"))
            else:
                raise LoadError(f"{ckpt}: a folder without model_index.json or config.json; expected a diffusers "
                                f"AuraFlow folder (like fal/AuraFlow-v0.3)")
        else:
            tdir = ckpt / "transformer"
            if not tdir.is_dir():
                raise LoadError(f"{ckpt}: diffusers folder without transformer/")
            reader = SafetensorsReader(folder_files(tdir, "diffusion_pytorch_model"))
            c.transformer = transformer_from_sd(reader.take(dtype=compute), tdir, reader.metadata, storage, compute,
                                                 read_json(tdir / "config.json"))
            if te_path is None and (ckpt / "text_encoder").is_dir():
                te_path = ckpt / "text_encoder"
            if vae_path is None and (ckpt / "vae").is_dir():
                vae_path = ckpt / "vae"
            if tok_path is None and (ckpt / "tokenizer").is_dir():
                tok_path = ckpt / "tokenizer"
    else:
        reader = SafetensorsReader([ckpt])
        keys = list(reader.keys())
        t_prefix = find_prefix(keys, ORIGINAL_TRANSFORMER_KEYS + DIFFUSERS_TRANSFORMER_KEYS)
        if t_prefix is None:
            raise LoadError(describe(ckpt, keys))
        c.transformer = transformer_from_sd(reader.take(t_prefix, strip=False, dtype=compute), ckpt,
                                             reader.metadata, storage, compute)
        if te_path is None and any(k.startswith("text_encoders.") for k in keys):
            te_sd = reader.take("text_encoders.", dtype=compute)
            spiece = next((k for k in te_sd if k.endswith("spiece_model")), None)
            if spiece is not None:  # ComfyUI serializes the tokenizer into the checkpoint
                blob = te_sd.pop(spiece)
                if tok_path is None:
                    c.tokenizer = PromptTokenizer.from_sentencepiece_bytes(blob.numpy().tobytes(), f"{ckpt}:{spiece}")
                    c.sources["tokenizer"] = c.tokenizer.source
            c.text_encoder = text_encoder_from_sd(te_sd, ckpt)
            c.sources["text_encoder"] = str(ckpt)
        if vae_path is None and any(k.startswith(("vae.", "first_stage_model.")) for k in keys):
            c.vae = vae_from_sd(reader.take("vae." if any(k.startswith("vae.") for k in keys)
                                             else "first_stage_model.", dtype=torch.float32), ckpt)
            c.sources["vae"] = str(ckpt)
        del reader
    c.sources["transformer"] = str(ckpt)

    if c.text_encoder is None:
        if te_path is None:
            raise LoadError(f"{ckpt}: has no text encoder; pass text_encoder=PATH (a Pile-T5-XL .safetensors or a "
                            f"diffusers text_encoder folder; in ComfyUI put it in models/text_encoders)")
        c.text_encoder = _load_text_encoder_path(te_path, compute)
        c.sources["text_encoder"] = str(te_path)
    if c.vae is None:
        if vae_path is None:
            raise LoadError(f"{ckpt}: has no VAE; pass vae=PATH (the SDXL VAE .safetensors or a diffusers vae "
                            f"folder; in ComfyUI put it in models/vae)")
        c.vae = _load_vae_path(vae_path)
        c.sources["vae"] = str(vae_path)
    if c.tokenizer is None:
        if tok_path is None and te_path is not None and te_path.is_dir():
            for cand in (te_path / "tokenizer", te_path.parent / "tokenizer", te_path / "tokenizer.model"):
                if cand.exists():
                    tok_path = cand
                    break
        if tok_path is None and not ckpt.is_dir() and (ckpt.parent / "tokenizer.model").exists():
            tok_path = ckpt.parent / "tokenizer.model"
        if tok_path is None:
            tok_path = comfyui_tokenizer_path()
        if tok_path is None:
            raise LoadError(f"{ckpt}: no tokenizer found; {TOKENIZER_HINT}, or put tokenizer.model next to the "
                            f"checkpoint")
        c.tokenizer = PromptTokenizer.load(tok_path)
        c.sources["tokenizer"] = str(tok_path)
    return c


