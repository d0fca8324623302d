"""Linear layers whose weight may be stored in any form and that take patches (LoRA and friends) as they run.

Every ``nn.Linear`` of the AuraFlow transformer becomes a `PatchableLinear` when it is loaded. Its weight lives in
one storage form (a float tensor as in ``nn.Linear`` here; subclasses hold fp8 with a scale, or GGUF blocks) and
`compute_weight` turns it into the compute dtype on the input's device for each call, so a quantized or fp8 weight
is never rounded again and is never held twice.

Patches are kept beside the weight, never merged into it, and run in the compute dtype:
- a patch whose ``delta_output(x)`` returns a tensor adds that to the layer's output (low rank: ``up(down(x))``,
  far cheaper than a full matrix);
- any other adds its ``delta_weight(dtype, device)`` to the weight for that call.
Each is scaled by its strength. The stored weight never changes, so removing the patches gives back the base model
exactly, and switching LoRAs reloads nothing.

A host's memory manager may stream the weight per call instead of keeping it on the device: the layer carries the
three attributes ComfyUI's ModelPatcher uses for that (``comfy_cast_weights``, and the ``weight_function`` /
``bias_function`` lists it fills with its own weight patches), under those names so ComfyUI finds them; the engine
never imports ComfyUI. `compute_weight` already moves the stored form to the input's device on every call, so a
weight left on the CPU by the host just streams; the host's functions run on the computed weight, before the
layer's own patches.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class WeightPatch(Protocol):
    """A change to one linear layer's weight ΔW (out_features, in_features), its own scale (alpha / rank and the
    like) included, strength not."""

    def delta_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """ΔW as a dense (out, in) tensor in ``dtype`` on ``device``."""

    def delta_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x @ ΔW.T`` computed without building ΔW (low-rank forms), or None when only `delta_weight` applies."""


class PatchableLinear(nn.Linear):
    """``nn.Linear`` with the same parameters and state-dict keys (``weight``, ``bias``), plus ``patches``: a tuple of
    ``(WeightPatch, strength)`` applied as the layer runs.

    A subclass, so code that looks for ``nn.Linear`` layers still finds them; it skips ``nn.Linear.__init__``'s
    random initialisation (the loader assigns every weight)."""

    # a host's streaming hooks (see the module docstring); a host sets them per layer
    comfy_cast_weights = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None
        self._init_patches()

    def _init_patches(self):
        self.patches: tuple = ()
        self.weight_function: list = []  # per layer: a host extends these lists in place
        self.bias_function: list = []

    @classmethod
    def adopt(cls, linear: nn.Linear) -> "PatchableLinear":
        """A layer holding ``linear``'s own parameters (no copy), for modules built by other libraries."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    @classmethod
    def like(cls, linear: nn.Linear) -> "PatchableLinear":
        """An empty layer of ``linear``'s shape on the meta device (the loader assigns the weights)."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")

    def compute_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The weight in ``dtype`` on ``device`` (the stored tensor itself when it already is)."""
        return self.weight.to(device=device, dtype=dtype)

    def compute_bias(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.compute_weight(x.dtype, x.device)
        for fn in self.weight_function:  # a host's patches, on the computed weight (never on the stored form)
            weight = fn(weight)
        bias = self.compute_bias(x.dtype, x.device)
        if bias is not None:
            for fn in self.bias_function:
                bias = fn(bias)
        outputs = []
        for patch, strength in self.patches:
            delta = patch.delta_output(x)
            if delta is not None:
                outputs.append((delta, strength))
            else:  # a new tensor: the stored weight is never touched
                weight = weight + patch.delta_weight(x.dtype, x.device) * strength
        y = F.linear(x, weight, bias)
        for delta, strength in outputs:
            y = y + delta * strength
        return y

    def extra_repr(self) -> str:
        extra = f", patches={len(self.patches)}" if self.patches else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}{extra}"


def make_patchable(module: nn.Module, factory=PatchableLinear.like) -> int:
    """Replace every ``nn.Linear`` under ``module`` (in place) with ``factory(linear)``; the number replaced.

    Call it on a module built on the meta device, before its state dict is assigned: the keys stay the same."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, factory(child))
            count += 1
        else:
            count += make_patchable(child, factory)
    return count


def patchable_layers(module: nn.Module) -> dict[str, PatchableLinear]:
    """``{qualified name: layer}`` of every `PatchableLinear` under ``module`` (the names LoRA keys map onto)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, PatchableLinear)}
