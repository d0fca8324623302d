"""`sample()`: ComfyUI's KSampler semantics for a flow-matching velocity model.

Contract (shared with the fixtures in shared/fixtures/):
- ``latent`` and the result are LATENTs in raw VAE space (a tensor (B, 4, h, w) or a ComfyUI ``{"samples": ...}``
  dict); they are scaled by 0.13025 on the way in and unscaled on the way out.
- ``model(x, sigma, context)`` returns the flow velocity for model-space ``x`` (N, 4, h, w), per-row ``sigma``
  (N,) and ``context`` (N, tokens, 2048) with one row per row of ``x``.
- ``positive`` / ``negative`` are (1, tokens, 2048) contexts (or (B, tokens, 2048), one per latent row).
- Start noise is ``torch.randn(latent.shape, generator=torch.manual_seed(seed))`` on the CPU for the whole batch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import Interrupted, NumericError, ParameterError
from ..params import MAX_LATENT_BATCH, check_area
from ..plan import plan_sampling
from .schedules import LATENT_SCALE, ModelSampling

__all__ = ["sample", "prepare_noise", "check_latent", "Interrupted", "CFGDenoiser"]


def prepare_noise(shape, seed: int) -> torch.Tensor:
    """ComfyUI's start noise: one CPU generator for the whole batch, so a seed gives the same image anywhere."""
    return torch.randn(tuple(shape), generator=torch.manual_seed(seed), dtype=torch.float32, device="cpu")


def check_latent(samples, name: str = "latent") -> None:
    """A LATENT's samples: a (batch, 4, h, w) tensor with every size at least 1 and finite values."""
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ParameterError(f"{name} must be a (batch, 4, height/8, width/8) SDXL latent, got {shape}; was it made "
                             "for another model?")
    if samples.numel() == 0:
        raise ParameterError(f"{name} has shape {tuple(samples.shape)}: an empty latent (a size of 0); give at least "
                             "one image of at least 8x8 pixels")
    if not torch.isfinite(samples).all():
        raise NumericError(f"{name} holds NaN or infinite values; it cannot be sampled or decoded. It came from a run "
                           "whose numbers overflowed, or from a damaged file: make it again")


def _rows(context: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if context.ndim != 3:
        raise ParameterError(f"{name} must be a (1, tokens, width) context tensor, got shape {tuple(context.shape)}")
    if context.shape[0] == n:
        return context
    if context.shape[0] == 1:
        return context.expand(n, -1, -1)
    raise ParameterError(f"{name} has {context.shape[0]} rows for a batch of {n}; give 1 row or one per image")


class CFGDenoiser:
    """Turns a velocity model into the guided x0 predictor that k-diffusion style samplers call.

    Cond and uncond run as one batched forward when their token counts match. ``last_uncond`` holds the
    unconditional x0 of the latest call (CFG++ samplers read it). With cfg == 1 the uncond pass is skipped unless
    a sampler needs it.
    """

    def __init__(self, model, positive, negative, cfg: float, *, need_uncond: bool = False,
                 should_stop: Callable[[], bool] | None = None, model_sampling=None):
        self.model = model
        self.model_sampling = model_sampling  # the shift's ModelSampling; a few log-SNR samplers read it
        self.positive = positive
        self.negative = negative
        self.cfg = float(cfg)
        self.use_uncond = need_uncond or not math.isclose(self.cfg, 1.0)
        self.should_stop = should_stop
        self.last_uncond = None
        self.calls = 0

    def _velocity(self, x, sigma, context):
        self.calls += x.shape[0]
        return self.model(x, sigma, context)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_extra) -> torch.Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("sampling was cancelled")
        n = x.shape[0]
        sigma = sigma.to(x.dtype).reshape(-1).expand(n) if sigma.numel() == 1 else sigma.to(x.dtype)
        pos = _rows(self.positive, n, "positive").to(device=x.device)
        sig4 = sigma.view(n, 1, 1, 1)
        if not self.use_uncond:
            self.last_uncond = None
            return x - self._velocity(x, sigma, pos).to(x.dtype) * sig4
        neg = _rows(self.negative, n, "negative").to(device=x.device)
        if pos.shape[1:] == neg.shape[1:]:
            v = self._velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([pos, neg])).to(x.dtype)
            v_cond, v_uncond = v[:n], v[n:]
        else:
            v_cond = self._velocity(x, sigma, pos).to(x.dtype)
            v_uncond = self._velocity(x, sigma, neg).to(x.dtype)
        cond = x - v_cond * sig4
        uncond = x - v_uncond * sig4
        self.last_uncond = uncond
        return uncond + (cond - uncond) * self.cfg


