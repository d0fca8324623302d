"""An AuraFlow transformer built around tensors that stay in their stored form (GGUF blocks, fp8 with scales).

The file formats (`gguf`, `fp8`) describe each tensor as a `Stored`: its logical shape, how to make a linear layer
that keeps it as stored, and how to decode it to a dense tensor. This module does the rest, the same for every
format: map the original (fal / ComfyUI) key names to diffusers' with diffusers' own converter, names only; infer
the config from the shapes; build the model on the meta device; put a stored-form layer in place of every
``nn.Linear``; and decode the few other tensors (position grid, register tokens, biases) to the compute dtype.
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import nn

from ..errors import LoadError, shown
from .layouts import key_name
from .linear import PatchableLinear
from .reader import lazily, real

log = logging.getLogger(__name__)

NORM_OUT = "norm_out.linear.weight"
ORIGINAL_NORM_OUT = "modF.1.weight"  # stored (shift, scale); diffusers keeps (scale, shift)
_DIFFUSERS_KEYS = ("context_embedder.weight", "joint_transformer_blocks.", "single_transformer_blocks.")
# (1, N, C) parameters; llama.cpp writes them as (N, C) (it drops the size-1 dimension)
_BATCH_OF_ONE = ("pos_embed.pos_embed", "register_tokens")


class Stored(Protocol):
    """One tensor of a checkpoint, in the form the file holds it."""

    shape: tuple[int, ...]

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The tensor decoded to ``dtype`` (a new tensor)."""

    def linear(self, bias: torch.Tensor | None, dtype: torch.dtype) -> PatchableLinear:
        """A layer that holds this (out, in) weight in its stored form; ``dtype`` is the compute dtype."""

    def swap_halves(self) -> "Stored":
        """The same tensor with its first and second halves of rows exchanged."""


