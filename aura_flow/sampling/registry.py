"""The one registry of sampler and scheduler names.

Torch-free: the node widgets, the CLI choices and the validation messages are all built from these tables at
import time; the implementations are imported only when a sampler or scheduler is first used.

A new sampler is one `SamplerInfo` entry whose ``impl`` names a function with the k-diffusion calling convention
``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``; `register_sampler` adds one at
runtime (inside ComfyUI, a name the engine lacks can be served by ComfyUI's own function).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    impl: str  # "module:function", relative to the aura_flow package
    calls_per_step: int = 1  # model evaluations per step (dpm_fast/dpm_adaptive: a typical count)
    needs_uncond: bool = False  # CFG++ samplers read the unconditional prediction too
    discard_penultimate: bool = False  # ComfyUI computes steps+1 sigmas and drops the second-to-last
    stochastic: bool = False  # draws noise each step (ancestral / SDE)
    random_inpaint_noise: bool = False  # inpainting re-noises the kept region with randn(seed + 1) (ComfyUI's ddim)
    options: dict = field(default_factory=dict)  # fixed keyword arguments for impl
    fn: Callable | None = field(default=None, compare=False, repr=False)  # a runtime-registered callable

    def function(self):
        if self.fn is not None:
            return self.fn
        module, _, attr = self.impl.partition(":")
        return getattr(importlib.import_module(module, __package__), attr)


def _s(name, impl, **kw):
    return SamplerInfo(name, impl, **kw)


_ODE, _SDE, _CFGPP, _UNIPC = ".ode:", ".sde:", ".cfgpp:", ".unipc:"

# ComfyUI 0.29's KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2, in its order; every one has an engine implementation
# that reproduces ComfyUI's numbers for this model (tests/test_samplers.py holds the parity cases).
_SAMPLERS: list[SamplerInfo] = [
    _s("euler", _ODE + "sample_euler"),
    _s("euler_cfg_pp", _CFGPP + "sample_euler_cfg_pp", needs_uncond=True),
    _s("euler_ancestral", _SDE + "sample_euler_ancestral", stochastic=True),
    _s("euler_ancestral_cfg_pp", _CFGPP + "sample_euler_ancestral_cfg_pp", needs_uncond=True, stochastic=True),
    _s("heun", _ODE + "sample_heun", calls_per_step=2),
    _s("heunpp2", _ODE + "sample_heunpp2", calls_per_step=3),
    _s("exp_heun_2_x0", _SDE + "sample_exp_heun_2_x0", calls_per_step=2),
    _s("exp_heun_2_x0_sde", _SDE + "sample_exp_heun_2_x0_sde", calls_per_step=2, stochastic=True),
    _s("dpm_2", _ODE + "sample_dpm_2", calls_per_step=2, discard_penultimate=True),
    _s("dpm_2_ancestral", _SDE + "sample_dpm_2_ancestral", calls_per_step=2, discard_penultimate=True,
       stochastic=True),
    _s("lms", _ODE + "sample_lms"),
    _s("dpm_fast", _ODE + "sample_dpm_fast"),
    _s("dpm_adaptive", _ODE + "sample_dpm_adaptive", calls_per_step=3),
    _s("dpmpp_2s_ancestral", _SDE + "sample_dpmpp_2s_ancestral", calls_per_step=2, stochastic=True),
    _s("dpmpp_2s_ancestral_cfg_pp", _CFGPP + "sample_dpmpp_2s_ancestral_cfg_pp", calls_per_step=2,
       needs_uncond=True, stochastic=True),
    _s("dpmpp_sde", _SDE + "sample_dpmpp_sde", calls_per_step=2, stochastic=True),
    _s("dpmpp_sde_gpu", _SDE + "sample_dpmpp_sde_gpu", calls_per_step=2, stochastic=True),
    _s("dpmpp_2m", _ODE + "sample_dpmpp_2m"),
    _s("dpmpp_2m_cfg_pp", _CFGPP + "sample_dpmpp_2m_cfg_pp", needs_uncond=True),
    _s("dpmpp_2m_sde", _SDE + "sample_dpmpp_2m_sde", stochastic=True),
    _s("dpmpp_2m_sde_gpu", _SDE + "sample_dpmpp_2m_sde_gpu", stochastic=True),
    _s("dpmpp_2m_sde_heun", _SDE + "sample_dpmpp_2m_sde_heun", stochastic=True),
    _s("dpmpp_2m_sde_heun_gpu", _SDE + "sample_dpmpp_2m_sde_heun_gpu", stochastic=True),
    _s("dpmpp_3m_sde", _SDE + "sample_dpmpp_3m_sde", stochastic=True),
    _s("dpmpp_3m_sde_gpu", _SDE + "sample_dpmpp_3m_sde_gpu", stochastic=True),
    _s("ddpm", _SDE + "sample_ddpm", stochastic=True),
    _s("lcm", _SDE + "sample_lcm", stochastic=True),
    _s("ipndm", _ODE + "sample_ipndm"),
    _s("ipndm_v", _ODE + "sample_ipndm_v"),
    _s("deis", _ODE + "sample_deis"),
    _s("res_multistep", _SDE + "sample_res_multistep"),
    _s("res_multistep_cfg_pp", _CFGPP + "sample_res_multistep_cfg_pp", needs_uncond=True),
    _s("res_multistep_ancestral", _SDE + "sample_res_multistep_ancestral", stochastic=True),
    _s("res_multistep_ancestral_cfg_pp", _CFGPP + "sample_res_multistep_ancestral_cfg_pp", needs_uncond=True,
       stochastic=True),
    _s("gradient_estimation", _ODE + "sample_gradient_estimation"),
    _s("gradient_estimation_cfg_pp", _CFGPP + "sample_gradient_estimation_cfg_pp", needs_uncond=True),
    _s("er_sde", _SDE + "sample_er_sde", stochastic=True),
    _s("seeds_2", _SDE + "sample_seeds_2", calls_per_step=2, stochastic=True),
    _s("seeds_3", _SDE + "sample_seeds_3", calls_per_step=3, stochastic=True),
    _s("sa_solver", _SDE + "sample_sa_solver", stochastic=True),
    _s("sa_solver_pece", _SDE + "sample_sa_solver_pece", calls_per_step=2, stochastic=True),
    _s("ddim", _ODE + "sample_euler", random_inpaint_noise=True),  # ComfyUI's ddim: euler, its own inpaint noise
    _s("uni_pc", _UNIPC + "sample_unipc", discard_penultimate=True),
    _s("uni_pc_bh2", _UNIPC + "sample_unipc_bh2", discard_penultimate=True),
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


def register_sampler(info_or_name: SamplerInfo | str, fn: Callable | None = None, *, replace: bool = False,
                     **kw) -> SamplerInfo:
    """Add a sampler at runtime (the nodes module serves names the engine lacks with ComfyUI's own function).

    Give a `SamplerInfo`, or a name plus ``fn`` (k-diffusion calling convention) and any `SamplerInfo` fields as
    keywords. The new name is appended to `SAMPLER_NAMES`; read ``registry.SAMPLER_NAMES`` after registering,
    not a copy imported earlier. An existing name is replaced only with ``replace=True``.
    """
    global SAMPLER_NAMES
    if isinstance(info_or_name, SamplerInfo):
        info = info_or_name
        if fn is not None or kw:
            info = dataclasses.replace(info, **({"fn": fn} if fn is not None else {}), **kw)
    else:
        if fn is None and "impl" not in kw:
            raise TypeError(f"register_sampler({info_or_name!r}): give fn= (a callable) or impl='module:function'")
        kw.setdefault("impl", f"<runtime:{getattr(fn, '__qualname__', type(fn).__name__)}>")
        info = SamplerInfo(str(info_or_name), fn=fn, **kw)
    if not info.name or not isinstance(info.name, str):
        raise ValueError(f"sampler name must be a non-empty string, got {info.name!r}")
    if info.name in SAMPLERS and not replace:
        raise ValueError(f"sampler {info.name!r} is already registered; pass replace=True to override it")
    log.info("sampler %r %s (%s)", info.name, "replaced" if info.name in SAMPLERS else "registered", info.impl)
    SAMPLERS[info.name] = info
    SAMPLER_NAMES = tuple(SAMPLERS)
    return info


def get_sampler(name: str) -> SamplerInfo:
    from ..errors import ParameterError, shown

    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list from a JSON workflow)
        raise ParameterError(f"sampler={shown(name)} is not known; valid names: {', '.join(SAMPLER_NAMES)}") from None
