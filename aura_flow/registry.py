"""The one registry of sampler and scheduler names.

Torch-free: the node widgets, the CLI choices and the validation messages are all built from these tables at
import time; the implementations are imported only when a sampler or scheduler is first used.

A new sampler is one `SamplerInfo` entry whose ``impl`` names a function with the k-diffusion calling convention
``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    impl: str  # "module:function", relative to the aura_flow package
    calls_per_step: int = 1  # model evaluations per step (dpm_fast/dpm_adaptive: a typical count)
    needs_uncond: bool = False  # CFG++ samplers read the unconditional prediction too
    discard_penultimate: bool = False  # ComfyUI computes steps+1 sigmas and drops the second-to-last
    stochastic: bool = False  # draws noise each step (ancestral / SDE)
    options: dict = field(default_factory=dict)  # fixed keyword arguments for impl

    def function(self):
        module, _, attr = self.impl.partition(":")
        return getattr(importlib.import_module(module, __package__), attr)


def _s(name, impl, **kw):
    return SamplerInfo(name, impl, **kw)


# ComfyUI 0.29's KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2, in its order. Entries are filled in by the samplers
# module; the ones listed here with implementations are those the engine provides.
_SAMPLERS: list[SamplerInfo] = [
    _s("euler", ".samplers:sample_euler"),
]

SAMPLER_NAMES_COMFYUI_0_29 = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)

SAMPLERS: dict[str, SamplerInfo] = {s.name: s for s in _SAMPLERS}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)

SCHEDULER_NAMES: tuple[str, ...] = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
)
# The hosted API offers the first 28 sampler names of ComfyUI's older list and these schedulers.
REMOTE_SAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "ddim", "uni_pc", "uni_pc_bh2",
)
REMOTE_SCHEDULER_NAMES: tuple[str, ...] = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")


def get_sampler(name: str) -> SamplerInfo:
    from .params import ParameterError

    try:
        return SAMPLERS[name]
    except KeyError:
        raise ParameterError(f"sampler={name!r} is not known; valid names: {', '.join(SAMPLER_NAMES)}") from None
