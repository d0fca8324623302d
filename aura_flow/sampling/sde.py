"""Stochastic samplers (ancestral, SDE, LCM, DDPM) and ComfyUI's two noise streams.

Noise streams, as ComfyUI 0.29 draws them (so a seed gives ComfyUI's image):
- step noise (`step_noise`): ``torch.randn`` from one generator on the latent's device seeded with the seed, or
  seed + 1 when the latent is on the CPU;
- Brownian noise (`BrownianNoise`): a ``torchsde.BrownianTree`` over [sigma_min, sigma_max] with the seed as its
  entropy, built on the CPU (the ``*_gpu`` samplers build it on the latent's device instead).

For this flow model (alpha = 1 - sigma) the ancestral samplers take their rectified-flow forms and the SDE samplers
work in the half-log-SNR lambda = log((1 - sigma) / sigma).
"""
from __future__ import annotations

import warnings

import torch

from .ode import (ancestral_step, dpm2_step, emit, half_log_snr, model_sampling_of, offset_first_sigma,
                       ones, sigma_of_half_log_snr, to_d)


def step_noise(x, seed=None):
    """ComfyUI's ``default_noise_sampler``: returns ``noise(sigma, sigma_next)`` drawing N(0, 1) like ``x``."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed + 1 if x.device.type == "cpu" else seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                 generator=generator)


class BrownianNoise:
    """Unit-variance increments of one Brownian path W over sigma: ``(W(s_next) - W(s)) / sqrt|s_next - s|``.

    The same seed gives the same path whatever steps are taken, which is what makes the SDE samplers converge
    as the step count grows.
    """

    def __init__(self, x, sigma_min, sigma_max, seed=None, cpu=True):
        import torchsde

        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        if t1 < t0:
            t0, t1 = t1, t0
        w0 = torch.zeros_like(x)
        if seed is None:
            seed = torch.randint(0, 2 ** 63 - 1, ()).item()
        self.cpu = cpu
        if cpu:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    def __call__(self, sigma, sigma_next):
        s0, s1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (s0, s1, 1) if s0 < s1 else (s1, s0, -1)
        device, dtype = lo.device, lo.dtype
        if self.cpu:
            lo, hi = lo.detach().cpu().float(), hi.detach().cpu().float()
        with warnings.catch_warnings():
            # float32 sigmas read back as float64 can sit 1 ulp outside the tree's ends; torchsde clamps and warns
            warnings.filterwarnings("ignore", message="Should have t[ab][<>]=t[01]", category=UserWarning)
            w = self.tree(lo, hi).to(device=device, dtype=dtype) * sign
        return w / (s1 - s0).abs().sqrt()


def _brownian(x, sigmas, extra_args, cpu):
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    return BrownianNoise(x, sigma_min, sigma_max, seed=extra_args.get("seed"), cpu=cpu)


def _rf_split(sigma, sigma_next, eta):
    """Rectified-flow ancestral split: (sigma_down, alpha_next / alpha_down, renoise coefficient)."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
    return sigma_down, alpha_next / alpha_down, renoise


