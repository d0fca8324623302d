"""Naming the LoRA that turned a run into NaN: checked only after the sampled latent came out non-finite.

A LoRA file with finite tensors can still break a run: a huge alpha (peft's ``lora_alpha``, kohya's ``.alpha``), huge
factors, or a LoKr / LoHa product that overflows in the compute dtype. Its patches run beside the weights in that
dtype (`aura_flow.weights.linear.PatchableLinear`), so the change ΔW itself may be infinite there, or be finite but
so large that the layer's output (or the norms and attention after it) overflows. Nothing is checked while a run
goes well; after a NaN, `find_overflows` builds each patched layer's ΔW · strength once, in the compute dtype and in
float32, on the layer's own device, one layer at a time, and flags a LoRA when ΔW is not finite there or is more than
`RATIO_LIMIT` times the layer's largest weight (an ordinary LoRA changes a weight by a small fraction of it).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..weights.linear import patchable_layers

RATIO_LIMIT = 100.0  # |s·ΔW|max / |W|max above this is an overflow waiting to happen, never a style


@dataclass(frozen=True)
class Overflow:
    """The worst layer of one LoRA: ``ratio`` = |strength · ΔW|max / |W|max in float32 (inf when ΔW is not finite
    even there); ``dtype`` the compute dtype when ΔW · strength is not finite in it, else None."""
    lora: str
    strength: float
    layer: str
    ratio: float
    dtype: torch.dtype | None = None

    @property
    def broken_file(self) -> bool:
        """True when the LoRA would overflow at strength 1 in float32 too: its own numbers are wrong."""
        return self.ratio / abs(self.strength) > RATIO_LIMIT

    def describe(self) -> str:
        size = "not finite even in fp32" if math.isinf(self.ratio) else \
            f"{self.ratio:.3g} times that layer's largest weight"
        if self.dtype is not None and not math.isinf(self.ratio):
            size = f"infinite in {_dtype_name(self.dtype)}, {size}"
        if self.broken_file:
            fix = ("its alpha or its factors are far too large, so the file is damaged or was converted wrongly: "
                   "remove it, or download or train it again")
        elif self.dtype is not None:
            fix = f"lower its strength (now {self.strength:g}), or compute in fp32 (dtype='fp32')"
        else:
            fix = f"lower its strength (now {self.strength:g})"
        return f"the LoRA {self.lora} at strength {self.strength:g} (its change to layer {self.layer} is {size}): {fix}"


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _device(layer) -> torch.device:
    for t in itertools.chain(layer.parameters(recurse=False), layer.buffers(recurse=False)):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


@torch.no_grad()
def _layer_overflow(patch, strength: float, layer, dtype) -> tuple[float, torch.dtype | None]:
    """(ratio in float32, ``dtype`` when ΔW · strength is not finite in it, else None) for one patch on ``layer``."""
    device = _device(layer)
    bad = None
    if dtype is not torch.float32 and not bool(torch.isfinite(patch.delta_weight(dtype, device) * strength).all()):
        bad = dtype
    delta = patch.delta_weight(torch.float32, device) * strength
    if not bool(torch.isfinite(delta).all()):
        return math.inf, bad or torch.float32
    weight = float(layer.compute_weight(torch.float32, device).abs().amax())
    return float(delta.abs().amax()) / max(weight, 1e-12), bad


def find_overflows(applied, transformer, dtype) -> list[Overflow]:
    """The LoRAs of ``applied`` (``(PreparedLora, strength)`` pairs, as active on ``transformer``) that overflow,
    each with its worst layer, worst first; [] when none does."""
    layers = patchable_layers(transformer)
    found = []
    for prepared, strength in applied:
        if strength == 0.0:
            continue
        worst = None
        for name, patch in prepared.patches.items():
            if name not in layers:
                continue
            ratio, bad = _layer_overflow(patch, strength, layers[name], dtype)
            if worst is None or (ratio, bad is not None) > (worst.ratio, worst.dtype is not None):
                worst = Overflow(prepared.file.name, strength, name, ratio, bad)
            if math.isinf(ratio):
                break
        if worst is not None and (worst.ratio > RATIO_LIMIT or worst.dtype is not None):
            found.append(worst)
    return sorted(found, key=lambda o: (-o.ratio, o.dtype is None))


def blame_message(found: list[Overflow]) -> str:
    """The NumericError text naming ``found`` (non-empty) as the cause and what to do."""
    causes = "; and ".join(o.describe() for o in found)
    return f"the sampled latent holds NaN or infinite values, and the cause is {causes}"


__all__ = ["Overflow", "RATIO_LIMIT", "blame_message", "find_overflows"]
