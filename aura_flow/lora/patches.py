"""The patch math: one class for each way a file stores a change ΔW to a linear layer's weight.

Every class implements `aura_flow.weights.linear.WeightPatch`: ``delta_weight(dtype, device)`` gives the dense ΔW
(out, in) with the patch's own scale, ``delta_output(x)`` gives ``x @ ΔW.T`` without building ΔW, or None where
building ΔW is the cheaper way. All math runs in the input's dtype on its device; nothing is cached, so a patch
holds only the file's own (small) factors.

- `LowRankPatch`: LoRA (``up @ down · scale``), run as ``up(down(x))``.
- `LoKrPatch`: ``scale · kron(w1, w2)``, each side a full matrix, a low-rank pair or a Tucker triple; run on x with
  the reshape identity ``kron(A, B) vec(X) = vec(A X Bᵀ)`` while that is cheaper than building ΔW.
- `LoHaPatch`: ``scale · (w1a @ w1b) ⊙ (w2a @ w2b)`` (Hadamard product of two low-rank matrices).
- `FullPatch`: a stored ΔW (and Δbias).
- `DoraPatch`: weight-decomposed (DoRA) wrapper: ``W' = m · (W + ΔW) / ‖W + ΔW‖``, given as ``W' − W``.
- `PermutedRows`: a patch written for a weight whose rows are in another order (the final norm's scale/shift
  halves between the original and the diffusers layouts).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F


class _Tensors:
    """Moving a patch (and the patches or factors inside it) to a device, and counting its bytes."""

    def to(self, device):
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, _Tensors)):
                changes[f.name] = value.to(device)
        return replace(self, **changes)

    @property
    def nbytes(self) -> int:
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, _Tensors):
                total += value.nbytes
        return total


@dataclass(frozen=True, eq=False)
class LowRankPatch(_Tensors):
    """ΔW = up @ down · scale; down (rank, in), up (out, rank)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def delta_weight(self, dtype, device):
        return (self.up.to(device=device, dtype=dtype) @ self.down.to(device=device, dtype=dtype)) * self.scale

    def delta_output(self, x):
        return F.linear(F.linear(x, self.down.to(x)), self.up.to(x)) * self.scale


@dataclass(frozen=True, eq=False)
class Factor(_Tensors):
    """One side of a Kronecker product: a full matrix, a low-rank pair ``a @ b``, or a Tucker triple
    (``a.T @ t @ b`` with a (rank, rows) and b (rank, cols), as lycoris rebuilds it)."""

    full: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    t: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.full is not None:
            return tuple(self.full.shape)
        if self.t is not None:
            return self.a.shape[1], self.b.shape[1]
        return self.a.shape[0], self.b.shape[1]

    @property
    def rank(self) -> int | None:
        """The low rank of a factorised side (None for a full matrix)."""
        if self.full is not None:
            return None
        return self.b.shape[0] if self.t is not None else self.a.shape[1]

    def dense(self, dtype, device) -> torch.Tensor:
        if self.full is not None:
            return self.full.to(device=device, dtype=dtype)
        a, b = self.a.to(device=device, dtype=dtype), self.b.to(device=device, dtype=dtype)
        if self.t is not None:
            return a.T @ self.t.to(device=device, dtype=dtype) @ b
        return a @ b

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M.T`` over the last axis, through the factors (never building M when it is low rank)."""
        if self.full is not None or self.t is not None:
            return x @ self.dense(x.dtype, x.device).T
        return (x @ self.b.to(x).T) @ self.a.to(x).T

    def right_cost(self) -> int:
        """Multiplications of `right` for one row of x."""
        rows, cols = self.shape
        if self.full is not None or self.t is not None:
            return rows * cols
        return self.rank * (rows + cols)


@dataclass(frozen=True, eq=False)
class LoKrPatch(_Tensors):
    """ΔW = scale · kron(w1, w2); w1 (a, b), w2 (c, d), ΔW (a·c, b·d)."""

    w1: Factor
    w2: Factor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        (a, b), (c, d) = self.w1.shape, self.w2.shape
        return a * c, b * d

    def delta_weight(self, dtype, device):
        return torch.kron(self.w1.dense(dtype, device), self.w2.dense(dtype, device)) * self.scale

    def delta_output(self, x):
        """With X = x viewed as (…, b, d): ``kron(w1, w2) x = vec(w1 · X · w2ᵀ)``, costing per row
        b·(w2's cost) + a·b·c. Building ΔW costs a·b·c·d once plus the add into W, so for many rows (image
        tokens) that is the cheaper way and this returns None."""
        (a, b), (c, d) = self.w1.shape, self.w2.shape
        rows = x.numel() // max(x.shape[-1], 1)
        if rows * (b * self.w2.right_cost() + a * b * c) >= 2 * a * b * c * d:
            return None
        grid = x.reshape(*x.shape[:-1], b, d)
        y = self.w1.dense(x.dtype, x.device) @ self.w2.right(grid)  # (…, a, c)
        return y.reshape(*x.shape[:-1], a * c) * self.scale


@dataclass(frozen=True, eq=False)
class LoHaPatch(_Tensors):
    """ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b); each product may instead be a Tucker triple (Factor)."""

    w1: Factor
    w2: Factor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape

    def delta_weight(self, dtype, device):
        return self.w1.dense(dtype, device) * self.w2.dense(dtype, device) * self.scale

    def delta_output(self, x):
        return None  # the Hadamard product has no cheap action on x: ΔW is built


@dataclass(frozen=True, eq=False)
class FullPatch(_Tensors):
    """A stored ΔW (lycoris "full" / kohya "diff"), and optionally Δbias. With a Δbias, `delta_output` gives the
    whole change of the layer's output, ``x @ ΔW.T + Δb``, since the layer has no other way to take it."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.diff.shape)

    def delta_weight(self, dtype, device):
        return self.diff.to(device=device, dtype=dtype)

    def delta_output(self, x):
        if self.diff_b is None:
            return None
        return F.linear(x, self.diff.to(x), self.diff_b.to(x))