# ---------------------------------------------------------------------------------------------- ancestral (RF)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Euler to sigma_down, then rescale to alpha_next and add fresh noise (``euler_ancestral_RF``)."""
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        sigma_down, scale, renoise = _rf_split(sigmas[i], sigmas[i + 1], eta)
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """DPM-2 midpoint step to sigma_down, then the RF renoise (``dpm_2_ancestral_RF``)."""
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, scale, renoise = _rf_split(sigmas[i], sigmas[i + 1], eta)
        emit(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
            continue
        x = dpm2_step(model, x, d, sigmas[i], sigma_down, extra_args)
        if eta > 0:  # ComfyUI renoises always; at eta = 0 its coefficient is sqrt(a rounding-negative 0) = nan
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """DPM-Solver++(2S) to sigma_down via the half-log-SNR midpoint, then the RF renoise (``..._RF``)."""
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, scale, renoise = _rf_split(sigmas[i], sigmas[i + 1], eta)
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            if sigmas[i] == 1.0:
                sigma_s = 0.9999  # lambda(1) is -inf; ComfyUI takes this fixed midpoint
            else:
                lam, lam_down = half_log_snr(sigmas[i]), half_log_snr(sigma_down)
                sigma_s = ((lam + 0.5 * (lam_down - lam)).exp() + 1) ** -1
            ratio = sigma_s / sigmas[i]
            u = ratio * x + (1 - ratio) * denoised
            d_s = model(u, sigma_s * s_in, **extra_args)
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * d_s
        if sigmas[i + 1] > 0 and eta > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


# ------------------------------------------------------------------------------------------ SDE (log-SNR time)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=0.5, cpu_tree=True):
    """DPM-Solver++ (stochastic, two model calls per step) with Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    noise = noise_sampler or _brownian(x, sigmas, extra_args, cpu_tree)
    s_in = ones(x)
    sigmas = offset_first_sigma(sigmas, model, "dpmpp_sde")
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
        h = lam_t - lam_s
        lam_s1 = lam_s + r * h
        fac = 1 / (2 * r)
        sigma_s1 = sigma_of_half_log_snr(lam_s1)
        alpha_s = sigmas[i] * lam_s.exp()
        alpha_s1 = sigma_s1 * lam_s1.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        # stage 1: to lambda_s1 with the ancestral split taken in sigma/alpha = exp(-lambda)
        sd, su = ancestral_step(lam_s.neg().exp(), lam_s1.neg().exp(), eta)
        h_ = -sd.log() - lam_s
        x_2 = (alpha_s1 / alpha_s) * (-h_).exp() * x - alpha_s1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s1 * noise(sigmas[i], sigma_s1) * s_noise * su
        denoised_2 = model(x_2, sigma_s1 * s_in, **extra_args)
        # stage 2
        sd, su = ancestral_step(lam_s.neg().exp(), lam_t.neg().exp(), eta)
        h_ = -sd.log() - lam_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                         noise_sampler=None, r=0.5):
    """`sample_dpmpp_sde` with the Brownian tree on the latent's device."""
    return sample_dpmpp_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r,
                            cpu_tree=False)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", cpu_tree=True):
    """DPM-Solver++(2M) SDE; ``solver_type`` 'midpoint' or 'heun' picks the second-order correction."""
    if solver_type not in ("midpoint", "heun"):
        from ..errors import ParameterError

        raise ParameterError(f"solver_type={solver_type!r} is not known; valid values: midpoint, heun")
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    noise = noise_sampler or _brownian(x, sigmas, extra_args, cpu_tree)
    s_in = ones(x)
    sigmas = offset_first_sigma(sigmas, model, "dpmpp_2m_sde")
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                            noise_sampler=None, solver_type="midpoint"):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                               solver_type, cpu_tree=False)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                             noise_sampler=None):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, "heun")


@torch.no_grad()
def sample_dpmpp_2m_sde_heun_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                 s_noise=1.0, noise_sampler=None):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, "heun",
                               cpu_tree=False)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, cpu_tree=True):
    """DPM-Solver++(3M) SDE (falls back to 2M and 1st order on the first steps)."""
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    noise = noise_sampler or _brownian(x, sigmas, extra_args, cpu_tree)
    s_in = ones(x)
    sigmas = offset_first_sigma(sigmas, model, "dpmpp_3m_sde")
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                x = x + (alpha_t * phi_2) * ((denoised - denoised_1) / (h_1 / h))
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                            noise_sampler=None):
    return sample_dpmpp_3m_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                               cpu_tree=False)


def _phi1(h):
    """h * phi_1(h) = e^h - 1."""
    return torch.expm1(h)


