"""Flow-matching model sampling and ComfyUI's nine schedulers, reproduced number for number.

`ModelSampling` is ComfyUI's ``ModelSamplingDiscreteFlow`` for AuraFlow (shift s, multiplier 1): a 1000-entry
float32 table sigma_i = f((i+1)/1000) with f(t) = s*t / (1 + (s-1)*t); the model is fed sigma itself as its
timestep. `sigmas()` is what ``comfy.samplers.KSampler(...).sigmas`` gives for this model.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .registry import SCHEDULER_NAMES

LATENT_SCALE = 0.13025  # SDXL VAE scaling factor, no shift


def time_shift(shift: float, t):
    """f(t) = s*t / (1 + (s-1)*t): the shifted flow time; works on floats and tensors."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class ModelSampling:
    """Shift-aware discrete flow sampling (CONST prediction): denoised = x - sigma * v."""

    def __init__(self, shift: float = 1.73, timesteps: int = 1000):
        self.shift = float(shift)
        self.multiplier = 1.0
        t = torch.arange(1, timesteps + 1, 1) / timesteps * self.multiplier
        self.sigmas = self.sigma(t).to(torch.float32)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(time_shift(self.shift, 1.0 - percent))

    # CONST prediction: denoised = x - sigma * v (aura_flow.sampling.loop.CFGDenoiser)
    @staticmethod
    def noise_scaling(sigma, noise, latent_image):
        return sigma * noise + (1.0 - sigma) * latent_image

    @staticmethod
    def inverse_noise_scaling(sigma, latent):
        return latent / (1.0 - sigma)


def _normal(ms: ModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    start = ms.timestep(ms.sigma_max)
    end = ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.FloatTensor(sigs)


def _simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    ss = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def _ddim_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    x = 1
    if math.isclose(float(ms.sigmas[x]), 0, abs_tol=0.00001):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    ss = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs.append(float(ms.sigmas[x]))
        x += ss
    return torch.FloatTensor(sigs[::-1])


def _beta(ms: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    import scipy.stats

    total = len(ms.sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.FloatTensor(sigs + [0.0])


def _karras(ms: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    smin, smax = float(ms.sigma_min), float(ms.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    min_inv, max_inv = smin ** (1 / rho), smax ** (1 / rho)
    sig = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def _exponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    smin, smax = float(ms.sigma_min), float(ms.sigma_max)
    sig = torch.linspace(math.log(smax), math.log(smin), steps).exp()
    return torch.cat([sig, sig.new_zeros(1)])


def _linear_quadratic(ms: ModelSampling, steps: int, threshold_noise: float = 0.025, linear_steps=None):
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        quad_steps = steps - linear_steps
        quad_coef = diff / (linear_steps * quad_steps ** 2)
        lin_coef = threshold_noise / linear_steps - 2 * diff / (quad_steps ** 2)
        const = quad_coef * (linear_steps ** 2)
        quad = [quad_coef * (i ** 2) + lin_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in linear + quad + [1.0]]
    return torch.FloatTensor(schedule) * ms.sigma_max.cpu()


def _kl_optimal(ms: ModelSampling, steps: int) -> torch.Tensor:
    smin, smax = float(ms.sigma_min), float(ms.sigma_max)
    idx = torch.arange(steps, dtype=torch.float).div_(steps - 1)
    sig = idx.new_zeros(steps + 1)
    sig[:-1] = (idx * math.atan(smin) + (1 - idx) * math.atan(smax)).tan_()
    return sig


SCHEDULERS = {
    "simple": _simple,
    "sgm_uniform": lambda ms, n: _normal(ms, n, sgm=True),
    "karras": _karras,
    "exponential": _exponential,
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
    "normal": _normal,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def schedule(ms: ModelSampling, scheduler: str, steps: int, *, denoise: float = 1.0,
             discard_penultimate: bool = False) -> torch.Tensor:
    """Exactly ``comfy.samplers.KSampler(...).sigmas`` for AuraFlow patched with ``ModelSamplingAuraFlow(shift)``,
    for settings already checked (`aura_flow.plan` checks them; `aura_flow.sigmas` is the checked entry point).

    ``discard_penultimate``: the samplers that compute steps+1 sigmas and drop the second-to-last (dpm_2,
    dpm_2_ancestral, uni_pc, uni_pc_bh2). Returns a float32 CPU tensor of steps+1 values ending in 0 (empty when
    denoise is 0).
    """

    def calc(n):
        if discard_penultimate:
            n += 1
        s = SCHEDULERS[scheduler](ms, n)
        if discard_penultimate:
            s = torch.cat([s[:-2], s[-1:]])
        return s

    if denoise > 0.9999:
        return calc(steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return calc(schedule_length(steps, denoise))[-(steps + 1):]


def schedule_length(steps: int, denoise: float) -> int:
    """How many steps ComfyUI schedules to run the last ``steps`` of them at ``denoise`` < 1 (its int(steps/denoise));
    none at denoise 0."""
    if denoise <= 0.0:
        return 0
    return steps if denoise > 0.9999 else int(steps / denoise)
