"""ComfyUI owns the pack's weights, as it owns its core models.

Inside ComfyUI each part a node hands over (the transformer, the text encoder, the VAE) is held by one
``comfy.model_patcher.ModelPatcher`` — an `AuraFlowPatcher`, created the first time the part is loaded and kept on
the part's module, so every object that shares the module (the loader's outputs, a LoRA view of the model) shares
the patcher — and is brought to the device with ``comfy.model_management.load_models_gpu``. So ComfyUI's log says
"Requested to load AuraFlowTransformer" once, a rerun loads nothing anew, ComfyUI unloads the parts when another
model needs the memory (and they unload its models in turn), and --lowvram / --novram / --reserve-vram give a
partially loaded transformer whose remaining layers stream their weights per call (the engine's `PatchableLinear`
carries the attributes ComfyUI's lowvram path sets). Nothing is moved back after a node: residency is ComfyUI's.

Each part sits in a small container module (diffusers' and transformers' ``device`` is read-only, and ComfyUI
writes it) whose class name is what the log shows. Outside ComfyUI every call here does nothing, and the engine
keeps its own placement.
"""
from __future__ import annotations

import contextlib
import logging
import math


log = logging.getLogger(__name__)

PATCHER_ATTR = "_comfyui_patcher"  # on the part's own module: one patcher per loaded pipeline, shared by its views

# part -> (container class name, child name inside it)
PARTS = {
    "transformer": ("AuraFlowTransformer", "diffusion_model"),
    "text_encoder": ("AuraFlowTextEncoder", "transformer"),
    "vae": ("AuraFlowAutoencoder", "first_stage_model"),
}


def part_devices(part: str) -> tuple:
    """(load device, offload device) ComfyUI gives ``part``, as for its own models of that kind."""
    import comfy.model_management as mm  # inside ComfyUI only (managed())

    if part == "transformer":
        return mm.get_torch_device(), mm.unet_offload_device()
    if part == "text_encoder":
        return mm.text_encoder_device(), mm.text_encoder_offload_device()
    return mm.vae_device(), mm.vae_offload_device()

_CLASSES: dict = {}


def managed() -> bool:
    """True inside ComfyUI (its memory manager is there to own the weights)."""
    try:
        import comfy.model_management as mm
        import comfy.model_patcher  # noqa: F401 (the patchers are made from its ModelPatcher)
    except ImportError:
        return False
    return hasattr(mm, "load_models_gpu")


# ------------------------------------------------------------------------------------------ containers, patcher
def _container_class(name: str):
    if name not in _CLASSES:
        import torch

        def __init__(self, part, child: str, device, dtype, compute_dtype):
            torch.nn.Module.__init__(self)
            self.add_module(child, part)
            self.device = device  # a plain attribute: ModelPatcher writes it on every load and unload
            self._dtype = dtype
            self.manual_cast_dtype = compute_dtype  # streamed layers are computed in this dtype

        def get_dtype(self):
            return self._dtype

        _CLASSES[name] = type(name, (torch.nn.Module,), {
            "__init__": __init__, "get_dtype": get_dtype, "__module__": __name__,
            "__doc__": "One AuraFlow part as ComfyUI's ModelPatcher holds it (its class name is what the log shows)."})
    return _CLASSES[name]


def _same_device(a, b) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def stragglers(model) -> list:
    """What ComfyUI's partial load never moves: ``(module, "param" | "buffer", name)`` for the parameters and
    buffers of modules that cannot stream (norms, embeddings, convolutions, bare parameters of non-leaf modules such
    as the transformer's register tokens and position grid), unless ComfyUI loaded the module itself."""
    found = []
    for m in model.modules():
        if hasattr(m, "comfy_cast_weights") or getattr(m, "comfy_patched_weights", False):
            continue
        found += [(m, "param", name) for name, _p in m.named_parameters(recurse=False)]
        found += [(m, "buffer", name) for name, b in m.named_buffers(recurse=False) if b is not None]
    return found


def place_stragglers(model, device) -> int:
    """Put the `stragglers` on ``device`` (parameters keep their identity); -> their bytes, now held there."""
    counted = 0
    for m, kind, name in stragglers(model):
        t = getattr(m, name)
        if not _same_device(t.device, device):
            if kind == "param":
                t.data = t.data.to(device)
            else:
                m._buffers[name] = t.to(device)
        counted += t.numel() * t.element_size()
    return counted