class Dense:
    """A tensor held as an ordinary float tensor (a safetensors file's, or the bf16 layers a scaled-fp8 file leaves
    unquantized), or a `LazyTensor` read when a layer needs it. ``storage``: an fp8 dtype to keep its linear layer in
    (``load(dtype="fp8_e4m3fn")``)."""

    def __init__(self, tensor, storage: torch.dtype | None = None):
        self.tensor = tensor
        self.storage = storage if storage is not None and storage.itemsize == 1 else None
        self.shape = tuple(tensor.shape)

    def dense(self, dtype):
        return real(self.tensor).to(dtype)

    def linear(self, bias, dtype):
        if self.storage is not None:
            from .quantized_linear import ScaledFp8Linear

            return ScaledFp8Linear(real(self.tensor).to(self.storage), None, bias)
        out_features, in_features = self.shape
        layer = PatchableLinear(in_features, out_features, bias is not None, device="meta")
        layer.weight = nn.Parameter(real(self.tensor).to(dtype), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    def swap_halves(self):
        return Dense(lazily(self.tensor, lambda t: torch.cat(t.chunk(2, dim=0)[::-1])), self.storage)


def diffusers_names(keys, source) -> dict[str, tuple[str, bool]]:
    """``{diffusers key: (file key, swap halves)}`` for a transformer's unprefixed keys, original or diffusers.

    Original names go through diffusers' own converter, given the names themselves as values (no tensor is
    touched); the final norm's weight, whose halves the converter swaps, is added back with the swap flag."""
    keys = list(keys)
    if any(k.startswith(_DIFFUSERS_KEYS) for k in keys):
        return {k: (k, False) for k in keys}
    from diffusers.loaders.single_file_utils import convert_auraflow_transformer_checkpoint_to_diffusers

    for k in keys:  # the converter reads a block number after every "double_layers" / "single_layers" with int()
        if "double_layers" in k or "single_layers" in k:
            parts = k.split(".")
            if len(parts) < 2 or not (parts[1].isascii() and parts[1].isdigit() and len(parts[1]) <= 5):
                raise LoadError(f"{source}: key {shown(k)} has block index {shown(parts[1] if len(parts) > 1 else '')}"
                                ", expected a whole number 0..99999 after double_layers. / single_layers.; the file "
                                "is damaged or of another model. Download it again")
    names = {k: k for k in keys if k != ORIGINAL_NORM_OUT}
    try:
        converted = convert_auraflow_transformer_checkpoint_to_diffusers(names)
    except KeyError as exc:
        raise LoadError(f"{source}: the AuraFlow transformer has no {shown(exc.args[0])} tensor; the file is "
                        "incomplete or holds another model. Download or convert it again.") from None
    out = {d: (o, False) for d, o in converted.items() if o is not None}
    if ORIGINAL_NORM_OUT in keys:
        out[NORM_OUT] = (ORIGINAL_NORM_OUT, True)
    if names:  # what the converter did not take
        log.debug("%s: ignoring %d tensors that are not AuraFlow's (e.g. %s)", source, len(names), sorted(names)[:3])
    return out


def _fit(stored_shape, expected_shape, key, source, exact: bool = False) -> None:
    """Accept a stored shape that differs only by size-1 dimensions (llama.cpp drops trailing ones), unless
    ``exact`` (a linear layer's weight, kept as stored: (out, in) and nothing else)."""
    if tuple(stored_shape) == tuple(expected_shape):
        return
    squeeze = [d for d in stored_shape if d != 1], [d for d in expected_shape if d != 1]
    if exact or squeeze[0] != squeeze[1]:
        raise LoadError(f"{source}: transformer tensor {key} has shape {tuple(stored_shape)}, expected "
                        f"{tuple(expected_shape)}; the file is of another model or damaged.")


def plan_transformer(stored: dict[str, Stored], source, metadata: dict | None = None, config: dict | None = None):
    """``(model on the meta device, {diffusers key: Stored})`` with every tensor's shape checked against the model
    its config (given, or inferred from the shapes) describes, before any tensor is read; else LoadError naming
    ``source``, the tensor, what was found and what was expected. Arguments: see `assemble_transformer`."""
    from diffusers import AuraFlowTransformer2DModel

    from .configs import check_transformer_config, constructor_config, infer_transformer_config

    entries: dict[str, Stored] = {}
    for key, (name, swap) in diffusers_names(stored, source).items():
        entries[key] = stored[name].swap_halves() if swap else stored[name]
    if config is None:
        shapes = {k: torch.empty((1, *v.shape) if k in _BATCH_OF_ONE and len(v.shape) == 2 else v.shape,
                                 device="meta") for k, v in entries.items()}
        try:
            config = infer_transformer_config(shapes, metadata, source)
        except KeyError as exc:
            raise LoadError(f"{source}: no {exc.args[0]} tensor found; this is not a complete AuraFlow transformer.") \
                from None
    check_transformer_config(config, source)
    model = build_on_meta(lambda: AuraFlowTransformer2DModel(**constructor_config(AuraFlowTransformer2DModel, config,
                                                                                  source)), "transformer", source)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise LoadError(f"{source}: the transformer is missing {len(missing)} tensors (e.g. {', '.join(missing[:3])});"
                        f" the file is incomplete or of another model.")
    extra = sorted(set(entries) - set(expected))
    if extra:
        check_unexpected(model, extra, "transformer", source)
    linear_weights = {f"{name}.weight" for name, m in model.named_modules() if type(m) is nn.Linear}
    for key, t in expected.items():  # every shape, before the first tensor is read
        _fit(entries[key].shape, t.shape, key, source, exact=key in linear_weights)
    return model, {k: entries[k] for k in expected}


def assemble_transformer(stored: dict[str, Stored], source, compute_dtype: torch.dtype,
                         metadata: dict | None = None, config: dict | None = None, deferred: bool = False):
    """An `AuraFlowTransformer2DModel` whose linears hold ``stored``'s tensors in their stored form.

    stored: unprefixed original or diffusers keys -> `Stored`. metadata: key/value pairs that may carry
    ``aura_flow.attention_head_dim`` (the one config value shapes cannot give). config: skip the inference.
    deferred: ``(the model on the meta device, finish)``, every shape checked and nothing read; ``finish()`` reads
    the tensors into it and returns it."""
    model, entries = plan_transformer(stored, source, metadata, config)
    return (model, lambda: _fill(model, entries, source, compute_dtype)) if deferred else \
        _fill(model, entries, source, compute_dtype)


def _fill(model, entries: dict, source, compute_dtype):
    expected = model.state_dict()

    def decode(key):
        return entries[key].dense(compute_dtype).reshape(expected[key].shape)

    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, m in linears:
        bias = decode(f"{name}.bias") if m.bias is not None else None
        _replace(model, name, entries[f"{name}.weight"].linear(bias, compute_dtype))
    taken = {f"{name}.{p}" for name, _ in linears for p in ("weight", "bias")}
    model.load_state_dict({k: decode(k) for k in expected if k not in taken}, strict=False, assign=True)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise LoadError(f"{source}: transformer tensor {name} was not loaded")
    return model.eval().requires_grad_(False)


def build_on_meta(factory, what: str, source):
    """``factory()`` on the meta device (no memory, no random init); LoadError when the config makes no model."""
    try:
        with torch.device("meta"):
            return factory()
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, AttributeError, KeyError) as exc:
        raise LoadError(f"{source}: the {what}'s config makes no model ({exc.__class__.__name__}: {str(exc)[:200]}); "
                        "the config is damaged or of another model. Download it again") from None


def check_unexpected(module, keys, what: str, source) -> None:
    """Tensors ``module`` has no place for. Those that belong to its own structure (a block beyond the config's
    count, a weight of an existing layer that the config leaves out) mean the config does not match the weights:
    LoadError. Others (another model's parts stored beside it) are ignored with a warning."""
    modules = dict(module.named_modules())
    ours, others = [], []
    for key in sorted(keys):
        parts = key.split(".")
        depth, name = 0, ""  # the deepest module the key's leading parts name ("" the root), walked in linear time
        for part in parts[:-1]:
            if (f"{name}.{part}" if name else part) not in modules:
                break
            depth, name = depth + 1, f"{name}.{part}" if name else part
        owner = modules[name]
        if depth > 0 and (depth == len(parts) - 1 or isinstance(owner, (nn.ModuleList, nn.Sequential))):
            ours.append(key)
        else:
            others.append(key)
    if ours:
        raise LoadError(f"{source}: {len(ours)} {what} weights have no place in the model its config describes (e.g. "
                        f"{', '.join(key_name(k) for k in ours[:3])}): the config does not match the weights (a wrong "
                        "layer count or size). Use the config.json that came with these weights")
    log.warning("%s: ignoring %d tensors that are not part of the %s (e.g. %s)", source, len(others), what,
                ", ".join(key_name(k) for k in others[:3]))


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
