"""Linear layers that keep their weight as the file stored it: GGUF blocks, or fp8 with a scale.

Both are `PatchableLinear`s: the base class's forward asks `compute_weight` for the weight in the compute dtype on
the input's device, applies the patches (LoRA and friends) to that transient copy, and drops it when the call
returns — so the stored form is never rounded again, never held twice, and a forward holds one dequantized layer at
a time. The bias, when there is one, is an ordinary float parameter in the compute dtype.

Moving a model with ``.to(device)`` moves the stored weights; ``.to(dtype)``, ``.half()`` and the like cast only the
float parameters (biases): GGUF blocks are uint8, which no float cast touches, and the fp8 layer moves its fp8
weight and float32 scale as raw bits (`_bit_exact`).
"""
from __future__ import annotations

import gguf
import torch
from torch import nn

from .gguf_dequant import dequantize, tensor_bytes
from .linear import PatchableLinear

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_exact(fn, t: torch.Tensor) -> torch.Tensor:
    """``fn`` (a `nn.Module._apply` function) applied to ``t`` reinterpreted as integers of the same size, so that it
    moves the tensor between devices but cannot cast it to another float dtype."""
    bits = _SAME_SIZE_INT[t.element_size()]
    return fn(t.view(bits)).view(t.dtype)


class _StoredLinear(PatchableLinear):
    """A `PatchableLinear` whose weight is a stored buffer (not a parameter) that `compute_weight` decodes."""

    stored_as_compute = False

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._init_patches()

    def stored_bytes(self) -> int:
        """Bytes of the stored weight (and its scales), without the bias."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))


class GGUFLinear(_StoredLinear):
    """A linear layer whose weight stays in the GGUF file's blocks (``weight``: a uint8 buffer of the tensor's bytes
    in file order) and is dequantized to the compute dtype on the input's device on every call."""

    def __init__(self, raw: torch.Tensor, qtype: gguf.GGMLQuantizationType, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias)
        expected = tensor_bytes(qtype, out_features * in_features)
        if raw.dtype != torch.uint8 or raw.numel() != expected:
            raise ValueError(f"{qtype.name} weight ({out_features}, {in_features}) takes {expected} bytes; got "
                             f"{raw.numel()} {raw.dtype} values")
        self.qtype = gguf.GGMLQuantizationType(qtype)
        self.register_buffer("weight", raw.reshape(-1))

    def compute_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return dequantize(self.weight.to(device), self.qtype, (self.out_features, self.in_features), dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype.name}"


class ScaledFp8Linear(_StoredLinear):
    """A linear layer with an fp8 weight and, for ComfyUI's scaled-fp8 files, a float32 ``scale_weight`` (one value,
    or one per output row): the weight is ``weight.float() * scale_weight``. Without a scale (plain fp8 files) it is
    ``weight.float()``."""

    def __init__(self, weight: torch.Tensor, scale_weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        if weight.element_size() != 1 or not weight.is_floating_point():
            raise ValueError(f"ScaledFp8Linear takes an fp8 weight, got {weight.dtype}")
        self.register_buffer("weight", weight)
        if scale_weight is not None:
            scale_weight = scale_weight.float()
            if scale_weight.numel() == out_features and out_features != 1:
                scale_weight = scale_weight.reshape(out_features, 1)
            elif scale_weight.numel() == 1:
                scale_weight = scale_weight.reshape(())
            else:
                raise ValueError(f"scale_weight has {scale_weight.numel()} values; expected 1 or {out_features}")
        self.register_buffer("scale_weight", scale_weight)

    def compute_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        w = self.weight.to(device)
        if self.scale_weight is None:
            return w.to(dtype)
        return (w.float() * self.scale_weight.to(device)).to(dtype)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) casts every floating-point tensor, fp8 included: that would quadruple the weight and
        # round the scale. Hand the stored tensors to ``fn`` as same-size integers, which it only moves.
        stored = {k: self._buffers.pop(k) for k in ("weight", "scale_weight")}
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(stored)
            raise
        for k, t in stored.items():
            self._buffers[k] = None if t is None else _bit_exact(fn, t)
        return self

    def extra_repr(self) -> str:
        scale = "none" if self.scale_weight is None else tuple(self.scale_weight.shape) or "scalar"
        return f"{super().extra_repr()}, storage={self.weight.dtype}, scale={scale}"
