"""Devices, dtypes and memory: which device and storage/compute dtypes a load uses, and how much a part weighs."""
from __future__ import annotations

import logging

from ..errors import ParameterError
from ..params import DTYPES

log = logging.getLogger(__name__)


def resolve_device(device):
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"device={device!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device={device!r}: this torch has no usable CUDA device; use auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParameterError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ParameterError(f"device={device!r}: MPS is not available here; use auto or cpu")
    return dev


def resolve_dtypes(dtype: str, device):
    """-> (storage dtype, compute dtype) for the transformer; the text encoder uses the compute dtype."""
    import torch

    if dtype not in DTYPES:
        raise ParameterError(f"dtype={dtype!r} is not known; valid: {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.type == "cuda":
            d = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "mps":
            d = torch.float16
        else:
            d = torch.float32
        return d, d
    if dtype.startswith("fp8"):
        storage = torch.float8_e4m3fn if dtype == "fp8_e4m3fn" else torch.float8_e5m2
        compute = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
        return storage, compute
    d = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return d, d



# what sampling and a fp32 VAE decode of a 1024x1024 image need besides the weights (the decode dominates)
WORKING_MEMORY = 4 * 2**30


def text_encoder_should_wait(free_bytes: int, part_bytes: dict) -> bool:
    """Whether the text encoder should wait on the CPU between prompts: when the device's free memory cannot hold
    every part (``part_bytes``: name -> bytes) plus `WORKING_MEMORY`. The text encoder is only needed to encode a
    prompt (cached afterwards), so it is the part to release before sampling."""
    if not part_bytes.get("text_encoder"):
        return False
    return sum(part_bytes.values()) + WORKING_MEMORY > free_bytes


def offload_text_encoder_auto(device, part_bytes: dict) -> bool:
    """`text_encoder_should_wait` for ``device``'s free memory now (CUDA only; elsewhere nothing is released)."""
    import torch

    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    wait = text_encoder_should_wait(free, part_bytes)
    if wait:
        log.info("%.1f GiB free on %s for %.1f GiB of weights: the text encoder waits on the CPU between prompts",
                 free / 2**30, device, sum(part_bytes.values()) / 2**30)
    return wait


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (0 for None or anything that is not a module)."""
    if module is None or not hasattr(module, "parameters"):
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])




_trim: list = []  # [glibc's malloc_trim, or None where there is none], found on first use


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim(0)``), where there is such a call.

    A generation allocates and frees many mid-sized buffers (activations, a LoRA's ΔW, the image); glibc keeps the
    freed ones in its arenas, so the RSS crept up by tens of KiB per image on the tiny model (more at real sizes)
    with the Python heap flat (benchmarks/memory_flat.py: +26 KiB/image before, +3 after). Called once per
    generation; it costs well under a millisecond. Elsewhere (macOS, Windows, musl) it does nothing."""
    if not _trim:
        fn = None
        import sys

        if sys.platform.startswith("linux"):
            import ctypes

            try:
                fn = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # musl and others: no such call
                fn = None
        _trim.append(fn)
    if _trim[0] is not None:
        _trim[0](0)
