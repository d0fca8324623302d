"""UniPC (Zhao et al. 2023), multistep, data prediction, B(h) = h (bh1) or e^h - 1 (bh2), as ComfyUI runs it.

ComfyUI runs UniPC in variance-preserving variables: the k-diffusion sigma is read as a VE sigma, so
alpha = 1/sqrt(1 + sigma^2), std = sigma/sqrt(1 + sigma^2), lambda = log(alpha/std), and the latent is divided by
sqrt(1 + sigma_0^2) on the way in. A final sigma of 0 is replaced by 0.001 and the result is divided by
alpha(0.001) and, as KSampler's sigmas end up holding that 0.001, by 1 - 0.001 too. The schedule functions are
evaluated in the latent's dtype exactly as there: in float32 near sigma = 0.001 their rounding moves lambda by
about 1e-2, so an algebraically simpler form would not give ComfyUI's numbers.
"""
from __future__ import annotations

import torch

FINAL_SIGMA = 0.001


class _VPSchedule:
    """ComfyUI's ``SigmaConvert``: VP marginals of a VE sigma, in its float32 arithmetic."""

    @staticmethod
    def log_alpha(sigma):
        return 0.5 * torch.log(1 / ((sigma * sigma) + 1))

    def alpha(self, sigma):
        return torch.exp(self.log_alpha(sigma))

    def std(self, sigma):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(sigma)))

    def lam(self, sigma):
        la = self.log_alpha(sigma)
        return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))


def _bshape(v, ndim):
    return v[(...,) + (None,) * (ndim - 1)]


class _UniPC:
    def __init__(self, model, extra_args, variant):
        if variant not in ("bh1", "bh2"):
            from ..errors import ParameterError

            raise ParameterError(f"uni_pc variant={variant!r} is not known; valid values: bh1, bh2")
        self.model = model
        self.extra_args = extra_args
        self.variant = variant
        self.ns = _VPSchedule()

    def x0(self, x_vp, sigma):
        """Data prediction from the VP state: through ComfyUI's eps round trip, then back to x0."""
        s = sigma.view(sigma.shape[:1] + (1,) * (x_vp.ndim - 1))
        x_ve = x_vp * ((s ** 2 + 1.0) ** 0.5)
        eps = (x_ve - self.model(x_ve, sigma, **self.extra_args)) / s
        nd = x_vp.ndim
        return (x_vp - _bshape(self.ns.std(sigma), nd) * eps) / _bshape(self.ns.alpha(sigma), nd)

    def update(self, x, model_prev, t_prev, t, order, use_corrector):
        """One multistep UniPC step (predictor UniP-p, then corrector UniC-p when ``use_corrector``)."""
        ns, nd = self.ns, x.ndim
        t0 = t_prev[-1]
        lam0, lam_t = ns.lam(t0), ns.lam(t)
        m0 = model_prev[-1]
        sigma_ratio = ns.std(t) / ns.std(t0)
        alpha_t = torch.exp(ns.log_alpha(t))
        h = lam_t - lam0
        rks, d1s = [], []
        for k in range(1, order):
            rk = ((ns.lam(t_prev[-(k + 1)]) - lam0) / h)[0]
            rks.append(rk)
            d1s.append((model_prev[-(k + 1)] - m0) / rk)
        rks.append(1.0)
        rks = torch.tensor(rks, dtype=x.dtype, device=x.device)
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        R, b, fact = [], [], 1
        for k in range(1, order + 1):
            R.append(torch.pow(rks, k - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R = torch.stack(R)
        b = torch.tensor(b, dtype=x.dtype, device=x.device)
        if d1s:
            d1s = torch.stack(d1s, dim=1)
            half = torch.tensor([0.5], dtype=x.dtype, device=x.device)
            rhos_p = half if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            d1s = None
        x_base = _bshape(sigma_ratio, nd) * x - _bshape(alpha_t * h_phi_1, nd) * m0
        pred = torch.tensordot(d1s, rhos_p, dims=([1], [0])) if d1s is not None else 0
        x_t = x_base - _bshape(alpha_t * b_h, nd) * pred
        if not use_corrector:
            return x_t, None
        rhos_c = torch.tensor([0.5], dtype=x.dtype, device=x.device) if order == 1 else torch.linalg.solve(R, b)
        model_t = self.x0(x_t, t)
        corr = torch.tensordot(d1s, rhos_c[:-1], dims=([1], [0])) if d1s is not None else 0
        x_t = x_base - _bshape(alpha_t * b_h, nd) * (corr + rhos_c[-1] * (model_t - m0))
        return x_t, model_t


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, variant="bh1"):
    """UniPC-3 multistep with lower orders at the start and the end (ComfyUI's ``uni_pc``)."""
    extra_args = extra_args or {}
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = FINAL_SIGMA
    ns = _VPSchedule()
    x = x / torch.sqrt(1.0 + ts[0] ** 2.0)
    solver = _UniPC(model, extra_args, variant)
    steps = len(ts) - 1
    order = min(3, len(ts) - 2)
    n = x.shape[0]
    model_prev, t_prev = [], []
    for step_index in range(steps):
        if step_index == 0:
            vec_t = ts[0].expand(n)
            model_prev, t_prev = [solver.x0(x, vec_t)], [vec_t]
        elif step_index < order:
            vec_t = ts[step_index].expand(n)
            x, m = solver.update(x, model_prev, t_prev, vec_t, step_index, use_corrector=True)
            model_prev.append(m)
            t_prev.append(vec_t)
        else:
            last = step_index + (2 if step_index == steps - 1 else 1)
            for step in range(step_index, last):
                vec_t = ts[step].expand(n)
                step_order = min(order, steps + 1 - step)
                x, m = solver.update(x, model_prev, t_prev, vec_t, step_order, use_corrector=step != steps)
                # slide the `order`-long history; after the final update there is nothing new to evaluate
                t_prev = t_prev[1:] + [vec_t]
                model_prev = model_prev[1:] + [model_prev[-1] if step == steps else m]
        if callback is not None:
            callback({"x": x, "i": step_index, "sigma": ts[step_index], "sigma_hat": ts[step_index],
                      "denoised": model_prev[-1]})
    x = x / ns.alpha(ts[-1])
    if sigmas[-1] == 0:
        # ComfyUI writes the 0.001 into KSampler's own sigmas tensor (a view), so its inverse noise scaling
        # x / (1 - sigma_last) then divides by 1 - 0.001 instead of 1; this reproduces its images.
        x = x / (1.0 - FINAL_SIGMA)
    return x


@torch.no_grad()
def sample_unipc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """UniPC with B(h) = e^h - 1 (ComfyUI's ``uni_pc_bh2``)."""
    return sample_unipc(model, x, sigmas, extra_args, callback, disable, variant="bh2")

