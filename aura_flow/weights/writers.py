"""Quantized AuraFlow files written the way users get them, for the tests and the benchmarks (no downloads).

- `write_gguf`: a transformer GGUF as city96's ComfyUI-GGUF tool chain leaves it (``tools/convert.py``, then its
  patched ``llama-quantize``): architecture "aura", the original key names (optionally under
  ``model.diffusion_model.``), ggml's reversed shapes, 1-D tensors and tensors of at most 1024 values in F32, rows
  that do not split into whole blocks in F16, the rest in the requested types. ``orig_shape=True`` adds the
  converter's flatten-to-256 rearrangement with its ``comfy.gguf.orig_shape.<name>`` arrays (the converter does that
  for UNet models, not for "aura", but the reader must honour it wherever it appears); ``drop_unit_dims=True`` writes
  (1, N, C) tensors as (N, C), as llama.cpp does. Types gguf-py can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16,
  F16, MXFP4, TQ1_0, TQ2_0) are quantized from the weights; for the others (the K-quants, IQ types) gguf-py has
  no quantizer, so those tensors get valid random blocks of a similar magnitude (`random_blocks`) — the file then
  holds other values than the input, and a reference must be decoded from the file itself.
- `write_fp8`: ComfyUI's scaled-fp8 format (or plain fp8) in original key names.
- `build_tiny_gguf`: a tiny random AuraFlow (`aura_flow.tiny`) with its transformer as a GGUF.

Kept beside the readers, so that one folder knows each format both ways.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from .configs import HEAD_DIM_KEY

Q = gguf.GGMLQuantizationType
SMALL = 1024  # the converter keeps tensors of at most this many values in F32
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
# byte offsets of the fp16 scale / min fields in a block; every value of a block is linear in them
SCALE_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q2_K: (80, 82),
                Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}


def can_quantize(qtype: Q) -> bool:
    """Whether gguf-py can quantize to ``qtype``."""
    try:
        gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
    except (NotImplementedError, gguf.QuantError):
        return False
    return True


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator, magnitude: float = 0.05) -> np.ndarray:
    """``n_blocks`` valid blocks of ``qtype`` (uint8, (n_blocks, type_size)): random bits, with finite fp16 scales
    chosen so that the largest decoded value is about ``magnitude``."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    fields = SCALE_FIELDS[qtype]
    scales = rng.uniform(0.5, 1.0, size=(n_blocks, len(fields))).astype(np.float32)

    def put(values):
        for i, at in enumerate(fields):
            blocks[:, at:at + 2] = values[:, i:i + 1].astype(np.float16).view(np.uint8)

    put(scales)
    peak = float(np.abs(gguf.quants.dequantize(blocks, qtype)).max()) or 1.0
    put(scales * (magnitude / peak))
    return blocks


