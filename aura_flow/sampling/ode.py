"""Deterministic ODE samplers in the k-diffusion calling convention.

Every sampler is ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``, where
``model(x, sigma_batch, **extra_args)`` returns the (guided) denoised x0. They integrate dx/dsigma = (x - D)/sigma,
which is valid unchanged for a flow model with CONST prediction. Each one reproduces the numbers of the
ComfyUI 0.29 sampler of the same name (``comfy/k_diffusion/sampling.py``), including its quirks; where a quirk
matters it is named in the docstring. The stochastic samplers live in `samplers_sde`, the CFG++ ones in
`samplers_cfgpp`, UniPC in `samplers_unipc`.

Helpers shared by those modules (`to_d`, `emit`, `half_log_snr`, `offset_first_sigma`, `model_sampling_of`,
`ancestral_step`, `dpm2_step`) are defined here.
"""
from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------------------------------- helpers


def to_d(x, sigma, denoised):
    """The Karras ODE derivative dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / sigma


def ones(x):
    """A (batch,) vector of ones: ``sigma * ones(x)`` is the per-row sigma the model takes."""
    return x.new_ones([x.shape[0]])


def emit(callback, x, i, sigma, denoised, sigma_hat=None):
    """Report step ``i`` to a k-diffusion style callback (a dict with x, i, sigma, sigma_hat, denoised)."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                  "denoised": denoised})


def half_log_snr(sigma):
    """lambda = log(alpha / sigma) = log((1 - sigma) / sigma) for a flow model (alpha = 1 - sigma)."""
    return sigma.logit().neg()


def sigma_of_half_log_snr(lam):
    return lam.neg().sigmoid()


def model_sampling_of(model, sampler: str):
    """The `ModelSampling` the denoiser carries (``CFGDenoiser.model_sampling``); a few samplers need its shift."""
    ms = getattr(model, "model_sampling", None)
    if ms is None:
        raise TypeError(f"sampler {sampler!r} needs model.model_sampling (an aura_flow.sampling.schedules.ModelSampling) to "
                        "know the shift; pass model_sampling= to CFGDenoiser or set the attribute on the model")
    return ms


def offset_first_sigma(sigmas, model, sampler: str, percent: float = 1e-4):
    """ComfyUI moves a first sigma of 1 (log-SNR -inf) to ``percent_to_sigma(1e-4)`` for the log-SNR samplers."""
    if len(sigmas) <= 1 or sigmas[0] < 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = model_sampling_of(model, sampler).percent_to_sigma(percent)
    return sigmas


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """k-diffusion's variance-exploding ancestral split (sigma_down, sigma_up). ComfyUI keeps it, not the RF form,
    for flow models in the CFG++ ancestral samplers and res_multistep_ancestral*, and applies it to
    sigma/alpha in dpmpp_sde; the engine does the same so the numbers match."""
    if not eta:
        return sigma_to, 0.0
    # python min() on purpose: with sigma_from = inf the second term is nan and min() keeps sigma_to, as ComfyUI does
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


# ------------------------------------------------------------------------------------------ single-step methods


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """First-order Euler steps from sigma_i to sigma_{i+1} (also serves ``ddim``)."""
    extra_args = extra_args or {}
    s_in = ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2 without churn); Euler into sigma = 0."""
    extra_args = extra_args or {}
    s_in = ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        emit(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun++ (three-point weighted derivative, weights sigma_k / (3 sigma_0)); Heun then Euler on the last steps.

    The weights sum to one but do not cancel the second-order error term, so heunpp2 converges at first order
    only; it is kept as ComfyUI has it.
    """
    extra_args = extra_args or {}
    s_in = ones(x)
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        emit(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **extra_args))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver-2 style midpoint in log sigma; Euler into sigma = 0 (ComfyUI drops the penultimate sigma)."""
    extra_args = extra_args or {}
    s_in = ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = dpm2_step(model, x, d, sigmas[i], sigmas[i + 1], extra_args)
    return x


def dpm2_step(model, x, d, sigma, sigma_to, extra_args):
    """One DPM-2 step: Euler to the log-sigma midpoint, then the whole step with the midpoint's derivative."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * ones(x), **extra_args))
    return x + d_2 * (sigma_to - sigma)


# ------------------------------------------------------------------------------------------- multistep methods


