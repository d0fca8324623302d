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

Without patches, a float weight already in the input's dtype and device goes straight to the GEMM: the layer then
costs what ``nn.Linear`` costs (about 2 µs more per call before this shortcut). On x86 CPUs the float32 GEMM goes
through oneDNN (`cpu_gemm`) rather than torch's BLAS (MKL): measured 2-3x faster on AMD Zen 5, where MKL takes its
AVX2 path, and the same float32 sums up to rounding (about 1e-6 on a layer's output).

A host's memory manager may stream the weight per call instead of keeping it on the device: the layer carries the
three attributes ComfyUI's ModelPatcher uses for that (``comfy_cast_weights``, and the ``weight_function`` /
``bias_function`` lists it fills with its own weight patches), under those names so ComfyUI finds them; the engine
never imports ComfyUI. `compute_weight` already moves the stored form to the input's device on every call, so a
weight left on the CPU by the host just streams; the host's functions run on the computed weight, before the
layer's own patches.
"""
from __future__ import annotations

import logging
import os
import platform
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

GEMMS = ("onednn", "blas")
_gemm: list = []  # [the float32 CPU GEMM in use], decided on first use


def _default_gemm() -> str:
    wanted = os.environ.get("AURAFLOW_CPU_GEMM", "auto").strip().lower()
    usable = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
              and platform.machine().lower() in ("x86_64", "amd64"))
    if wanted in ("auto", "onednn") and usable:
        return "onednn"
    if wanted not in ("auto", *GEMMS):
        log.warning("AURAFLOW_CPU_GEMM=%r is not one of auto, %s; using the default", wanted, ", ".join(GEMMS))
    return "blas"


def cpu_gemm() -> str:
    """The float32 CPU GEMM the transformer's linears use: "onednn" (x86 CPUs with torch's oneDNN) or "blas"
    (torch's own ``F.linear``). ``AURAFLOW_CPU_GEMM=blas`` (or `set_cpu_gemm`) picks BLAS."""
    if not _gemm:
        _gemm.append(_default_gemm())
        log.info("float32 CPU linear layers run through %s", _gemm[0])
    return _gemm[0]


def set_cpu_gemm(name: str) -> str:
    """Use ``name`` ("onednn", "blas" or "auto") for the float32 CPU GEMMs from now on; -> the one used before."""
    before = cpu_gemm()
    if name == "auto":
        name = _default_gemm()
    if name not in GEMMS:
        raise ValueError(f"cpu gemm {name!r}: give one of auto, {', '.join(GEMMS)}")
    _gemm[0] = name
    return before


# below this many multiply-adds oneDNN's per-call set-up (about 10 µs) costs more than it saves (measured crossover
# 1-4e6 on AMD Zen 5, 2 threads)
ONEDNN_MIN_MACS = 1 << 22


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_traced_op: list = []


def _traced_onednn():
    """`_onednn` as an opaque custom op for torch.compile (inductor's own lowering of the oneDNN op expects a frozen,
    prepacked weight), or None where this torch has no ``torch.library.custom_op``."""
    if not _traced_op:
        op = None
        if hasattr(torch.library, "custom_op"):
            try:
                op = torch.library.custom_op("aura_flow::onednn_linear", _onednn, mutates_args=())
            except RuntimeError:  # registered already by a second copy of this module (imported under another name)
                op = torch.ops.aura_flow.onednn_linear
            else:
                @op.register_fake
                def _shape(x, weight, bias):
                    return x.new_empty((*x.shape[:-1], weight.shape[0]))
        _traced_op.append(op)
    return _traced_op[0]


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for float32 on the CPU where `cpu_gemm` says so (not for small products, nor
    when autograd records). Under torch.compile every float32 CPU product takes it (no guard on the size, so no
    rebuild per image size), as an opaque op."""
    if x.dtype is torch.float32 and x.is_cpu and (_gemm[0] if _gemm else cpu_gemm()) == "onednn" \
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        if _compiling():
            op = _traced_onednn()
            return F.linear(x, weight, bias) if op is None else op(x, weight, bias)
        if x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS:
            return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


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

    stored_as_compute = True  # ``weight`` is a float tensor that `compute_weight` only casts (subclasses: False)

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
    def like(cls, linear: nn.Linear) -> "PatchableLinear":
        """An empty layer of ``linear``'s shape on the meta device (the loader assigns the weights)."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")

    def compute_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The weight in ``dtype`` on ``device`` (the stored tensor itself when it already is)."""
        return self.weight.to(device=device, dtype=dtype)

    def compute_bias(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        # the plain layer: nothing to cast or patch, no host streaming or hook (dtypes are singletons; get_device()
        # is -1 on the CPU)
        if not (self.patches or self.comfy_cast_weights or self.weight_function or self.bias_function) \
                and self.stored_as_compute and weight.dtype is x.dtype \
                and (bias is None or bias.dtype is x.dtype) and weight.get_device() == x.get_device():
            return linear(x, weight, bias)
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
        y = linear(x, weight, bias)
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
