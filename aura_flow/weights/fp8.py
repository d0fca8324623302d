"""AuraFlow transformers from fp8 safetensors, kept in fp8: ComfyUI's scaled-fp8 files and plain fp8 files.

ComfyUI's scaled fp8 (``*_fp8_scaled.safetensors``): a ``scaled_fp8`` marker tensor under the model's prefix (its
dtype names the fp8 type), each quantized linear weight in fp8 with a float32 ``<layer>.scale_weight`` (one value,
or one per row; the real weight is ``w.float() * scale_weight``), optionally ``<layer>.scale_input`` (an activation
scale for fp8 matmuls: unused here, the matmul runs in the compute dtype), and the other tensors in bf16/fp16/fp32.
ComfyUI's newer files say the same with ``<layer>.weight_scale``, ``<layer>.input_scale`` and a per-layer
``<layer>.comfy_quant`` JSON (or ``_quantization_metadata`` in the header); float8 layers of that form load too.
Plain fp8 files (fp8 weights, no scales, e.g. the ``float8_e5m2`` AuraFlow variants) keep their fp8 weights as
they are. Either way the weights stay fp8 in memory (`ScaledFp8Linear`).

Entry points: `is_scaled_fp8`, `has_fp8_weights` and `load_fp8_transformer`.
"""
from __future__ import annotations

import json
import logging

import torch

from ..errors import LoadError, shown
from .assemble import Dense, assemble_transformer
from .configs import MAX_CONFIG_SIZE, check_floats
from .layouts import TRANSFORMER_KEYS, find_prefix, key_name
from .quantized_linear import ScaledFp8Linear
from .reader import lazily, real

log = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_FORMATS = {"float8_e4m3fn", "float8_e5m2"}
MARKER = "scaled_fp8"
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")


def is_scaled_fp8(keys, metadata: dict | None = None) -> bool:
    """Whether a safetensors file's keys (and header metadata) are ComfyUI's scaled-fp8 format."""
    keys = list(keys)
    return (any(k == MARKER or k.endswith("." + MARKER) for k in keys)
            or "_quantization_metadata" in (metadata or {})
            or any(k.endswith(_SCALE_SUFFIXES) for k in keys))


def has_fp8_weights(sd: dict) -> bool:
    """Whether a state dict holds fp8 tensors (a plain fp8 file, when it is not scaled)."""
    return any(t.dtype in FP8_DTYPES for t in sd.values())


class Fp8Stored:
    """An fp8 weight (a tensor or a `LazyTensor`, read when its layer is made) and its optional scale (read and
    checked already), as the file holds them."""

    def __init__(self, weight, scale: torch.Tensor | None):
        self.weight, self.scale = weight, scale
        self.shape = tuple(weight.shape)

    def _scale(self):
        s = self.scale.float()
        return s.reshape(-1, *[1] * (len(self.shape) - 1)) if s.numel() > 1 else s.reshape(())

    def dense(self, dtype):
        w = real(self.weight).float()
        return (w if self.scale is None else w * self._scale()).to(dtype)

    def linear(self, bias, dtype):
        return ScaledFp8Linear(real(self.weight), self.scale, bias)

    def swap_halves(self):
        scale = self.scale
        if scale is not None and scale.numel() > 1:  # one scale a row: it moves with its row
            scale = torch.cat(scale.reshape(-1).chunk(2)[::-1])
        return Fp8Stored(lazily(self.weight, lambda w: torch.cat(w.chunk(2)[::-1])), scale)


def _check_formats(sd: dict, metadata: dict | None, source) -> None:
    """Refuse layers of ComfyUI's newer quantized formats that are not float8 (int8, nvfp4…)."""
    formats = {}
    header = (metadata or {}).get("_quantization_metadata")
    if header:
        layers = _json(header, source, "metadata _quantization_metadata")
        layers = layers.get("layers", {}) if isinstance(layers, dict) else None
        if not isinstance(layers, dict):
            raise LoadError(f"{source}: metadata _quantization_metadata has no \"layers\" object; the file is damaged")
        for layer, conf in layers.items():
            formats[layer] = conf.get("format") if isinstance(conf, dict) else conf
    for k, v in sd.items():
        if k.endswith(".comfy_quant"):
            conf = _json(bytes(real(v).reshape(-1).to(torch.uint8).tolist()) if v.numel() <= 1 << 16 else b"", source,
                         k)
            formats[k[:-len(".comfy_quant")]] = conf.get("format") if isinstance(conf, dict) else conf
    odd = {layer: f for layer, f in formats.items() if not (isinstance(f, str) and f in FP8_FORMATS)}
    if odd:
        layer, fmt = next(iter(odd.items()))
        raise LoadError(f"{source}: layer {shown(layer)} is quantized as {shown(fmt)} ({len(odd)} such layers); this pack reads "
                        f"float8 layers only. Use a GGUF, an fp8 or a bf16 file of this model instead.")