def lms_coefficient(order: int, t, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial of node t_{i-j} on nodes t_i..t_{i-order+1}."""
    from scipy import integrate

    nodes = [t[i - k] for k in range(order)]  # kept as the schedule's float32 scalars, as ComfyUI does

    def basis(tau):
        prod = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                prod *= (tau - node) / (nodes[j] - node)
        return prod

    return float(integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0])


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma with variable steps) of up to ``order``; x = D at sigma = 0."""
    extra_args = extra_args or {}
    s_in = ones(x)
    sig = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        emit(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, sig, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


# Adams-Bashforth numerators and their common denominator (evaluated in that form, as ComfyUI does)
_AB = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """Improved PNDM: fixed-step Adams-Bashforth weights (up to 4th order) on the sigma derivative."""
    extra_args = extra_args or {}
    s_in = ones(x)
    history = []  # previous derivatives, oldest first, at most max_order - 1
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        order = min(max_order, i + 1)
        if sigmas[i + 1] == 0:
            x_next = denoised
        else:
            w, den = _AB[order]
            slope = w[0] * d
            for k in range(1, order):
                slope = slope + w[k] * history[-k]
            x_next = x + (sigmas[i + 1] - sigmas[i]) * slope / den if order > 1 else x + (sigmas[i + 1] - sigmas[i]) * d
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
        x = x_next
    return x


def _ipndm_v_weights(order, h):
    """Variable-step Adams-Bashforth weights of iPNDM-v (zju-pi/diff-sampler); ``h[k]`` = step k back (h[0] now)."""
    if order == 1:
        return (1.0,)
    h0, h1 = h[0], h[1]
    c1 = (2 + h0 / h1) / 2
    c2 = -(h0 / h1) / 2
    if order == 2:
        return c1, c2
    h2 = h[2]
    t1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return c1 + t1, c2 - (1 + h1 / h2) * t1, t1 * h1 / h2
    h3 = h[3]
    t2 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) \
        * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return (c1 + t1 + t2,
            c2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
            -t2 * q * h1 / h2)


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM with variable-step Adams-Bashforth weights (up to 4th order)."""
    extra_args = extra_args or {}
    s_in = ones(x)
    history = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        order = min(max_order, i + 1)
        if sigmas[i + 1] == 0:
            x_next = denoised
        else:
            steps_back = [sigmas[i + 1 - k] - sigmas[i - k] for k in range(order)]
            w = _ipndm_v_weights(order, steps_back)
            slope = w[0] * d
            for k in range(1, order):
                slope = slope + w[k] * history[-k]
            x_next = x + (sigmas[i + 1] - sigmas[i]) * slope
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
        x = x_next
    return x


def deis_coefficients(sigmas, max_order, n=10000):
    """DEIS 'tab' coefficients (zju-pi/diff-sampler): the sigmas are read as EDM sigmas, mapped to VP time with
    sigma_min 0.002, sigma_max 80, eps 1e-3, and the Lagrange basis is integrated against the exponential-integrator
    weight with an ``n``-point Riemann sum. Computed in float32 as ComfyUI does (its numbers depend on that), or in
    float64 for float64 sigmas."""
    dtype = torch.float64 if sigmas.dtype == torch.float64 else torch.float32
    smin2, smax2 = torch.tensor(0.002, dtype=dtype) ** 2 + 1, torch.tensor(80.0, dtype=dtype) ** 2 + 1
    eps_s = 1e-3
    beta_d = 2 * (smin2.log() / eps_s - smax2.log()) / (eps_s - 1)
    beta_min = smax2.log() - 0.5 * beta_d
    edm = sigmas.detach().cpu().to(dtype)
    t = ((beta_min ** 2 + 2 * beta_d * (edm ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    beta_0, beta_1 = beta_min, beta_d + beta_min
    coeffs = []
    for i in range(len(t) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            coeffs.append([])
            continue
        taus = torch.linspace(float(t[i]), float(t[i + 1]), n, dtype=dtype)
        dtau = (t[i + 1] - t[i]) / n
        alpha = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
        dlog_alpha = -taus * (beta_1 - beta_0) - beta_0
        weight = -0.5 * dlog_alpha / torch.sqrt(alpha * (1 - alpha))
        prev = t[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
            row.append(torch.sum(weight * poly) * dtau)
        coeffs.append(row)
    return coeffs


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, quad_points=10000):
    """DEIS multistep (tAB mode, up to 3rd order by default); Euler into sigma = 0. ``quad_points`` is the
    Riemann sum's size (ComfyUI's 10000 leaves a quadrature error near 1e-5 that more points remove)."""
    extra_args = extra_args or {}
    s_in = ones(x)
    coeffs = deis_coefficients(sigmas, max_order, n=quad_points)
    history = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        order = 1 if sigmas[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            c = coeffs[i]
            x_next = x + c[0] * d
            for k in range(1, order):
                x_next = x_next + c[k] * history[-k]
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) in t = -log sigma; first and last steps first order."""
    extra_args = extra_args or {}
    s_in = ones(x)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        emit(callback, x, i, sigmas[i], denoised)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            d_mix = denoised
        else:
            r = (t + sigmas[i - 1].log()) / h
            d_mix = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * d_mix
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0):
    """Gradient estimation (Permenter & Yuan): Euler plus (gamma - 1) times the change of the derivative."""
    extra_args = extra_args or {}
    s_in = ones(x)
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        emit(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


# -------------------------------------------------------------------------------- DPM-Solver fast / adaptive


class _DPMSolver:
    """DPM-Solver 1/2/3 single steps in t = -log sigma on the noise prediction eps = (x - D) / sigma."""

    def __init__(self, model, extra_args, callback):
        self.model = model
        self.extra_args = extra_args
        self.callback = callback

    @staticmethod
    def sigma(t):
        return t.neg().exp()

    @staticmethod
    def t(sigma):
        return -sigma.log()

    def eps(self, cache, key, x, t):
        if key not in cache:
            sigma = self.sigma(t)
            cache[key] = (x - self.model(x, sigma * ones(x), **self.extra_args)) / sigma
        return cache[key]

    def step1(self, x, t, t_next, cache):
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step2(self, x, t, t_next, cache, r1=0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def report(self, x, i, t, denoised):
        if self.callback is not None:
            s = self.sigma(t)
            self.callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": denoised})


def _sigma_range(sigmas):
    """ComfyUI's wrapper: integrate from sigmas[0] to the last non-zero sigma."""
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    return sigma_min.cpu(), sigmas[0].cpu()


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver-fast: len(sigmas) - 1 model calls spent on uniform steps in log sigma (orders 3, ..., 3, 2, 1).

    Only the first and last non-zero sigma of the schedule are used; the scheduler's spacing is ignored.
    """
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    sigma_min, sigma_max = _sigma_range(sigmas)
    nfe = len(sigmas) - 1
    solver = _DPMSolver(model, extra_args, callback)
    t_start, t_end = solver.t(sigma_max), solver.t(sigma_min)
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache = {}
        t, t_next = ts[i], ts[i + 1]
        eps = solver.eps(cache, "eps", x, t)
        solver.report(x, i, t, x - solver.sigma(t) * eps)
        step = {1: solver.step1, 2: solver.step2, 3: solver.step3}[order]
        x = step(x, t, t_next, cache)
    return x


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, rtol=0.05,
                        atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81):
    """DPM-Solver-23 with an embedded error estimate and a PID step-size controller (adaptive step count).

    Only the first and last non-zero sigma of the schedule are used; the number of model calls varies.
    """
    if order not in (2, 3):
        from ..errors import ParameterError

        raise ParameterError(f"dpm_adaptive order={order!r} is not allowed; valid values: 2, 3")
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    sigma_min, sigma_max = _sigma_range(sigmas)
    solver = _DPMSolver(model, extra_args, callback)
    t_start, t_end = solver.t(sigma_max), solver.t(sigma_min)
    atol, rtol = torch.tensor(atol), torch.tensor(rtol)
    # PID controller on the inverse error (k-diffusion's PIDStepSizeController)
    b1 = (pcoeff + icoeff + dcoeff) / order
    b2 = -(pcoeff + 2 * dcoeff) / order
    b3 = dcoeff / order
    h = abs(h_init)
    inv_errs = []
    s, x_prev, steps = t_start, x, 0
    while s < t_end - 1e-5:
        cache = {}
        t = torch.minimum(t_end, s + h)
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - solver.sigma(s) * eps
        if order == 2:
            x_low, x_high = solver.step1(x, s, t, cache), solver.step2(x, s, t, cache)
        else:
            x_low, x_high = solver.step2(x, s, t, cache, r1=1 / 3), solver.step3(x, s, t, cache)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        inv = 1 / (float(error) + 1e-8)
        if not inv_errs:
            inv_errs = [inv, inv, inv]
        inv_errs[0] = inv
        factor = inv_errs[0] ** b1 * inv_errs[1] ** b2 * inv_errs[2] ** b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= accept_safety
        if accept:
            inv_errs[2], inv_errs[1] = inv_errs[1], inv_errs[0]
        h *= factor
        if accept:
            x_prev, x, s = x_low, x_high, t
        solver.report(x, steps, s, denoised)
        steps += 1
    return x
