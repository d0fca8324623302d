"""ComfyUI's devices: where LATENT/IMAGE tensors live between nodes, which device and dtype to load with, and
releasing cached device memory. (Bringing weights to the device is `memory`'s, through ComfyUI's memory manager.)"""
from __future__ import annotations


def intermediate_device():
    """Where ComfyUI keeps LATENT / IMAGE / CONDITIONING tensors between nodes (the CPU unless --gpu-only)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        import torch

        return torch.device("cpu")
    return mm.intermediate_device()


def load_placement() -> tuple[str, str]:
    """(device, dtype) to load with: ComfyUI's offload device and the dtype it would pick for a model on its GPU;
    ("auto", "auto") outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
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
    try:
        import comfy.model_management as mm
    except ImportError:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    mm.soft_empty_cache()
