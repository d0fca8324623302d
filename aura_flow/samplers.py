"""Samplers in the k-diffusion calling convention: ``fn(model, x, sigmas, extra_args=None, callback=None,
disable=None, **options)``, where ``model(x, sigma_batch, **extra_args)`` returns the (guided) denoised x0.

They integrate dx/dsigma = (x - D)/sigma, which is valid unchanged for a flow model with CONST prediction.
"""
from __future__ import annotations

import torch


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """First-order Euler steps from sigma_i to sigma_{i+1}."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x
