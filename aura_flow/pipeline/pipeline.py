"""`AuraFlowPipeline`: prompt encoding, the velocity model, sampling and VAE decode, with ComfyUI's semantics."""
from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..plan import GenerationPlan, plan_generation, plan_sampling
from ..sampling.loop import sample as _sample
from .modes import resolve as resolve_speed
from .speed import velocity_model
from .vae_layout import conv_layout, install_group_norm
from ..errors import ParameterError
from ..prompts import encode_prompt
from ..weights.components import Components, load_components
from ..weights.devices import module_bytes, offload_text_encoder_auto

log = logging.getLogger(__name__)


def _pos_embed_forward(self, latent):
    """AuraFlow patch embedding with ComfyUI's position grid: crop the centre of the learned square grid, and
    interpolate the grid bilinearly when the image has more patches a side than the grid (diffusers crashes)."""
    b, c, h, w = latent.shape
    p = self.patch_size
    hp, wp = h // p, w // p
    x = latent.view(b, c, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).flatten(-3).flatten(1, 2)
    x = self.proj(x)
    side = int(self.pos_embed_max_size ** 0.5)
    grid = self.pos_embed.reshape(1, side, side, -1)
    cur = side
    if max(hp, wp) > side:
        cur = max(hp, wp)
        grid = F.interpolate(grid.movedim(-1, 1).float(), (cur, cur), mode="bilinear").movedim(1, -1)
    top, left = (cur - hp) // 2, (cur - wp) // 2
    pe = grid[:, top:top + hp, left:left + wp].reshape(1, hp * wp, -1)
    return x + pe.to(x.dtype)


@dataclass
class GenerationResult:
    images: list  # PIL images
    tensor: torch.Tensor  # (B, H, W, 3) float32 in [0, 1] (ComfyUI IMAGE)
    seed: int  # the seed used for the whole batch (ComfyUI semantics: one noise tensor for all images)
    params: dict = field(default_factory=dict)  # the checked parameters, as the hosted API names them
    plan: GenerationPlan | None = None  # everything the run used (its schedule and speed mode too)


