"""AuraFlow engine: loading every checkpoint layout, ComfyUI-exact sampling, generation. Never imports ComfyUI.

The heavy modules (torch, diffusers, transformers) load lazily on first use, so importing the package is cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": ".pipeline.pipeline",
    "AuraFlowPipeline": ".pipeline.pipeline",
    "GenerationResult": ".pipeline.pipeline",
    "sample": ".sampling.loop",
    "prepare_noise": ".sampling.loop",
    "Interrupted": ".sampling.loop",
    "sigmas": ".sampling.schedules",
    "ModelSampling": ".sampling.schedules",
    "SpeedOptions": ".pipeline.speed",
}

from .errors import LoadError, ParameterError  # noqa: E402  (torch-free)
from .params import DEFAULTS, validate_generation  # noqa: E402  (torch-free)
from .sampling.registry import SAMPLER_NAMES, SAMPLERS, SCHEDULER_NAMES  # noqa: E402  (torch-free)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aura_flow' has no attribute {name!r}")


__all__ = sorted(list(_LAZY) + ["DEFAULTS", "LoadError", "ParameterError", "validate_generation", "SAMPLER_NAMES", "SAMPLERS",
                                "SCHEDULER_NAMES"])
