"""CFG++ samplers (Chung et al. 2024): they step along the unconditional x0 but land on the guided one.

Each reads the unconditional prediction of the latest call from ``model.last_uncond``, which `CFGDenoiser` sets;
their `SamplerInfo` has ``needs_uncond=True`` so the unconditional pass runs even at cfg 1. Numbers follow
ComfyUI 0.29's ``*_cfg_pp`` functions, including the variance-exploding ancestral split they keep for flow models.
"""
from __future__ import annotations

import torch

from .ode import ancestral_step, emit, half_log_snr, ones, to_d
from .sde import res_multistep, step_noise


def _no_uncond(sampler):
    return TypeError(f"sampler {sampler!r} is a CFG++ sampler: the model must set .last_uncond (the "
                     "unconditional x0) on every call, as CFGDenoiser(need_uncond=True) does")


def _uncond(model, sampler):
    u = getattr(model, "last_uncond", None)
    if u is None:
        raise _no_uncond(sampler)
    return u


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                  s_noise=1.0, noise_sampler=None):
    """Euler (DDIM) step on the unconditional noise direction, ancestral split taken in sigma / alpha."""
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond = _uncond(model, "euler_ancestral_cfg_pp")
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        alpha_s = sigmas[i] * half_log_snr(sigmas[i]).exp()
        alpha_t = sigmas[i + 1] * half_log_snr(sigmas[i + 1]).exp()
        d = to_d(x, sigmas[i], alpha_s * uncond)
        sigma_down, sigma_up = ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta=eta)
        x = alpha_t * denoised + alpha_t * sigma_down * d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Deterministic Euler CFG++ (the eta = 0 case of `sample_euler_ancestral_cfg_pp`)."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0)


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                     s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S) CFG++ with the variance-exploding ancestral split (ComfyUI has no RF form of it)."""
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond = _uncond(model, "dpmpp_2s_ancestral_cfg_pp")
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        emit(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0:
            x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
        else:
            t, t_next = -sigmas[i].log(), -sigma_down.log()
            h = t_next - t
            s = t + 0.5 * h
            shifted = x + (denoised - uncond)
            x_2 = (s.neg().exp() / t.neg().exp()) * shifted - (-h * 0.5).expm1() * denoised
            denoised_2 = model(x_2, s.neg().exp() * s_in, **extra_args)
            # ComfyUI's final update reads the uncond of this second call (its post-CFG hook overwrote it)
            shifted = x + (denoised - _uncond(model, "dpmpp_2s_ancestral_cfg_pp"))
            x = (t_next.neg().exp() / t.neg().exp()) * shifted - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) CFG++."""
    extra_args = extra_args or {}
    s_in = ones(x)
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond = _uncond(model, "dpmpp_2m_cfg_pp")
        emit(callback, x, i, sigmas[i], denoised)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        mix = -torch.exp(-h) * uncond
        if old_uncond is not None and sigmas[i + 1] != 0:
            r = (t + sigmas[i - 1].log()) / h
            mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x


@torch.no_grad()
def sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                                noise_sampler=None):
    _uncond_hook_check(model, "res_multistep_cfg_pp")
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=0.0,
                         cfg_pp=True)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                          s_noise=1.0, noise_sampler=None):
    _uncond_hook_check(model, "res_multistep_ancestral_cfg_pp")
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=eta,
                         cfg_pp=True)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0):
    """Gradient estimation CFG++: the derivative comes from the unconditional x0."""
    extra_args = extra_args or {}
    s_in = ones(x)
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], _uncond(model, "gradient_estimation_cfg_pp"))
        emit(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1]
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def _uncond_hook_check(model, sampler):
    if not hasattr(model, "last_uncond"):
        raise _no_uncond(sampler)