class AuraFlowPipeline:
    """Loaded AuraFlow: ``generate()`` for the whole job, or the parts (``encode_prompt``, ``velocity``,
    ``sample``, ``decode``, ``encode``) for the ComfyUI nodes."""

    def __init__(self, transformer, text_encoder, tokenizer, vae, *, device, compute_dtype, sources=None,
                 prompt_cache_size: int = 8, offload_text_encoder: bool = False):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.device = torch.device(device)
        self.dtype = compute_dtype
        self.sources = sources or {}
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._prompt_cache_size = prompt_cache_size
        # when memory is short: the text encoder waits on the CPU and visits the device only to encode a prompt
        # (on a CPU device there is nothing to release)
        self.offload_text_encoder = offload_text_encoder
        self.placement: dict[str, torch.device] = {}  # where each part is; the transformer's is self.device
        pe = transformer.pos_embed
        pe.forward = types.MethodType(_pos_embed_forward, pe)
        if vae is not None:  # its input runs channels-last on the CPU (conv_layout): keep the group norm accurate
            install_group_norm(vae)
        self.to(self.device)

    @classmethod
    def from_components(cls, c: Components, *, offload_text_encoder="auto") -> "AuraFlowPipeline":
        """The pipeline over what `load_components` read, moved to its device. offload_text_encoder: see `load`."""
        if offload_text_encoder == "auto":
            offload_text_encoder = offload_text_encoder_auto(
                c.device, {name: module_bytes(getattr(c, name)) for name in cls.PARTS})
        return cls(c.transformer, c.text_encoder, c.tokenizer, c.vae, device=c.device, compute_dtype=c.compute_dtype,
                   sources=c.sources, offload_text_encoder=offload_text_encoder)

    # -------------------------------------------------------------- devices
    PARTS = ("transformer", "text_encoder", "vae")

    def to(self, device, parts=None):
        """Move the pipeline (or only ``parts``, e.g. ``("transformer",)``) to ``device``.

        Moving parts one by one lets a host such as ComfyUI keep on the GPU only what a step needs: the
        transformer while sampling, the text encoder while encoding, the VAE while decoding.
        """
        device = torch.device(device)
        for name in parts or self.PARTS:
            module = getattr(self, name)
            if module is None:
                continue
            # offload_text_encoder: a whole-pipeline move leaves the text encoder on the CPU
            target = torch.device("cpu") if parts is None and name == "text_encoder" and \
                self.offload_text_encoder else device
            module.to(target)
            self.placement[name] = target
        if parts is None or "transformer" in parts:
            self.device = device
        return self

    def part_device(self, name: str) -> torch.device:
        return self.placement.get(name, self.device)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def context_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    # -------------------------------------------------------------- parts
    def encode_prompt(self, text: str) -> torch.Tensor:
        """(1, tokens >= 256, context_dim) in the compute dtype; the last few prompts are cached."""
        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError("this pipeline was loaded without a text encoder; encode prompts elsewhere")
        hit = self._prompt_cache.get(text)
        if hit is not None:
            return hit
        offload = self.offload_text_encoder and self.device.type != "cpu"
        device = self.device if offload else self.part_device("text_encoder")
        if offload:
            self.text_encoder.to(device)
        try:
            ctx = encode_prompt(self.text_encoder, self.tokenizer, text, device, self.dtype)
        finally:
            if offload:  # released before sampling
                self.text_encoder.to(self.part_device("text_encoder"))
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if len(self._prompt_cache) >= self._prompt_cache_size:
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        self._prompt_cache[text] = ctx
        return ctx

    @torch.inference_mode()
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, *,
                 transformer=None) -> torch.Tensor:
        """Flow velocity for model-space latents x (N,4,h,w) at per-row sigma (N,) given context (N,T,D).

        Sizes that are not a multiple of the patch size are padded circularly and cropped back (as ComfyUI).
        transformer: a stand-in with the transformer's call signature (aura_flow.pipeline.speed's compiled or cached one).
        """
        h, w = x.shape[-2:]
        p = self.patch_size
        ph, pw = (-h) % p, (-w) % p
        xin = F.pad(x, (0, pw, 0, ph), mode="circular") if (ph or pw) else x
        out = (self.transformer if transformer is None else transformer)(hidden_states=xin.to(self.device, self.dtype),
                               encoder_hidden_states=context.to(self.device, self.dtype),
                               timestep=sigma.to(self.device, torch.float32), return_dict=False)[0]
        return out[..., :h, :w].to(x.dtype)

    def sample(self, positive, negative, latent, plan=None, *, speed=None, callback=None, should_stop=None,
               noise=None, **settings):
        """`aura_flow.sample` with this pipeline's transformer as the model.

        plan: an `aura_flow.plan.SamplingPlan`, or the settings as keywords (as `aura_flow.sample` takes them) with
        speed as `generate`'s but None (the exact path) by default. The speed mode is resolved here, for the device
        the transformer is on now, and its modes see the run's own schedule."""
        if plan is None:
            plan = plan_sampling(speed=speed, **settings)
        elif settings or speed is not None:
            raise TypeError("sample() takes a plan or the settings, not both")
        options = resolve_speed(plan.speed, self.device)
        model = self.velocity
        if options is not None:
            samples = latent["samples"] if isinstance(latent, dict) else latent
            model = velocity_model(self, options, batch=samples.shape[0], cfg=plan.cfg, sigmas=plan.sigmas_tensor())
        return _sample(model, positive, negative, latent, plan, callback=callback, should_stop=should_stop,
                       noise=noise)

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE-space latent (B,4,h,w) -> images (B,H,W,3) float32 in [0,1]. Always fp32 (fp16 overflows)."""
        if self.vae is None:
            raise RuntimeError("this pipeline was loaded without a VAE")
        z = conv_layout(latent.to(self.part_device("vae"), torch.float32))
        img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B,H,W,3) in [0,1] -> raw VAE-space latent (B,4,H/8,W/8) (the distribution's mean)."""
        if self.vae is None:
            raise RuntimeError("this pipeline was loaded without a VAE")
        h, w = images.shape[1] // 8 * 8, images.shape[2] // 8 * 8
        x = images[:, :h, :w, :3].to(self.part_device("vae"), torch.float32).permute(0, 3, 1, 2) * 2 - 1
        return self.vae.encode(conv_layout(x)).latent_dist.mean.float().cpu().contiguous()

    # -------------------------------------------------------------- the whole job
    def generate(self, plan: GenerationPlan | None = None, *, callback: Callable | None = None,
                 should_stop: Callable | None = None, noise: torch.Tensor | None = None, speed="auto",
                 stage: Callable | None = None, **params) -> GenerationResult:
        """Text to image with the hosted API's parameters (see aura_flow.params), checked before any work.

        plan: an `aura_flow.plan.GenerationPlan` (``plan_generation(params, speed=...)``), or instead the parameters
        as keywords and ``speed``: "auto" (the lossless padding fold on the CPU, exact elsewhere), None (exact), a
        mode name or an `aura_flow.pipeline.modes.SpeedOptions` (the lossy ones are opt-in, with a bounded,
        measured fidelity loss).
        callback(step, total, x0) after each step; should_stop() polled before every model call.
        noise overrides the seeded start noise, shape (number_of_images, 4, height/8, width/8).
        stage(parts): a context manager entered around each stage with the parts it uses (("text_encoder",),
        ("transformer",), ("vae",)), so a host can bring just those to its GPU; by default nothing moves.
        """
        if plan is None:
            plan = plan_generation(params, speed=speed)
        elif params:
            raise TypeError(f"generate() takes a plan or the parameters, not both (got {', '.join(sorted(params))})")
        if plan.sampling is None:
            raise ParameterError("this plan is for the hosted API (remote=True); plan a local run with "
                                 "plan_generation(params)")
        stage = stage or (lambda parts: contextlib.nullcontext())
        from PIL import Image

        with stage(("text_encoder",)):
            positive = self.encode_prompt(plan.prompt)
            negative = self.encode_prompt(plan.negative_prompt) if plan.cfg != 1.0 else positive
        with stage(("transformer",)):  # the speed is resolved in sample(), where the transformer is now
            out = self.sample(positive, negative, torch.zeros(plan.latent_shape), plan.sampling, callback=callback,
                              should_stop=should_stop, noise=noise)
        with stage(("vae",)):
            # one image at a time: a batch of 10 at 1024^2 in fp32 would need the VAE's activations ten times over
            images = torch.cat([self.decode(out[i:i + 1]) for i in range(out.shape[0])])
        pil = [Image.fromarray((im.numpy() * 255.0).round().clip(0, 255).astype("uint8")) for im in images]
        return GenerationResult(images=pil, tensor=images, seed=plan.seed, params=plan.params(), plan=plan)

