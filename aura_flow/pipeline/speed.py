"""Opt-in speed modes that trade a bounded, measured amount of fidelity for time.

``AuraFlowPipeline.generate(speed=...)`` takes a `SpeedOptions` or one of the names in `MODES`; ``speed=None``,
"exact" or ``SpeedOptions()`` is the exact path (nothing here runs), and the default "auto" is the lossless
padding fold on the CPU (see `resolve`; named modes add to it there). Each mode's speed-up and its PSNR
against the exact image are printed by ``python -m benchmarks.run --modes ...``; the tests hold each mode to the
PSNR bound documented in `MODES`. What every path shares, exact one included, lives with the layers: the
transformer's and text encoder's float32 CPU GEMMs through oneDNN (aura_flow/weights/linear.py) and the VAE
channels-last on the CPU (aura_flow/pipeline/vae_layout.py).

- ``fold_padding``: lossless. A short prompt is mostly padding: identical zero vectors that carry no position
  and so keep identical hidden states through every block. They are folded into one text token whose attention
  logit gets ``log(count)``, which is the same attention up to float rounding (about 1e-6 on the image) with
  far fewer tokens: most of the text tokens at small sizes, about 6% of all tokens at 1024x1024.
- ``compile``: ``torch.compile(..., dynamic=True)`` of the transformer's blocks, without duck sizing, built once
  per transformer and reused for every image size, aspect ratio and prompt length (no recompilation per size).
  The first call pays the build (on 2 CPU cores: about 30 s for the tiny preset, a few minutes for the medium
  one); the outputs differ from the eager ones only by the float rounding of fused kernels. Stacks with the
  others.
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

import functools
import logging
import math

import torch

from .modes import MODES, PSNR_BOUNDS, SpeedOptions, resolve  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

__all__ = ["SpeedOptions", "MODES", "PSNR_BOUNDS", "resolve", "velocity_model", "psnr"]


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images in [0, peak] (inf when they are equal)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


# ---------------------------------------------------------------- torch.compile, once per transformer
def compiled_body(transformer):
    """`_body` for ``transformer`` compiled with dynamic shapes, built once per transformer and reused for every
    image size, aspect ratio and prompt length (no rebuild per size). Kept on the transformer itself, so it goes
    when the model goes (a module-level cache would keep every model ever compiled alive)."""
    fn = transformer.__dict__.get("_aura_flow_compiled")
    if fn is None:
        from torch.fx.experimental import _config as fx_config

        opt = torch.compile(functools.partial(_body, transformer), dynamic=True)

        def fn(*args):
            # no duck sizing: after a square first image it would tie height to width and rebuild for each aspect
            with fx_config.patch(use_duck_shape=False):
                return opt(*args)

        transformer.__dict__["_aura_flow_compiled"] = fn
    return fn


# ---------------------------------------------------------------- padding fold + step cache
class _BiasAttnProcessor:
    """diffusers' AuraFlowAttnProcessor2_0 with an optional additive bias on the keys (for the folded padding).
    Without a bias it calls the original processor, so the plain path is unchanged."""

    def __init__(self, plain):
        self.plain = plain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_bias=None, **kwargs):
        if attention_bias is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, **kwargs)
        import torch.nn.functional as F

        b = hidden_states.shape[0]
        heads, width = attn.heads, attn.to_q.out_features

        def split(t, norm=None):
            t = t.view(b, -1, heads, width // heads)
            return norm(t) if norm is not None else t

        q, k, v = split(attn.to_q(hidden_states), attn.norm_q), split(attn.to_k(hidden_states), attn.norm_k), \
            split(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            q = torch.cat([split(attn.add_q_proj(e), attn.norm_added_q), q], dim=1)
            k = torch.cat([split(attn.add_k_proj(e), attn.norm_added_k), k], dim=1)
            v = torch.cat([split(attn.add_v_proj(e)), v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attention_bias.to(q.dtype), scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, -1, width).to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        n = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, n:])), attn.to_add_out(out[:, :n])


def _install_bias_processors(transformer) -> bool:
    from diffusers.models.attention_processor import Attention, AuraFlowAttnProcessor2_0

    attns = [m for m in transformer.modules() if isinstance(m, Attention)]
    if not all(isinstance(a.processor, (AuraFlowAttnProcessor2_0, _BiasAttnProcessor)) for a in attns):
        log.warning("custom attention processors on the transformer: the padding fold is off")
        return False
    for a in attns:
        if isinstance(a.processor, AuraFlowAttnProcessor2_0):
            a.set_processor(_BiasAttnProcessor(a.processor))
    return True


def fold_padding(context: torch.Tensor):
    """(N, T, D) context -> (the context with its identical trailing positions folded into one, their count).

    The text tokens carry no position embedding and the padded ones are all zero, so they keep identical hidden
    states through every block; k identical keys weigh in attention like one key with log(k) added to its
    logit. Folding them is exact up to float rounding and drops most of the text tokens of a short prompt.
    """
    same = (context == context[:, -1:]).all(dim=-1).all(dim=0)  # (T,): equal to the last position in every row
    differs = torch.nonzero(~same)
    first = int(differs[-1]) + 1 if len(differs) else 0  # start of the trailing run of identical positions
    count = context.shape[1] - first
    if count < 2:
        return context, 1
    return context[:, :first + 1], count


def _body(tr, h, context, temb, bias):
    """The transformer between its embedded input and its final norm: context embedding, register tokens and
    every block, as in diffusers' ``AuraFlowTransformer2DModel.forward``. -> the final image hidden state.
    bias: None, or (1, 1, 1, text + image) additive attention logits for the folded padding."""
    ctx = tr.context_embedder(context)
    reg = tr.register_tokens.to(device=ctx.device, dtype=ctx.dtype)
    ctx = torch.cat([reg.repeat(ctx.size(0), 1, 1), ctx], dim=1)
    kwargs = None if bias is None else {"attention_bias": bias}
    for block in tr.joint_transformer_blocks:
        ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb, attention_kwargs=kwargs)
    if len(tr.single_transformer_blocks):
        n = ctx.size(1)
        hc = torch.cat([ctx, h], dim=1)
        for block in tr.single_transformer_blocks:
            hc = block(hidden_states=hc, temb=temb, attention_kwargs=kwargs)
        h = hc[:, n:]
    return h


class FastTransformer:
    """A stand-in for the transformer (same call) with the padding fold, the TeaCache-style step cache and/or
    torch.compile of its blocks.

    Mirrors diffusers' ``AuraFlowTransformer2DModel.forward`` (same modules, same order of operations), so with
    all off it equals the plain forward. One instance per generation (it holds that run's cache).
    """

    def __init__(self, transformer, *, fold: bool = False, cache_threshold: float = 0.0, compile: bool = False):
        self.tr = transformer
        self.fold = fold and _install_bias_processors(transformer)
        self.threshold = cache_threshold
        self.body = compiled_body(transformer) if compile else functools.partial(_body, transformer)
        self.ref = None  # modulated input at the last full call
        self.residual = None  # final image hidden state minus embedded input, at the last full call
        self.skipped = 0
        self.calls = 0

    def _indicator(self, h, temb):
        blocks = self.tr.joint_transformer_blocks or self.tr.single_transformer_blocks
        return blocks[0].norm1(h, emb=temb)[0]

    def __call__(self, hidden_states, encoder_hidden_states, timestep, return_dict=False):
        tr = self.tr
        height, width = hidden_states.shape[-2:]
        h = tr.pos_embed(hidden_states)
        temb = tr.time_step_proj(tr.time_step_embed(timestep).to(dtype=next(tr.parameters()).dtype))
        self.calls += 1
        if self.threshold > 0:
            mod = self._indicator(h, temb)
            if self.ref is not None and self.ref.shape == mod.shape:
                change = ((mod - self.ref).abs().mean() / self.ref.abs().mean().clamp_min(1e-12)).item()
                if change < self.threshold:
                    self.skipped += 1
                    return (self._out(h + self.residual, temb, height, width),)
        context, count = fold_padding(encoder_hidden_states) if self.fold else (encoder_hidden_states, 1)
        bias = None
        if count > 1:  # the folded token is the last text position; keys run [registers, text, image] everywhere
            keys = tr.register_tokens.shape[1] + context.shape[1] + h.shape[1]
            bias = torch.zeros(1, 1, 1, keys, device=h.device, dtype=torch.float32)
            bias[..., keys - h.shape[1] - 1] = math.log(count)
        out = self.body(h, context, temb, bias)
        if self.threshold > 0:
            self.ref, self.residual = mod, out - h
        return (self._out(out, temb, height, width),)

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
    transformer = FastTransformer(pipe.transformer, fold=speed.fold_padding, cache_threshold=speed.cache_threshold,
                                  compile=speed.compile)

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
