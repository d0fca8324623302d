"""`sample()`: ComfyUI's KSampler semantics for a flow-matching velocity model.

Contract (shared with the fixtures in shared/fixtures/):
- ``latent`` and the result are LATENTs in raw VAE space (a tensor (B, 4, h, w) or a ComfyUI ``{"samples": ...}``
  dict); they are scaled by 0.13025 on the way in and unscaled on the way out.
- ``model(x, sigma, context)`` returns the flow velocity for model-space ``x`` (N, 4, h, w), per-row ``sigma``
  (N,) and ``context`` (N, tokens, 2048) with one row per row of ``x``.
- ``positive`` / ``negative`` are (1, tokens, 2048) contexts (or (B, tokens, 2048), one per latent row).
- Start noise is ``torch.randn(latent.shape, generator=torch.manual_seed(seed))`` on the CPU for the whole batch
  (ComfyUI's), or with the plan's ``noise_device="gpu"`` drawn by a generator of the device the sampling runs on
  (``torch.Generator(device).manual_seed(seed)``, as diffusers and Pony V7's noise node do on CUDA).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import Interrupted, NumericError, ParameterError
from ..params import LOCAL_MAX_SIZE, MAX_LATENT_BATCH, check_area
from ..plan import plan_sampling
from .conds import CondDenoiser, has_options, resolve_conds
from .guidance import CFGDenoiser
from .schedules import LATENT_SCALE, ModelSampling

__all__ = ["sample", "prepare_noise", "prepare_mask", "noise_generator_device", "check_latent", "Interrupted",
           "CFGDenoiser", "InpaintDenoiser"]

log = logging.getLogger(__name__)


def noise_generator_device(noise_device: str, device) -> torch.device:
    """Where the start noise is drawn: the CPU for "cpu"; for "gpu" the device the sampling runs on, or the CPU
    (with a log line) when that is the CPU itself, where both settings give the same noise."""
    device = torch.device(device)
    if noise_device != "gpu":
        return torch.device("cpu")
    if device.type == "cpu":
        log.info("noise_device='gpu': the model runs on the CPU, so the start noise is drawn there (the same as "
                 "noise_device='cpu'); images will differ from those drawn on a GPU")
    return device


def prepare_noise(shape, seed: int, device="cpu") -> torch.Tensor:
    """The start noise, float32, on ``device``: on the CPU ComfyUI's (one CPU generator for the whole batch, so a
    seed gives the same image anywhere); on another device that device's generator, as diffusers draws it there."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.randn(tuple(shape), generator=torch.manual_seed(seed), dtype=torch.float32, device="cpu")
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=device)
def check_latent(samples, name: str = "latent") -> None:
    """A LATENT's samples: a (batch, 4, h, w) tensor with every size at least 1 and finite values."""
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ParameterError(f"{name} must be a (batch, 4, height/8, width/8) SDXL latent, got {shape}; was it made "
                             "for another model?")
    if samples.numel() == 0:
        raise ParameterError(f"{name} has shape {tuple(samples.shape)}: an empty latent (a size of 0); give at least "
                             "one image of at least 8x8 pixels")
    if max(samples.shape[-2:]) * 8 > LOCAL_MAX_SIZE:  # before any pass over it (a view can claim any size)
        raise ParameterError(f"{name} has shape {tuple(samples.shape)}: {samples.shape[-1] * 8}x"
                             f"{samples.shape[-2] * 8} pixels; at most {LOCAL_MAX_SIZE} a side (ComfyUI's largest)")
    if not torch.isfinite(samples).all():
        raise NumericError(f"{name} holds NaN or infinite values; it cannot be sampled or decoded. It came from a run "
                           "whose numbers overflowed, or from a damaged file: make it again")