def load(checkpoint, *, tokenizer=None, text_encoder=None, vae=None, dtype="auto", device="auto",
         offload_text_encoder="auto") -> AuraFlowPipeline:
    """Load AuraFlow from ``checkpoint`` and return an `AuraFlowPipeline`.

    checkpoint: a diffusers folder, an all-in-one .safetensors, or a transformer-only .safetensors (original or
    diffusers key names). tokenizer / text_encoder / vae: separate files or folders, overriding what the
    checkpoint carries. dtype: auto, fp32, fp16, bf16, fp8_e4m3fn or fp8_e5m2 (fp8 is storage only; compute
    runs in bf16/fp16); the VAE always runs in fp32. device: auto, cpu, cuda, cuda:N, mps.
    offload_text_encoder: True keeps the text encoder on the CPU between prompts (it visits the device only to
    encode one); "auto" does so on a CUDA device whose free memory is short (`text_encoder_should_wait`).
    """
    import time

    if offload_text_encoder not in ("auto", True, False):
        raise ParameterError(f"offload_text_encoder={offload_text_encoder!r}: give True, False or 'auto'")
    t0 = time.perf_counter()
    c = load_components(checkpoint, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, dtype=dtype,
                        device=device)
    pipe = AuraFlowPipeline.from_components(c, offload_text_encoder=offload_text_encoder)
    cfg = c.transformer.config
    log.info("AuraFlow loaded from %s: %d+%d blocks, width %d, %s on %s in %.1fs", checkpoint, cfg.num_mmdit_layers,
             cfg.num_single_dit_layers, cfg.num_attention_heads * cfg.attention_head_dim, dtype, c.device,
             time.perf_counter() - t0)
    return pipe