def _choose(arr: np.ndarray, wanted: Q, orig_shape: bool):
    """(qtype, array to store, original shape to record or None) for one tensor, by the tool chain's rules."""
    if arr.ndim == 1 or arr.size <= SMALL:  # "barely take up space": F32, and no dequantizing at run time
        return Q.F32, arr, None
    if wanted in FLOAT_TYPES:
        return wanted, arr, None
    block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
    recorded = None
    if orig_shape and arr.size % 256 == 0 and arr.shape[-1] % 256 != 0:  # the converter's rearrangement
        recorded, arr = arr.shape, arr.reshape(-1, 256)
    if arr.shape[-1] % block_size != 0:  # llama-quantize's fallback for rows that do not split into blocks
        return Q.F16, arr, recorded
    return wanted, arr, recorded


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks of ``x`` (last dimension a multiple of 32) in torch, on ``x``'s device: uint8 of shape
    (..., last / 32 * 34), the same bytes as ``gguf.quants.quantize(x, Q8_0)`` (gguf-py's float32 arithmetic and
    rounding, step for step; tests/test_gpu_check.py checks it), and fast on a GPU, where gguf-py's numpy
    takes over a minute for a 6.8B-parameter model on one core."""
    shape = x.shape
    blocks = x.reshape(-1, 32).float()
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inv
    a = scaled.abs()
    floored = torch.floor(a)
    qs = torch.sign(scaled) * (floored + torch.floor(2 * (a - floored)))  # gguf-py's np_roundf
    out = torch.cat([d.to(torch.float16).view(torch.uint8), qs.to(torch.int8).view(torch.uint8)], dim=1)
    return out.reshape(*shape[:-1], shape[-1] // 32 * 34)


def _torch_q8_0(device):
    """A `write_gguf` quantizer: Q8_0 through `quantize_q8_0` on ``device``, every other type through gguf-py."""
    def quantize(arr: np.ndarray, qtype: Q) -> np.ndarray:
        if qtype != Q.Q8_0:
            return gguf.quants.quantize(arr, qtype)
        return quantize_q8_0(torch.from_numpy(arr).to(device)).cpu().numpy()

    return quantize


def write_gguf(path, tensors: dict, qtypes, *, prefix: str = "", arch: str = "aura", orig_shape: bool = False,
               drop_unit_dims: bool = False, head_dim: int | None = None, seed: int = 0, device=None) -> Path:
    """Write ``tensors`` (original AuraFlow names -> torch tensors) to a GGUF at ``path``; see the module docstring.

    qtypes: one ``GGMLQuantizationType`` (or its name) or several, taken in turn by the tensors that get quantized
    (real files mix types: Q4_K_M is Q4_K and Q6_K). head_dim: recorded under ``aura_flow.attention_head_dim``.
    device: quantize Q8_0 with torch there (`quantize_q8_0`: the same bytes, in seconds on a GPU)."""
    kinds = [qtypes] if isinstance(qtypes, (str, Q)) else list(qtypes)
    cycle = itertools.cycle([Q[k] if isinstance(k, str) else Q(k) for k in kinds])
    rng = np.random.default_rng(seed)
    quantize = _torch_q8_0(device) if device is not None else gguf.quants.quantize
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if head_dim is not None:
        writer.add_uint32(HEAD_DIM_KEY, int(head_dim))
    for name, t in tensors.items():
        arr = t.detach().float().cpu().numpy()
        while drop_unit_dims and arr.ndim > 1 and arr.shape[0] == 1:
            arr = arr[0]
        qtype, arr, recorded = _choose(arr, next(cycle) if arr.ndim > 1 and arr.size > SMALL else None, orig_shape)
        if recorded is not None:
            writer.add_array(f"comfy.gguf.orig_shape.{prefix}{name}", [int(d) for d in recorded])
        if qtype in (Q.F32, Q.F16) or can_quantize(qtype):
            data = quantize(arr, qtype)
        else:
            block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
            data = random_blocks(qtype, arr.size // block_size, rng).reshape(
                gguf.quants.quant_shape_to_byte_shape(arr.shape, qtype))
        writer.add_tensor(prefix + name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_fp8(path, tensors: dict, *, scaled: bool = True, prefix: str = "model.diffusion_model.",
              fp8_dtype: torch.dtype = torch.float8_e4m3fn, per_row: bool = False, scale_input: bool = False,
              others: torch.dtype = torch.bfloat16) -> Path:
    """Write ``tensors`` (original AuraFlow names) as ComfyUI's scaled fp8 (``scaled=True``: marker, fp8 weights,
    float32 ``scale_weight`` per layer — one value, or one per row with ``per_row``; ``scale_input`` adds the
    activation scales ComfyUI's fp8-matmul files carry) or as a plain fp8 file (``scaled=False``). Linear weights of
    more than 1024 values become fp8; the rest are stored in ``others``."""
    from safetensors.torch import save_file

    top = torch.finfo(fp8_dtype).max
    out = {}
    for name, t in tensors.items():
        if t.dim() != 2 or t.numel() <= SMALL:
            out[prefix + name] = t.to(others).contiguous()
            continue
        w = t.float()
        if not scaled:
            out[prefix + name] = w.to(fp8_dtype)
            continue
        peak = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max()
        scale = (peak / top).clamp(min=1e-12)
        layer = prefix + name[:-len(".weight")]
        out[prefix + name] = (w / scale).clamp(-top, top).to(fp8_dtype)
        out[f"{layer}.scale_weight"] = scale.reshape(-1) if per_row else scale.reshape(())
        if scale_input:
            out[f"{layer}.scale_input"] = torch.tensor(1.0)
    if scaled:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8_dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, os.fspath(path))
    return path


def build_tiny_gguf(dest, qtypes="Q8_0", *, preset: str = "tiny", seed: int = 0,
                    prefix: str = "model.diffusion_model.") -> Path:
    """A tiny random AuraFlow in the transformer-only layout (`aura_flow.tiny.build_tiny`: text encoder, VAE and
    tokenizer beside it in ``dest``) plus its transformer as a GGUF there; the GGUF's path."""
    from safetensors.torch import load_file

    from ..tiny import PRESETS, build_tiny

    source = build_tiny(dest, "transformer_only", preset=preset, seed=seed)
    label = "_".join(q if isinstance(q, str) else Q(q).name for q in ([qtypes] if isinstance(qtypes, (str, Q))
                                                                      else qtypes))
    return write_gguf(Path(dest) / f"aura_flow_{preset}_{label}.gguf", load_file(os.fspath(source)), qtypes,
                      prefix=prefix, head_dim=PRESETS[preset]["transformer"]["attention_head_dim"], seed=seed)
