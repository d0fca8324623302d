"""Opt-in speed modes that trade a bounded, measured amount of fidelity for time.

``AuraFlowPipeline.generate(speed=...)`` takes a `SpeedOptions` or one of the names in `MODES`. The default
(``speed=None`` or ``SpeedOptions()``) is the exact path: nothing here runs. Each mode's speed-up and its PSNR
against the exact image on the medium preset are printed by ``python -m benchmarks.run``; the tests hold each
mode to the PSNR bound documented in `MODES`.

- ``compile``: ``torch.compile(transformer, dynamic=True)``, built once per pipeline and reused for every image
  size (no recompilation per size). The first call pays the build (minutes on a CPU); the outputs differ from
  the eager ones only by float rounding of fused kernels.
- ``cfg_cutoff``: after this fraction of the steps the unconditional pass is skipped. Rather than dropping the
  guidance (which changes the image a lot), the uncond velocity is estimated as ``v_cond - delta``, with ``delta``
  the guidance difference ``v_cond - v_uncond`` measured at the last step that ran both passes. Halves the batch
  for the late steps.
- ``cache_threshold``: TeaCache-style step skipping. Each call computes the first joint block's modulated input
  (a layer norm and an affine, no attention); when it changed by less than the threshold (relative L1) since the
  last fully computed call, the rest of the transformer is skipped and that call's residual (final hidden state
  minus embedded input) is added to the new embedded input instead. The first call always runs in full.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import torch

from .params import ParameterError

log = logging.getLogger(__name__)

__all__ = ["SpeedOptions", "MODES", "PSNR_BOUNDS", "resolve", "velocity_model", "psnr"]


@dataclass(frozen=True)
class SpeedOptions:
    """Which opt-in speed-ups to use; the defaults are the exact path."""

    compile: bool = False
    cfg_cutoff: float | None = None  # fraction of steps after which the uncond pass is estimated, in (0, 1]
    cache_threshold: float = 0.0  # relative L1 change of the first block's modulated input below which to skip

    def __post_init__(self):
        if self.cfg_cutoff is not None and not 0.0 < self.cfg_cutoff <= 1.0:
            raise ParameterError(f"cfg_cutoff={self.cfg_cutoff!r}: give a fraction of the steps in (0, 1], or None")
        if not 0.0 <= self.cache_threshold < 1.0:
            raise ParameterError(f"cache_threshold={self.cache_threshold!r}: give a value in [0, 1); 0 turns it off")

    @property
    def exact(self) -> bool:
        return not self.compile and self.cfg_cutoff is None and self.cache_threshold == 0.0


# Named modes (also the benchmark's rows). The settings were chosen on the medium preset (python -m benchmarks.run)
# for at least 1.5x at 30 dB or more there; PSNR_BOUNDS are what tests/test_speed.py holds them to on the tiny one.
MODES = {
    "exact": SpeedOptions(),
    "compile": SpeedOptions(compile=True),
    "cfg_cutoff": SpeedOptions(cfg_cutoff=0.35),
    "step_cache": SpeedOptions(cache_threshold=0.08),
}
PSNR_BOUNDS = {"exact": math.inf, "compile": 50.0, "cfg_cutoff": 30.0, "step_cache": 30.0}


def resolve(speed) -> SpeedOptions | None:
    """None, a mode name or a `SpeedOptions` -> `SpeedOptions`, or None for the exact path."""
    if speed is None:
        return None
    if isinstance(speed, str):
        if speed not in MODES:
            raise ParameterError(f"speed={speed!r} is not known; valid: {', '.join(MODES)}")
        speed = MODES[speed]
    if not isinstance(speed, SpeedOptions):
        raise ParameterError(f"speed must be a SpeedOptions or one of {', '.join(MODES)}, got {type(speed).__name__}")
    return None if speed.exact else speed


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images in [0, peak] (inf when they are equal)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


# ---------------------------------------------------------------- torch.compile, once per transformer
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled(transformer):
    """The transformer compiled with dynamic shapes (one build serves every image size), cached per module."""
    fn = _COMPILED.get(transformer)
    if fn is None:
        fn = torch.compile(transformer, dynamic=True)
        _COMPILED[transformer] = fn
    return fn


# ---------------------------------------------------------------- step cache (TeaCache style)
class StepCache:
    """A transformer-like callable that skips the blocks when the first block's modulated input barely moved.

    Mirrors diffusers' ``AuraFlowTransformer2DModel.forward`` (same modules, same order of operations) so a
    fully computed call equals the plain forward. One instance per generation (it holds that run's cache).
    """

    def __init__(self, transformer, threshold: float):
        self.tr = transformer
        self.threshold = threshold
        self.ref = None  # modulated input at the last full call
        self.residual = None  # final image hidden state minus embedded input, at the last full call
        self.skipped = 0
        self.calls = 0

    def _indicator(self, h, temb):
        if len(self.tr.joint_transformer_blocks):
            return self.tr.joint_transformer_blocks[0].norm1(h, emb=temb)[0]
        return self.tr.single_transformer_blocks[0].norm1(h, emb=temb)[0]

    def __call__(self, hidden_states, encoder_hidden_states, timestep, return_dict=False):
        tr = self.tr
        height, width = hidden_states.shape[-2:]
        h = tr.pos_embed(hidden_states)
        temb = tr.time_step_proj(tr.time_step_embed(timestep).to(dtype=next(tr.parameters()).dtype))
        self.calls += 1
        mod = self._indicator(h, temb)
        if self.ref is not None and self.ref.shape == mod.shape:
            change = ((mod - self.ref).abs().mean() / self.ref.abs().mean().clamp_min(1e-12)).item()
            if change < self.threshold:
                self.skipped += 1
                return (self._out(h + self.residual, temb, height, width),)
        ctx = tr.context_embedder(encoder_hidden_states)
        reg = tr.register_tokens.to(device=ctx.device, dtype=ctx.dtype)
        ctx = torch.cat([reg.repeat(ctx.size(0), 1, 1), ctx], dim=1)
        h0 = h
        for block in tr.joint_transformer_blocks:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
        if len(tr.single_transformer_blocks):
            n = ctx.size(1)
            hc = torch.cat([ctx, h], dim=1)
            for block in tr.single_transformer_blocks:
                hc = block(hidden_states=hc, temb=temb)
            h = hc[:, n:]
        self.ref, self.residual = mod, h - h0
        return (self._out(h, temb, height, width),)

    def _out(self, h, temb, height, width):
        tr = self.tr
        h = tr.proj_out(tr.norm_out(h, temb))
        p, c = tr.config.patch_size, tr.config.out_channels
        h = h.reshape(h.shape[0], height // p, width // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, height, width)


# ---------------------------------------------------------------- the velocity model for one generation
def velocity_model(pipe, speed: SpeedOptions, *, batch: int, cfg: float, sigmas: torch.Tensor):
    """``model(x, sigma, context)`` for `aura_flow.sample` implementing ``speed`` on ``pipe``'s transformer.

    batch: images per run (the CFG batch has 2*batch rows: cond then uncond, as `CFGDenoiser` builds it);
    sigmas: the run's schedule (the CFG cut-off is placed on it).
    """
    transformer = pipe.transformer
    if speed.cache_threshold > 0:
        transformer = StepCache(pipe.transformer, speed.cache_threshold)
    elif speed.compile:
        transformer = compiled(pipe.transformer)

    def model(x, sigma, context):
        return pipe.velocity(x, sigma, context, transformer=transformer)

    if speed.cfg_cutoff is None or math.isclose(cfg, 1.0):
        model.transformer = transformer
        return model
    steps = len(sigmas) - 1
    first_cut = min(steps, math.ceil(speed.cfg_cutoff * steps))
    cut_sigma = float(sigmas[first_cut]) if first_cut < steps else -1.0
    state = {"delta": None}

    def cut_model(x, sigma, context):
        if x.shape[0] != 2 * batch:  # not the batched CFG call (a sampler's own call pattern): run as is
            return model(x, sigma, context)
        if state["delta"] is None or float(sigma.max()) > cut_sigma + 1e-6:
            v = model(x, sigma, context)
            state["delta"] = v[:batch] - v[batch:]
            return v
        v_cond = model(x[:batch], sigma[:batch], context[:batch])
        return torch.cat([v_cond, v_cond - state["delta"]])

    cut_model.transformer = transformer
    return cut_model