def patcher_class():
    """`AuraFlowPatcher`: ComfyUI's ModelPatcher (the legacy, estimate-based one, as ComfyUI-GGUF uses beside
    dynamic VRAM), plus: after every load, the modules its lowvram walk skips are put on the device too."""
    if "patcher" not in _CLASSES:
        import comfy.model_patcher as mp

        class AuraFlowPatcher(mp.ModelPatcher):
            def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
                super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                             force_patch_weights=force_patch_weights, full_load=full_load)
                if device_to is not None:
                    extra = place_stragglers(self.model, device_to)
                    self.model.model_loaded_weight_memory = min(
                        self.model_size(), self.model.model_loaded_weight_memory + extra)

        _CLASSES["patcher"] = AuraFlowPatcher
    return _CLASSES["patcher"]


def part_module(obj, part: str):
    """The module of ``part`` that ``obj`` (a pipeline, a view of one, or an output object) hands over."""
    if part not in PARTS:
        raise ValueError(f"unknown AuraFlow part {part!r}; one of {', '.join(PARTS)}")
    found = getattr(obj, part, None)
    if found is None:
        raise RuntimeError(f"AuraFlow: this {type(obj).__name__} has no {part.replace('_', ' ')}; load a checkpoint "
                           f"that has one, or pick it in AuraFlow Loader")
    return found


def patcher(obj, part: str):
    """The ModelPatcher holding ``obj``'s ``part`` (created on first use, then shared); None outside ComfyUI."""
    if not managed():
        return None
    part_mod = part_module(obj, part)
    found = part_mod.__dict__.get(PATCHER_ATTR)
    if found is not None:
        return found
    name, child = PARTS[part]
    load_device, offload_device = part_devices(part)
    compute = getattr(obj, "dtype", None)
    if part == "vae":
        import torch

        compute = torch.float32  # the engine's VAE always runs in fp32
    try:
        first = next(part_mod.parameters())
    except StopIteration:
        first = None
    where = first.device if first is not None else offload_device
    container = _container_class(name)(part_mod, child, where, compute or (first.dtype if first is not None else None),
                                       compute)
    found = patcher_class()(container, load_device=load_device, offload_device=offload_device)
    part_mod.__dict__[PATCHER_ATTR] = found
    log.debug("AuraFlow: %s held by ComfyUI (load %s, offload %s)", name, load_device, offload_device)
    return found


# ------------------------------------------------------------------------------------------------ loading
def load(obj, part: str, *, memory_required: float = 0, minimum_memory_required: float | None = None,
         force_full_load: bool = False):
    """Bring ``obj``'s ``part`` to ComfyUI's device with load_models_gpu (a no-op when it is already there) and tell
    the pipeline where it now runs; returns that device, or None outside ComfyUI (nothing moves)."""
    p = patcher(obj, part)
    if p is None:
        return None
    import comfy.model_management as mm  # there: a patcher was made

    mm.load_models_gpu([p], memory_required=memory_required, minimum_memory_required=minimum_memory_required,
                       force_full_load=force_full_load)
    placed = getattr(obj, "placed", None)
    if callable(placed):
        placed(part, p.load_device)
    return p.load_device


def load_transformer(model, latent_shape) -> None:
    """The transformer, with room for a CFG batch of ``latent_shape`` (at least for one pass), as ComfyUI's
    sampler asks for its own models."""
    if not managed():
        return
    shape = list(latent_shape)
    load(model, "transformer", memory_required=transformer_memory([2 * shape[0]] + shape[1:], model),
         minimum_memory_required=transformer_memory(shape, model))


def load_vae(vae_owner, shape, *, decode: bool) -> None:
    """The VAE, whole (as ComfyUI loads VAEs), with room for one image of ``shape`` (a latent when decoding, an
    image (B, H, W, C) when encoding): ComfyUI's estimate for the SDXL VAE in fp32."""
    if not managed():
        return
    size = 4  # fp32
    need = 2178 * shape[2] * shape[3] * 64 * size if decode else 1767 * shape[1] * shape[2] * size
    load(vae_owner, "vae", memory_required=need, force_full_load=True)


def transformer_memory(input_shape, model) -> float:
    """ComfyUI's BaseModel.memory_required for AuraFlow (memory_usage_factor 2.0) at ``input_shape``."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return 0
    area = input_shape[0] * math.prod(input_shape[2:])
    if mm.xformers_enabled() or mm.pytorch_attention_flash_attention():
        return area * mm.dtype_size(getattr(model, "dtype", None)) * 0.01 * 2.0 * 1024 * 1024
    return area * 0.15 * 2.0 * 1024 * 1024


@contextlib.contextmanager
def using(obj, parts):
    """A pipeline stage hook (``AuraFlowPipeline.generate(stage=...)``): load the stage's parts, then leave them to
    ComfyUI."""
    for part in parts:
        if part == "vae":
            load(obj, part, force_full_load=True)
        else:
            load(obj, part)
    yield obj