@dataclass(frozen=True, eq=False)
class PermutedRows(_Tensors):
    """``inner`` written for a weight whose output rows are ``W[perm]``-ordered: row i here is ``inner``'s row
    ``perm[i]``."""

    inner: object
    perm: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    def delta_weight(self, dtype, device):
        return self.inner.delta_weight(dtype, device)[self.perm.to(device)]

    def delta_output(self, x):
        y = self.inner.delta_output(x)
        return None if y is None else y[..., self.perm.to(y.device)]


def swap_halves(n: int) -> torch.Tensor:
    """The row order that swaps the two halves of n rows (an involution)."""
    h = n // 2
    return torch.cat([torch.arange(h, n), torch.arange(0, h)])


@dataclass(frozen=True, eq=False)
class DoraPatch(_Tensors):
    """Weight-decomposed LoRA (DoRA): ``W' = m · V / ‖V‖`` with ``V = W + ΔW`` and the norm over each output row
    (``magnitude`` of shape (out,) or (out, 1): peft's ``lora_magnitude_vector``, lycoris' ``dora_scale``) or over
    each input column (lycoris with ``wd_on_out=False``: shape (1, in)).

    ΔW' = W' − W depends on the layer's own weight W, read through ``layer.compute_weight`` as it runs (weakly
    referenced: the layer holds the patch). Strength s gives ``W + s·(W' − W)``, as ComfyUI does; W is the stored
    weight, not what other patches make of it, so patches stay independent of their order."""

    inner: object
    magnitude: torch.Tensor
    layer_ref: object  # weakref.ref to the PatchableLinear

    @classmethod
    def of(cls, inner, magnitude: torch.Tensor, layer) -> "DoraPatch":
        return cls(inner, magnitude, weakref.ref(layer))

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    @property
    def per_row(self) -> bool:
        out_features = self.shape[0]
        return self.magnitude.dim() == 1 or (self.magnitude.shape[0] == out_features and self.magnitude.shape[-1] == 1)

    def delta_weight(self, dtype, device):
        layer = self.layer_ref()
        if layer is None:
            raise RuntimeError("a DoRA patch outlived the layer it was made for")
        w = layer.compute_weight(dtype, device)
        v = w + self.inner.delta_weight(dtype, device)
        m = self.magnitude.to(device=device, dtype=dtype)
        if self.per_row:
            scale = m.reshape(-1, 1) / v.norm(dim=1, keepdim=True)
        else:
            scale = m.reshape(1, -1) / v.norm(dim=0, keepdim=True)
        return v * scale - w

    def delta_output(self, x):
        return None


def rank_scale(alpha, rank: int, *, rs: bool = False) -> float:
    """alpha / rank (alpha / √rank with rank-stabilised scaling); a missing or zero alpha means alpha = rank, the
    convention of kohya, lycoris and peft's loaders alike."""
    if alpha is None or float(alpha) == 0.0:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if rs else rank)
