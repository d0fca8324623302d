"""ComfyUI's devices: where LATENT/IMAGE tensors live between nodes, which device and dtype to load with, and
releasing cached device memory. (Bringing weights to the device is `memory`'s, through ComfyUI's memory manager.)"""
from __future__ import annotations

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


def empty_cache():
    """Release cached device memory (ComfyUI's soft_empty_cache; torch's own outside ComfyUI)."""
    mm = module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
