"""ComfyUI's devices and memory around a node's run: where LATENT/IMAGE tensors live between nodes, which device
and dtype to load with, and bringing a pipeline's parts to ComfyUI's GPU for the body of a node. Outside ComfyUI
nothing moves."""
from __future__ import annotations

import contextlib

from ...aura_flow.weights.devices import module_bytes
from . import module


def intermediate_device():
    """Where ComfyUI keeps LATENT / IMAGE / CONDITIONING tensors between nodes (the CPU unless --gpu-only)."""
    mm = module("comfy.model_management")
    if mm is not None:
        return mm.intermediate_device()
    import torch

    return torch.device("cpu")


def load_placement() -> tuple[str, str]:
    """(device, dtype) to load with: ComfyUI's offload device and the dtype it would pick for a model on its GPU;
    ("auto", "auto") outside ComfyUI."""
    mm = module("comfy.model_management")
    if mm is None:
        return "auto", "auto"
    device = mm.get_torch_device()
    if mm.should_use_bf16(device):
        dtype = "bf16"
    elif mm.should_use_fp16(device):
        dtype = "fp16"
    else:
        dtype = "fp32"
    return str(mm.unet_offload_device()), dtype


@contextlib.contextmanager
def on_device(pipeline, parts=None):
    """Run the body with ``pipeline``'s ``parts`` (all by default) on ComfyUI's torch device, then put them back on
    ComfyUI's offload device.

    ComfyUI does not manage these modules, so before moving them it is asked to free room for them (unloading
    its own models if needed); afterwards they go to the CPU, or stay on the GPU when ComfyUI runs with
    --highvram / --gpu-only (its offload device is then the GPU). Only the parts a node needs visit the GPU:
    sampling needs no text encoder there. Outside ComfyUI this does nothing.
    """
    mm = module("comfy.model_management")
    if mm is None:
        yield pipeline
        return
    parts = tuple(parts or pipeline.PARTS)
    device = mm.get_torch_device()
    moving = [p for p in parts if getattr(pipeline, p, None) is not None and pipeline.part_device(p) != device]
    if moving:
        need = sum(module_bytes(getattr(pipeline, p)) for p in moving)
        mm.free_memory(int(need * 1.1) + 2 * 1024**3, device)  # weights + working room
        pipeline.to(device, parts=moving)
    try:
        yield pipeline
    finally:
        offload = mm.unet_offload_device()
        back = [p for p in parts if getattr(pipeline, p, None) is not None and pipeline.part_device(p) != offload]
        if back:
            pipeline.to(offload, parts=back)
            empty_cache()


def empty_cache():
    """Release cached device memory (ComfyUI's soft_empty_cache; torch's own outside ComfyUI)."""
    mm = module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