def prepare_mask(mask: torch.Tensor, shape, device) -> torch.Tensor:
    """ComfyUI's prepare_mask for a 2-D latent: a noise mask of any size ((H, W), (B, H, W) or (B, 1, H, W)) resized
    bilinearly to the latent's height x width, repeated over its channels and to its batch, as float32."""
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2 or mask.numel() == 0:
        raise ParameterError(f"noise_mask must be a (batch, 1, height, width) tensor, got "
                             f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
    b, c, h, w = shape
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    if not mask.is_floating_point():
        mask = mask.float()
    mask = F.interpolate(mask, size=(h, w), mode="bilinear")
    if mask.shape[1] < c:
        mask = mask.repeat(1, c, 1, 1)[:, :c]
    if mask.shape[0] > b:
        mask = mask[:b]
    elif mask.shape[0] < b:
        mask = mask.repeat(math.ceil(b / mask.shape[0]), 1, 1, 1)[:b]
    return mask.to(device).float()


class InpaintDenoiser:
    """ComfyUI's KSamplerX0Inpaint around a denoiser: where the mask is 0 the model sees the input latent noised to
    the current sigma, and its prediction there is replaced by the input latent (1 = regenerate, 0 = keep). The
    wrapped denoiser's attributes (``last_uncond``, ``model_sampling``...) are read through."""

    def __init__(self, inner, mask: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor):
        self.inner, self.mask, self.noise, self.latent = inner, mask, noise, latent

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __call__(self, x, sigma, **extra):
        keep = 1.0 - self.mask
        s = sigma.reshape([sigma.shape[0]] + [1] * (self.noise.ndim - 1)) if sigma.ndim else sigma
        x = x * self.mask + ModelSampling.noise_scaling(s, self.noise, self.latent) * keep
        out = self.inner(x, sigma, **extra)
        return out * self.mask + self.latent * keep


def _single(value):
    """The context of a single plain entry (a tensor, or a one-item list of one)."""
    item = value[0] if isinstance(value, (list, tuple)) else value
    return getattr(item, "context", item)


def sample(model, positive, negative, latent, plan=None, *, callback: Callable | None = None,
           should_stop: Callable[[], bool] | None = None, noise: torch.Tensor | None = None, mask=None, **settings):
    """Sample a LATENT the way ComfyUI's KSampler does for AuraFlow; returns a LATENT of the same kind as given.

    ``plan``: an `aura_flow.plan.SamplingPlan` (checked settings and their schedule), or instead the settings
    themselves as keywords (seed, steps, cfg, sampler, scheduler, shift, denoise=1.0, sigmas=None), checked here.
    ``positive`` / ``negative``: a context tensor, or a list of `aura_flow.sampling.conds.Cond` (ComfyUI's
    conditioning options: several prompts, areas, masks, strengths, timestep ranges).
    ``callback(step, total, x0)`` is called after each sampler step with the current x0 estimate (model space);
    ``should_stop()`` is polled before every model call and raises `Interrupted` when it returns true.
    ``noise`` overrides the seeded start noise (same shape as the latent).
    ``mask``: a noise mask (inpainting; 1 = regenerate, 0 = keep), by default a LATENT dict's ``noise_mask``;
    applied as ComfyUI's KSampler applies it (`prepare_mask`, `InpaintDenoiser`).
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
    if mask is None and as_dict:
        mask = latent.get("noise_mask")
    seed, info, ms = plan.seed, plan.sampler_info, ModelSampling(plan.shift)
    device = samples.device
    if len(plan.sigmas) == 0:  # denoise 0: nothing to do
        return dict(latent) if as_dict else samples.clone()

    if noise is None:
        noise = prepare_noise(samples.shape, seed, noise_generator_device(getattr(plan, "noise_device", "cpu"),
                                                                          device))
    elif tuple(noise.shape) != tuple(samples.shape):
        raise ParameterError(f"noise has shape {tuple(noise.shape)}, the latent {tuple(samples.shape)}")
    mask = None if mask is None else prepare_mask(mask, samples.shape, device)
    work_dtype = torch.float32
    noise = noise.to(device=device, dtype=work_dtype)
    latent_in = samples.to(device=device, dtype=work_dtype)
    if torch.count_nonzero(latent_in) > 0:
        latent_in = latent_in * LATENT_SCALE
    sig = plan.sigmas_tensor().to(device=device, dtype=work_dtype)

    kw = dict(need_uncond=info.needs_uncond, should_stop=should_stop, model_sampling=ms)
    if has_options(positive, negative):
        pos, neg = resolve_conds(positive, negative, samples.shape, ms, device)
        denoiser = CondDenoiser(model, pos, neg, plan.cfg, **kw)
    else:
        denoiser = CFGDenoiser(model, _single(positive), _single(negative), plan.cfg, **kw)
    if mask is not None:
        inpaint_noise = noise if not info.random_inpaint_noise else \
            prepare_noise(samples.shape, (seed + 1) % 2**64).to(device=device, dtype=work_dtype)
        denoiser = InpaintDenoiser(denoiser, mask, inpaint_noise, latent_in)
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
    if as_dict:  # as ComfyUI's KSampler: a copy of the LATENT (noise_mask kept) with the new samples
        result = dict(latent)
        result["samples"] = out
        return result
    return out
