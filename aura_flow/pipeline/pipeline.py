"""`AuraFlowPipeline`: prompt encoding, the velocity model, sampling and VAE decode, with ComfyUI's semantics."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..plan import GenerationPlan, plan_generation, plan_sampling
from ..provenance import run_record
from ..sampling.conds import has_options
from ..sampling.loop import check_latent
from ..sampling.loop import sample as _sample
from .loras import LoraModelView, LoraState, check_loras
from .modes import resolve as resolve_speed
from .speed import velocity_model
from .vae_layout import conv_layout, install_group_norm
from ..errors import NumericError, ParameterError
from ..prompts import encode_prompt
from ..weights.components import Components, load_components
from ..weights.devices import module_bytes, offload_text_encoder_auto, release_freed_memory

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
    record: dict = field(default_factory=dict)  # what else reproduces it: files and hashes, dtype, LoRAs, version

    def metadata(self) -> dict:
        """What to embed in the image files: ``parameters`` (the hosted API's) and ``auraflow`` (the record)."""
        return {"parameters": self.params, "auraflow": self.record}


class AuraFlowPipeline:
    """Loaded AuraFlow: ``generate()`` for the whole job, or the parts (``encode_prompt``, ``velocity``,
    ``sample``, ``decode``, ``encode``) for the ComfyUI nodes."""

    def __init__(self, transformer, text_encoder, tokenizer, vae, *, device, compute_dtype, sources=None,
                 prompt_cache_size: int = 8, offload_text_encoder: bool = False, weight_dtype: str = "auto"):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.device = torch.device(device)
        self.dtype = compute_dtype
        self.sources = sources or {}
        self.weight_dtype = weight_dtype  # the dtype the load was asked for ("auto", "fp8_e4m3fn"...)
        self.loras: tuple = ()  # this pipeline's own LoRAs (set_loras); views made by with_loras have theirs
        self._lora_state = LoraState(transformer)
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
    def from_components(cls, c: Components, *, offload_text_encoder="auto", weight_dtype="auto") -> "AuraFlowPipeline":
        """The pipeline over what `load_components` read, moved to its device. offload_text_encoder: see `load`."""
        if offload_text_encoder == "auto":
            offload_text_encoder = offload_text_encoder_auto(
                c.device, {name: module_bytes(getattr(c, name)) for name in cls.PARTS})
        return cls(c.transformer, c.text_encoder, c.tokenizer, c.vae, device=c.device, compute_dtype=c.compute_dtype,
                   sources=c.sources, offload_text_encoder=offload_text_encoder, weight_dtype=weight_dtype)

    # -------------------------------------------------------------- LoRAs
    def set_loras(self, loras):
        """Make ``loras`` (``[(path, strength), ...]``) this pipeline's LoRAs, active from now on; ``[]`` gives back
        the base model exactly. Each file is read once per version (cached per resolved path, mtime and size), so
        switching is instant. Returns the `aura_flow.lora.ApplyReport` (formats, matched layers, warnings)."""
        entries = check_loras(loras)
        report = self._lora_state.activate(entries)
        self.loras = entries
        return report

    def with_loras(self, loras) -> LoraModelView:
        """A light model sharing this pipeline's modules with its own LoRA list (`LoraModelView`); this pipeline
        and its other views are not changed. Every file is checked and prepared now."""
        entries = check_loras(loras)
        with self._lora_state.lock:
            for entry in entries:
                self._lora_state.prepared(entry)
        return LoraModelView(self, entries)

    def lora_scope(self, loras=None):
        """A context in which ``loras`` (default: this pipeline's own) are active on the transformer; the runs
        (`sample`, `generate`, `velocity`) enter it themselves."""
        return self._lora_state.scope(self.loras if loras is None else loras)

    def lora_metadata(self, loras=None) -> list[dict]:
        return self._lora_state.metadata(self.loras if loras is None else loras)

    def run_record(self, plan, loras=None) -> dict:
        """The ``auraflow`` image-metadata record of a run with ``plan`` (a GenerationPlan or SamplingPlan)."""
        sampling = getattr(plan, "sampling", None) or plan
        return run_record(self.sources, dtype=self.weight_dtype, compute_dtype=self.dtype, device=self.device,
                          speed=sampling.speed, noise_device=sampling.noise_device,
                          loras=self.lora_metadata(loras))

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

    def placed(self, name: str, device) -> None:
        """Record that a host (ComfyUI's memory manager) has put part ``name`` on ``device`` itself, so inputs go
        there; for the transformer also where the speed mode is resolved. Nothing moves."""
        device = torch.device(device)
        self.placement[name] = device
        if name == "transformer":
            self.device = device

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
        transformer: a stand-in with the transformer's call signature (aura_flow.pipeline.speed's compiled or cached
        one).
        """
        h, w = x.shape[-2:]
        p = self.patch_size
        ph, pw = (-h) % p, (-w) % p
        xin = F.pad(x, (0, pw, 0, ph), mode="circular") if (ph or pw) else x
        with self.lora_scope():
            out = (self.transformer if transformer is None else transformer)(
                hidden_states=xin.to(self.device, self.dtype),
                encoder_hidden_states=context.to(self.device, self.dtype),
                timestep=sigma.to(self.device, torch.float32), return_dict=False)[0]
        return out[..., :h, :w].to(x.dtype)

    def sample(self, positive, negative, latent, plan=None, *, speed=None, callback=None, should_stop=None,
               noise=None, mask=None, **settings):
        """`aura_flow.sample` with this pipeline's transformer as the model.

        plan: an `aura_flow.plan.SamplingPlan`, or the settings as keywords (as `aura_flow.sample` takes them) with
        speed as `generate`'s but None (the exact path) by default. The speed mode is resolved here, for the device
        the transformer is on now, and its modes see the run's own schedule. With conditioning options (several
        entries, areas, masks, timestep ranges) the modes that reuse one call's result in another (cfg_cutoff,
        step_cache) are left out: the calls no longer line up as cond/uncond pairs."""
        if plan is None:
            plan = plan_sampling(speed=speed, **settings)
        elif settings or speed is not None:
            raise TypeError("sample() takes a plan or the settings, not both")
        for name, value in (("positive", positive), ("negative", negative)):
            contexts = [getattr(c, "context", None) for c in value] if isinstance(value, (list, tuple)) else [value]
            for context in contexts:  # a context tensor, or the Conds of ComfyUI's conditioning options
                if getattr(context, "ndim", 0) != 3 or context.shape[-1] != self.context_dim:
                    raise ParameterError(f"{name}: a context of shape {tuple(getattr(context, 'shape', ()))}; this "
                                         f"model takes (1, tokens, {self.context_dim}) from its own text encoder")
        options = resolve_speed(plan.speed, self.device)
        if options is not None and has_options(positive, negative) and \
                (options.cfg_cutoff is not None or options.cache_threshold > 0):
            log.info("speed: cfg_cutoff and step_cache do not apply with conditioning options; running without them")
            options = dataclasses.replace(options, cfg_cutoff=None, cache_threshold=0.0)
        model = self.velocity
        with self.lora_scope():  # the LoRAs of this pipeline (or of the view that called) for the whole run
            if options is not None:
                samples = latent["samples"] if isinstance(latent, dict) else latent
                model = velocity_model(self, options, batch=samples.shape[0], cfg=plan.cfg,
                                       sigmas=plan.sigmas_tensor())
            try:
                return _sample(model, positive, negative, latent, plan, callback=callback, should_stop=should_stop,
                               noise=noise, mask=mask)
            except NumericError as exc:  # a LoRA that overflows is named as the cause, not the sampler
                blamed = self._lora_state.explain(exc, self.dtype, latent)
                if blamed is None:
                    raise
                raise blamed from exc

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE-space latent (B,4,h,w) -> images (B,H,W,3) float32 in [0,1]. Always fp32 (fp16 overflows)."""
        if self.vae is None:
            raise RuntimeError("this pipeline was loaded without a VAE")
        check_latent(latent)
        z = conv_layout(latent.to(self.part_device("vae"), torch.float32))
        img = self.vae.decode(z, return_dict=False)[0]
        if not torch.isfinite(img).all():  # clamp would turn NaN into a black image that looks like a result
            raise NumericError("the VAE decoded NaN or infinite values from a finite latent; the VAE's weights are "
                               "damaged or not the SDXL VAE's")
        out = ((img.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()
        del img, z  # the nodes decode without generate(): each decode hands its freed buffers back (flat RSS)
        release_freed_memory()
        return out

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B,H,W,3) in [0,1] -> raw VAE-space latent (B,4,H/8,W/8) (the distribution's mean)."""
        if self.vae is None:
            raise RuntimeError("this pipeline was loaded without a VAE")
        if images.ndim != 4 or images.shape[0] == 0 or min(images.shape[1:3]) < 8 or images.shape[3] < 3:
            raise ParameterError(f"images must be (batch, height, width, 3) of at least one 8x8 image, got shape "
                                 f"{tuple(images.shape)}")
        h, w = images.shape[1] // 8 * 8, images.shape[2] // 8 * 8
        if not torch.isfinite(images).all():
            raise NumericError("the images to encode hold NaN or infinite values; make them again")
        x = images[:, :h, :w, :3].to(self.part_device("vae"), torch.float32).permute(0, 3, 1, 2) * 2 - 1
        out = self.vae.encode(conv_layout(x)).latent_dist.mean.float().cpu().contiguous()
        del x
        release_freed_memory()
        return out

    # -------------------------------------------------------------- the whole job
    def generate(self, plan: GenerationPlan | None = None, *, callback: Callable | None = None,
                 should_stop: Callable | None = None, noise: torch.Tensor | None = None, speed="auto",
                 noise_device: str = "cpu", stage: Callable | None = None, **params) -> GenerationResult:
        """Text to image with the hosted API's parameters (see aura_flow.params), checked before any work.

        plan: an `aura_flow.plan.GenerationPlan` (``plan_generation(params, speed=...)``), or instead the parameters
        as keywords and ``speed``: "auto" (the lossless padding fold on the CPU, exact elsewhere), None (exact), a
        mode name or an `aura_flow.pipeline.modes.SpeedOptions` (the lossy ones are opt-in, with a bounded,
        measured fidelity loss); ``noise_device``: "cpu" (ComfyUI's start noise) or "gpu" (drawn on the compute
        device, as diffusers does; the same as "cpu" when the model runs on the CPU).
        callback(step, total, x0) after each step; should_stop() polled before every model call.
        noise overrides the seeded start noise, shape (number_of_images, 4, height/8, width/8).
        stage(parts): a context manager entered around each stage with the parts it uses (("text_encoder",),
        ("transformer",), ("vae",)), so a host can bring just those to its GPU; by default nothing moves.
        """
        if plan is None:
            plan = plan_generation(params, speed=speed, noise_device=noise_device)
        elif params or noise_device != "cpu":
            given = sorted(params) + (["noise_device"] if noise_device != "cpu" else [])
            raise TypeError(f"generate() takes a plan or the parameters, not both (got {', '.join(given)}); the "
                            f"plan carries them: plan_generation(params, noise_device=...)")
        if plan.sampling is None:
            raise ParameterError("this plan is for the hosted API (remote=True); plan a local run with "
                                 "plan_generation(params)")
        stage = stage or (lambda parts: contextlib.nullcontext())
        from PIL import Image

        with self.lora_scope():  # one LoRA list for the whole run, the one the record names
            with stage(("text_encoder",)):
                positive = self.encode_prompt(plan.prompt)
                negative = self.encode_prompt(plan.negative_prompt) if plan.cfg != 1.0 else positive
            with stage(("transformer",)):  # the speed is resolved in sample(), where the transformer is now
                # the latent starts where the transformer runs: the sampler works there (and draws "gpu" noise there)
                out = self.sample(positive, negative, torch.zeros(plan.latent_shape, device=self.device),
                                  plan.sampling, callback=callback, should_stop=should_stop, noise=noise)
                record = self.run_record(plan, self._lora_state.active)  # while on the device it ran on
        with stage(("vae",)):
            # one image at a time: a batch of 10 at 1024^2 in fp32 would need the VAE's activations ten times over
            images = torch.cat([self.decode(out[i:i + 1]) for i in range(out.shape[0])])
        pil = [Image.fromarray((im.numpy() * 255.0).round().clip(0, 255).astype("uint8")) for im in images]
        release_freed_memory()  # the run's freed buffers back to the system: the RSS stays flat image after image
        return GenerationResult(images=pil, tensor=images, seed=plan.seed, params=plan.params(), plan=plan,
                                record=record)

def load(checkpoint, *, tokenizer=None, text_encoder=None, vae=None, dtype="auto", device="auto",
         offload_text_encoder="auto", loras=None) -> AuraFlowPipeline:
    """Load AuraFlow from ``checkpoint`` and return an `AuraFlowPipeline`.

    checkpoint: a diffusers folder, an all-in-one .safetensors, or a transformer-only .safetensors (original or
    diffusers key names). tokenizer / text_encoder / vae: separate files or folders, overriding what the
    checkpoint carries. dtype: auto, fp32, fp16, bf16, fp8_e4m3fn or fp8_e5m2 (fp8 is storage only; compute
    runs in bf16/fp16); the VAE always runs in fp32. device: auto, cpu, cuda, cuda:N, mps.
    offload_text_encoder: True keeps the text encoder on the CPU between prompts (it visits the device only to
    encode one); "auto" does so on a CUDA device whose free memory is short (`text_encoder_should_wait`).
    loras: ``[(path, strength), ...]`` applied as run-time patches (`AuraFlowPipeline.set_loras`); the files and
    strengths are checked before the model is read.
    """
    import time

    if offload_text_encoder not in ("auto", True, False):
        raise ParameterError(f"offload_text_encoder={offload_text_encoder!r}: give True, False or 'auto'")
    entries = check_loras(loras)  # headers and strengths, before gigabytes are read
    t0 = time.perf_counter()
    c = load_components(checkpoint, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, dtype=dtype,
                        device=device)
    pipe = AuraFlowPipeline.from_components(c, offload_text_encoder=offload_text_encoder, weight_dtype=dtype)
    if entries:
        pipe.set_loras(entries)
    cfg = c.transformer.config
    log.info("AuraFlow loaded from %s: %d+%d blocks, width %d, %s on %s in %.1fs", checkpoint, cfg.num_mmdit_layers,
             cfg.num_single_dit_layers, cfg.num_attention_heads * cfg.attention_head_dim, dtype, c.device,
             time.perf_counter() - t0)
    return pipe