def _json(raw, source, field):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise LoadError(f"{source}: {field} is not readable JSON ({exc.__class__.__name__}: {str(exc)[:120]}); the "
                        "file is damaged. Download it again.") from None


def load_fp8_transformer(sd: dict, source, compute_dtype: torch.dtype, metadata: dict | None = None,
                         config: dict | None = None, deferred: bool = False):
    """An `AuraFlowTransformer2DModel` whose fp8 linear weights stay fp8 (`ScaledFp8Linear`), from a state dict read
    without casting (fp8 tensors as fp8): a transformer-only file or a whole checkpoint, original or diffusers key
    names, under any prefix (tensors or `LazyTensor`s: only the small scales are read before every shape is checked).
    Other tensors are decoded to ``compute_dtype``. deferred: see `assemble_transformer`."""
    prefix = find_prefix(sd, TRANSFORMER_KEYS)
    if prefix is None:
        raise LoadError(f"{source}: no AuraFlow transformer tensors found (expected double_layers.0.attn.w1q.weight or "
                        f"context_embedder.weight). Is this an AuraFlow checkpoint?")
    _check_formats(sd, metadata, source)
    part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    part.pop(MARKER, None)
    # both suffixes have the same length
    scales = {k[:-len(_SCALE_SUFFIXES[0])] + ".weight": part.pop(k) for k in list(part) if k.endswith(_SCALE_SUFFIXES)}
    dropped = [part.pop(k) for k in list(part) if k.endswith(_DROPPED_SUFFIXES)]
    check_floats(part, "transformer", source)
    for k in list(scales):
        scale = scales[k]
        rows = part[k].shape[0] if k in part and part[k].dim() else 0
        fits = scale.is_floating_point() and scale.numel() in (1, rows) and scale.numel() <= MAX_CONFIG_SIZE
        if fits:  # one value a row at most: small, read now
            scales[k] = scale = real(scale)
        if not fits or not bool(torch.isfinite(scale.float()).all()):
            raise LoadError(f"{source}: the fp8 scale of {key_name(k)} has shape {tuple(scale.shape)} and dtype "
                            f"{str(scale.dtype).replace('torch.', '')}, expected one finite float or one per row "
                            f"({rows}); the file is damaged. Download it again.")
    stored = {}
    for k, t in part.items():
        scale = scales.get(k)
        if t.dtype in FP8_DTYPES:
            stored[k] = Fp8Stored(t, scale)
        else:  # left unquantized by the converter (small layers, norms, embeddings)
            stored[k] = Dense(t if scale is None else
                              lazily(t, lambda w, s=scale: Fp8Stored(w, s).dense(torch.float32)))
    if deferred:
        model, finish = assemble_transformer(stored, source, compute_dtype, metadata, config, deferred=True)
        return model, lambda: _logged(finish(), stored, scales, dropped, source, compute_dtype)
    return _logged(assemble_transformer(stored, source, compute_dtype, metadata, config), stored, scales, dropped,
                   source, compute_dtype)


def _logged(model, stored, scales, dropped, source, compute_dtype):
    n_fp8 = sum(isinstance(m, ScaledFp8Linear) for m in model.modules())
    kinds = sorted({str(s.weight.dtype).replace("torch.", "") for s in stored.values() if isinstance(s, Fp8Stored)})
    log.info("AuraFlow fp8 %s: %d linear layers kept in %s (%s), %d run-time scales ignored; run in %s", source,
             n_fp8, "/".join(kinds) or "fp8", "scaled" if scales else "unscaled", len(dropped),
             str(compute_dtype).replace("torch.", ""))
    return model