def _phi2(h):
    """h * phi_2(h) = (e^h - 1 - h) / h."""
    return (torch.expm1(h) - h) / h


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r=0.5, solver_type="phi_1"):
    """SEEDS-2 (Gonzalez et al. 2023), data prediction in half-log-SNR; exp_heun_2_x0 is its r = 1, phi_2 case."""
    if solver_type not in ("phi_1", "phi_2"):
        from ..errors import ParameterError

        raise ParameterError(f"solver_type={solver_type!r} is not known; valid values: phi_1, phi_2")
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    inject = eta > 0 and s_noise > 0
    sigmas = offset_first_sigma(sigmas, model, "seeds_2")
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_s1 = torch.lerp(lam_s, lam_t, r)
        sigma_s1 = sigma_of_half_log_snr(lam_s1)
        alpha_s1 = sigma_s1 * lam_s1.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        x_2 = sigma_s1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s1 * _phi1(-r * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s1)
            x_2 = x_2 + sde_noise * sigma_s1 * s_noise
        denoised_2 = model(x_2, sigma_s1 * s_in, **extra_args)
        if solver_type == "phi_1":
            x = (sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x
                 - alpha_t * _phi1(-h_eta) * torch.lerp(denoised, denoised_2, fac))
        else:
            b2 = _phi2(-h_eta) / r
            b1 = _phi1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject:
            seg = (r - 1) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise(sigma_s1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@torch.no_grad()
def sample_exp_heun_2_x0(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Deterministic exponential Heun (2nd order) on x0 in half-log-SNR time."""
    return sample_seeds_2(model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0, r=1.0,
                          solver_type="phi_2")


@torch.no_grad()
def sample_exp_heun_2_x0_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                             noise_sampler=None):
    """Stochastic exponential Heun (2nd order) on x0 in half-log-SNR time."""
    return sample_seeds_2(model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                          noise_sampler=noise_sampler, r=1.0, solver_type="phi_2")


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r_1=1 / 3, r_2=2 / 3):
    """SEEDS-3: three stages in half-log-SNR with exactly-coupled noise between the stages."""
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    inject = eta > 0 and s_noise > 0
    sigmas = offset_first_sigma(sigmas, model, "seeds_3")
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_s1, lam_s2 = torch.lerp(lam_s, lam_t, r_1), torch.lerp(lam_s, lam_t, r_2)
        sigma_s1, sigma_s2 = sigma_of_half_log_snr(lam_s1), sigma_of_half_log_snr(lam_s2)
        alpha_s1, alpha_s2 = sigma_s1 * lam_s1.exp(), sigma_s2 * lam_s2.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        x_2 = sigma_s1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s1 * _phi1(-r_1 * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s1)
            x_2 = x_2 + sde_noise * sigma_s1 * s_noise
        denoised_2 = model(x_2, sigma_s1 * s_in, **extra_args)
        a3_2 = r_2 / r_1 * _phi2(-r_2 * h_eta)
        a3_1 = _phi1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            seg = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise(sigma_s1, sigma_s2)
            x_3 = x_3 + sde_noise * sigma_s2 * s_noise
        denoised_3 = model(x_3, sigma_s2 * s_in, **extra_args)
        b3 = _phi2(-h_eta) / r_2
        b1 = _phi1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            seg = (r_2 - 1) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise(sigma_s2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None,
                  max_stage=3):
    """ER-SDE-Solver-3 (Cui et al. 2023), VP form with the default noise scaler x * (exp(x^0.3) + 10)."""
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)

    def scaler(v):
        return v * ((v ** 0.3).exp() + 10.0)

    n_points = 200.0
    points = torch.arange(0, n_points, dtype=torch.float32, device=x.device)
    sigmas = offset_first_sigma(sigmas, model, "er_sde")
    er = half_log_snr(sigmas).neg().exp()  # sigma / alpha
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_s, er_t = er[i], er[i + 1]
            alpha_s, alpha_t = sigmas[i] / er_s, sigmas[i + 1] / er_t
            r = scaler(er_t) / scaler(er_s)
            x = (alpha_t / alpha_s) * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = er_t - er_s
                step = -dt / n_points
                pos = er_t + points * step
                scaled = scaler(pos)
                s = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (er_s - er[i - 1])
                x = x + alpha_t * (dt + s * scaler(er_t)) * denoised_d
                if stage >= 3:
                    s_u = torch.sum((pos - er_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((er_s - er[i - 2]) / 2)
                    x = x + alpha_t * ((dt ** 2) / 2 + s_u * scaler(er_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * (
                    er_t ** 2 - er_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
        old_denoised = denoised
    return x


# ---------------------------------------------------------------------------------------------- SA-Solver


def _sa_exp_coeffs(s, t, order, tau):
    """(1 + tau^2) * integral_s^t exp((1 + tau^2) x) x^p dx / exp((1 + tau^2) t), p = 0..order-1 (by parts)."""
    import math

    tau_mul = 1 + tau ** 2
    h = t - s
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    products = t ** p - s ** p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_fact = (p + 1).lgamma()
    coeff = log_fact.unsqueeze(1) - log_fact.unsqueeze(0)
    if tau > 0:
        coeff = coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    lower = torch.where(depth >= 0, coeff.exp() * signs, 0.0)  # the lower triangle (Tensor.tril is slow here)
    return lower @ products


def _sa_b_coeffs(sigma_next, lambdas, lam_s, lam_t, tau):
    """SA-Solver b_i: the Lagrange basis on ``lambdas`` integrated against the exponential weight (eqs. 15, 18)."""
    n = lambdas.shape[0]
    integrals = torch.linalg.solve(torch.vander(lambdas, n, increasing=True).T, _sa_exp_coeffs(lam_s, lam_t, n, tau))
    return sigma_next * lam_t.exp() * integrals


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                     noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False, tau_eta=1.0):
    """Stochastic Adams predictor-corrector (Xue et al. 2023); noise (tau = tau_eta) only for sigma within
    [percent_to_sigma(0.8), percent_to_sigma(0.2)], lower orders near the end."""
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    noise_fn = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    ms = model_sampling_of(model, "sa_solver")
    sigmas = offset_first_sigma(sigmas, model, "sa_solver")
    lambdas = half_log_snr(sigmas)
    start_sigma, end_sigma = ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8)

    def tau_of(sigma):
        if tau_eta <= 0:
            return 0.0
        return tau_eta if start_sigma >= float(sigma) >= end_sigma else 0.0

    max_order = max(predictor_order, corrector_order)
    x_pred = x
    h, tau, noise = 0.0, 0.0, 0.0
    preds = []
    lower_to_end = float(sigmas[-1]) == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in, **extra_args)
        emit(callback, x_pred, i, sigmas[i], denoised)
        preds = (preds + [denoised])[-max_order:]
        p_order = min(predictor_order, len(preds))
        c_order = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if lower_to_end:
            p_order = min(p_order, len(sigmas) - 2 - i)
            c_order = min(c_order, len(sigmas) - 1 - i)
        if c_order == 0:
            x = x_pred
        else:
            b = _sa_b_coeffs(sigmas[i], lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau)
            corr = torch.tensordot(torch.stack(preds[-c_order:], dim=1), b, dims=([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * (-(tau ** 2) * h).exp() * x + corr
            if tau > 0 and s_noise > 0:
                x = x + noise  # the predictor's noise, kept for the corrected state
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                preds[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau = tau_of(sigmas[i + 1])
            b = _sa_b_coeffs(sigmas[i + 1], lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau)
            pred = torch.tensordot(torch.stack(preds[-p_order:], dim=1), b, dims=([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau ** 2) * h).exp() * x + pred
            if tau > 0 and s_noise > 0:
                noise = noise_fn(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (
                    -2 * tau ** 2 * h).expm1().neg().sqrt() * s_noise
                x_pred = x_pred + noise
    return x_pred


@torch.no_grad()
def sample_sa_solver_pece(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                          noise_sampler=None, predictor_order=3, corrector_order=4, tau_eta=1.0):
    """SA-Solver in PECE mode: the corrected state is evaluated again (one more model call per step)."""
    return sample_sa_solver(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler,
                            predictor_order, corrector_order, use_pece=True, tau_eta=tau_eta)


# ---------------------------------------------------------------------------------------- res_multistep family


@torch.no_grad()
def res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None,
                  eta=1.0, cfg_pp=False):
    """RES second-order multistep (Zhang et al. 2023) in t = -log sigma. With eta > 0 it steps to the VE
    ancestral sigma_down and adds sigma_up noise, as ComfyUI does even for flow models. ``cfg_pp`` reads the
    unconditional x0 from ``model.last_uncond`` (CFG++)."""
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)

    def phi1(t):
        return torch.expm1(t) / t

    def phi2(t):
        return (phi1(t) - 1.0) / t

    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond = model.last_uncond if cfg_pp else None
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        emit(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old = -sigmas[i].log(), -torch.as_tensor(old_sigma_down).log()
            t_next, t_prev = -torch.as_tensor(sigma_down).log(), -sigmas[i - 1].log()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            p1, p2 = phi1(-h), phi2(-h)
            b1 = torch.nan_to_num(p1 - p2 / c2, nan=0.0)
            b2 = torch.nan_to_num(p2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
                x = h.neg().exp() * x + h * (b1 * uncond + b2 * old_denoised)
            else:
                x = h.neg().exp() * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = uncond if cfg_pp else denoised
        old_sigma_down = sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                         noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=0.0)


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                   s_noise=1.0, noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=eta)


# ------------------------------------------------------------------------------------------------ DDPM and LCM


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Ancestral DDPM posterior steps in variance-preserving form (alpha_bar = 1 / (1 + sigma^2)).

    These are the VP formulas of ComfyUI's ``ddpm``; they are not consistent with a flow model's marginals and
    are offered only so that every ComfyUI name runs.
    """
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        x_vp = x / torch.sqrt(1.0 + sigma ** 2.0)
        eps = (x - denoised) / sigma
        a_bar = 1 / (sigma * sigma + 1)
        a_bar_prev = 1 / (sigma_prev * sigma_prev + 1)
        alpha = a_bar / a_bar_prev
        x = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - a_bar).sqrt())
        if sigma_prev > 0:
            x = x + ((1 - alpha) * (1.0 - a_bar_prev) / (1.0 - a_bar)).sqrt() * noise(sigma, sigma_prev)
            x = x * torch.sqrt(1.0 + sigma_prev ** 2.0)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, s_noise=1.0,
               s_noise_end=None, noise_clip_std=0.0):
    """LCM: jump to x0, then re-noise to the next sigma with the flow's own noise scaling sigma*n + (1-sigma)*x0."""
    extra_args = extra_args or {}
    noise = noise_sampler or step_noise(x, extra_args.get("seed"))
    s_in = ones(x)
    n_steps = max(1, len(sigmas) - 1)
    s_start = float(s_noise)
    s_end = s_start if s_noise_end is None else float(s_noise_end)
    for i in range(n_steps):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            n = noise(sigmas[i], sigmas[i + 1])
            if noise_clip_std > 0:
                clip = noise_clip_std * n.std()
                n = n.clamp(min=-clip, max=clip)
            s_i = s_start + (s_end - s_start) * ((i / (n_steps - 1)) if n_steps > 1 else 0.0)
            if s_i != 1.0:
                n = n * s_i
            x = sigmas[i + 1] * n + (1.0 - sigmas[i + 1]) * x
    return x