def sample(model, positive, negative, latent, plan=None, *, callback: Callable | None = None,
           should_stop: Callable[[], bool] | None = None, noise: torch.Tensor | None = None, **settings):
    """Sample a LATENT the way ComfyUI's KSampler does for AuraFlow; returns a LATENT of the same kind as given.

    ``plan``: an `aura_flow.plan.SamplingPlan` (checked settings and their schedule), or instead the settings
    themselves as keywords (seed, steps, cfg, sampler, scheduler, shift, denoise=1.0, sigmas=None), checked here.
    ``callback(step, total, x0)`` is called after each sampler step with the current x0 estimate (model space);
    ``should_stop()`` is polled before every model call and raises `Interrupted` when it returns true.
    ``noise`` overrides the seeded start noise (same shape as the latent).
    """
    if plan is None:
        plan = plan_sampling(**settings)
    elif settings:
        raise TypeError(f"sample() takes a plan or the settings, not both (got {', '.join(sorted(settings))})")
    as_dict = isinstance(latent, dict)
    samples = latent.get("samples") if as_dict else latent
    check_latent(samples, "latent")
    if samples.shape[0] > MAX_LATENT_BATCH:
        raise ParameterError(f"latent has a batch of {samples.shape[0]}; at most {MAX_LATENT_BATCH} images in one "
                             "sampling: split the batch")
    check_area(samples.shape[3] * 8, samples.shape[2] * 8, samples.shape[0],
               names=("latent width", "height", "batch size"))
    seed, info, ms = plan.seed, plan.sampler_info, ModelSampling(plan.shift)
    device = samples.device
    if len(plan.sigmas) == 0:  # denoise 0: nothing to do
        return dict(latent) if as_dict else samples.clone()

    if noise is None:
        noise = prepare_noise(samples.shape, seed)
    elif tuple(noise.shape) != tuple(samples.shape):
        raise ParameterError(f"noise has shape {tuple(noise.shape)}, the latent {tuple(samples.shape)}")
    work_dtype = torch.float32
    noise = noise.to(device=device, dtype=work_dtype)
    latent_in = samples.to(device=device, dtype=work_dtype)
    if torch.count_nonzero(latent_in) > 0:
        latent_in = latent_in * LATENT_SCALE
    sig = plan.sigmas_tensor().to(device=device, dtype=work_dtype)

    denoiser = CFGDenoiser(model, positive, negative, plan.cfg, need_uncond=info.needs_uncond, should_stop=should_stop,
                            model_sampling=ms)
    total = len(sig) - 1

    def k_callback(d):
        if callback is not None:
            # adaptive samplers count their own internal steps; keep progress within the schedule
            callback(min(d["i"] + 1, total), total, d["denoised"])

    x = ModelSampling.noise_scaling(sig[0], noise, latent_in)
    fn = info.function()
    out = fn(denoiser, x, sig, extra_args={"seed": seed}, callback=k_callback, disable=True, **info.options)
    if should_stop is not None and should_stop():
        raise Interrupted("sampling was cancelled")
    out = ModelSampling.inverse_noise_scaling(sig[-1], out) / LATENT_SCALE
    out = out.to(torch.float32)
    if not torch.isfinite(out).all():  # it would decode to a black or noise image with no word of why
        bad = int((~torch.isfinite(out)).sum())
        raise NumericError(f"the sampled latent holds NaN or infinite values ({bad:,} of {out.numel():,}): the model's "
                           f"numbers overflowed with sampler={plan.sampler!r} at cfg={plan.cfg:g}. Lower cfg, compute "
                           "in fp32 (dtype='fp32'), or try another sampler")
    if as_dict:
        result = dict(latent)
        result["samples"] = out
        result.pop("noise_mask", None)
        return result
    return out
