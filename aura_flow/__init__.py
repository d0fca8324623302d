"""AuraFlow engine: loading every checkpoint layout, ComfyUI-exact sampling, generation. Never imports ComfyUI.

The heavy modules (torch, diffusers, transformers) load lazily on first use, so importing the package is cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {  # name -> the module that defines it (imported on first use: they import torch)
    "load": ".pipeline.pipeline",
    "AuraFlowPipeline": ".pipeline.pipeline",
    "GenerationResult": ".pipeline.pipeline",
    "sample": ".sampling.loop",
    "prepare_noise": ".sampling.loop",
    "ModelSampling": ".sampling.schedules",
}

# torch-free
from .errors import Interrupted, LoadError, NumericError, ParameterError  # noqa: E402
from .params import DEFAULTS, validate_generation  # noqa: E402
from .pipeline.modes import SpeedOptions  # noqa: E402
from .plan import GenerationPlan, SamplingPlan, plan_generation, plan_sampling, sigmas  # noqa: E402
from .sampling.registry import SAMPLER_NAMES, SAMPLERS, SCHEDULER_NAMES, register_sampler  # noqa: E402


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aura_flow' has no attribute {name!r}")


__all__ = sorted([*_LAZY, "Interrupted", "LoadError", "NumericError", "ParameterError", "DEFAULTS", "validate_generation",
                  "SpeedOptions", "GenerationPlan", "SamplingPlan", "plan_generation", "plan_sampling", "sigmas",
                  "SAMPLER_NAMES", "SAMPLERS", "SCHEDULER_NAMES", "register_sampler"])
