"""AuraFlow Sampler: ComfyUI's KSampler semantics for AuraFlow, on ComfyUI LATENTs (raw SDXL VAE space)."""
from __future__ import annotations

import logging

from ..aura_flow.errors import ParameterError
from ..aura_flow.params import RANGES, check_area, check_range, check_size
from ..aura_flow.plan import plan_sampling
from ..aura_flow.weights.devices import release_freed_memory
from .comfyui import devices, memory, native, progress
from .conditioning import conds_from_conditioning
from .records import attach
from .widgets import generation_inputs, noise_device_input, speed_input
from .words import SAMPLER_MODEL, WEIGHT_DTYPE, check_connected, check_given, node_words

log = logging.getLogger(__name__)

# the model socket takes AuraFlow Loader's model or a ComfyUI MODEL (ComfyUI and its editor accept unions)
MODEL_TYPES = "AURAFLOW_MODEL,MODEL"
# the engine's parameter names -> this node's inputs
SAMPLER_WORDS = {"sampler": "sampler_name", "number_of_images": "batch_size", "latent": "latent_image",
                 "dtype": WEIGHT_DTYPE}


def sampler_inputs() -> dict:
    """The sampler node's widgets, taken from the one-node generator's so both share ranges and tooltips."""
    gen = generation_inputs(remote=False)["required"]
    denoise = RANGES["denoise"]
    return {
        "seed": gen["seed"],
        "steps": gen["steps"],
        "cfg": gen["cfg"],
        "sampler_name": gen["sampler"],
        "scheduler": gen["scheduler"],
        "shift": gen["shift"],
        "denoise": ("FLOAT", {"default": denoise.default, "min": denoise.lo, "max": denoise.hi, "step": 0.01,
                              "tooltip": "How much of the schedule to run: 1 starts from pure noise; below 1 keeps "
                                         "that much of the latent_image (image-to-image, e.g. 0.6)."}),
        "width": gen["width"],
        "height": gen["height"],
        "batch_size": ("INT", {**gen["number_of_images"][1],
                               "tooltip": "How many images to generate when no latent_image is connected."}),
    }


class AuraFlowSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPES, {"tooltip": "The model from AuraFlow Loader, or a ComfyUI MODEL holding AuraFlow "
                                                   "(Load Checkpoint, Load Diffusion Model, a GGUF loader, after LoRA "
                                                   "nodes; the speed modes apply to AuraFlow Loader's model only)."}),
                "positive": ("CONDITIONING", {"tooltip": "What the image should show (AuraFlow Text Encode). Areas, "
                                                         "masks, strengths and timestep ranges work as in KSampler."}),
                "negative": ("CONDITIONING", {"tooltip": "What it should not show; unused when cfg is 1."}),
                **sampler_inputs(),
            },
            "optional": {
                "latent_image": ("LATENT", {"tooltip": "Start latent (VAE Encode of an image for image-to-image; with a "
                                                       "noise mask, e.g. from Set Latent Noise Mask, only the masked "
                                                       "part is regenerated). Not connected: an empty latent of width "
                                                       "x height x batch_size."}),
                "speed": speed_input(),
                "noise_device": noise_device_input(),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The sampled latent (raw SDXL VAE space); decode it with VAE Decode.",)
    FUNCTION = "sample"
    CATEGORY = "AuraFlow/sampling"
    DESCRIPTION = "Samples an AuraFlow latent from a prompt with ComfyUI's samplers and schedulers."
    SEARCH_ALIASES = ["aura flow", "pony", "ksampler", "gguf", "inpaint"]

    def sample(self, model, positive, negative, seed, steps, cfg, sampler_name, scheduler, shift, denoise,
               width=1024, height=1024, batch_size=1, latent_image=None, speed="auto", noise_device="cpu"):
        with node_words(SAMPLER_WORDS):
            return self._sample(model, positive, negative, seed, steps, cfg, sampler_name, scheduler, shift, denoise,
                                width, height, batch_size, latent_image, speed, noise_device)

    def _sample(self, model, positive, negative, seed, steps, cfg, sampler_name, scheduler, shift, denoise, width,
                height, batch_size, latent_image, speed, noise_device):
        import torch

        comfy_model = native.is_comfy_model(model)
        if comfy_model:
            native.check_auraflow(model)
            width_ctx = native.context_width(model)
        else:
            check_connected("model", model, "sample", SAMPLER_MODEL)
            width_ctx = getattr(model, "context_dim", None)
        check_given(seed=seed)
        pos = conds_from_conditioning(positive, "positive", width_ctx)
        neg = conds_from_conditioning(negative, "negative", width_ctx)
        # every setting is checked (and the schedule made) before the model is loaded
        plan = plan_sampling(seed=seed, steps=steps, cfg=cfg, sampler=sampler_name, scheduler=scheduler, shift=shift,
                             denoise=denoise, speed=speed, noise_device=noise_device)
        if latent_image is None:
            width, height = check_size("width", width), check_size("height", height)
            batch_size = check_range("number_of_images", batch_size)
            check_area(width, height, batch_size, names=("width", "height", "batch_size"))
            latent_image = {"samples": torch.zeros(batch_size, 4, height // 8, width // 8)}
        elif not isinstance(latent_image, dict) or not isinstance(latent_image.get("samples"), torch.Tensor):
            raise ParameterError("latent_image: expected a LATENT (from VAE Encode or Empty Latent Image)")
        bar = progress.Progress(max(len(plan.sigmas) - 1, 0))
        record = None
        if comfy_model:  # ComfyUI's own guider, memory manager and conditioning handling
            with progress.interruptible():
                out = native.sample(model, positive, negative, latent_image, plan, progress=bar)
        else:
            memory.load_transformer(model, latent_image["samples"].shape)
            with progress.interruptible():
                start = dict(latent_image)
                start["samples"] = latent_image["samples"].to(model.device)
                out = model.sample(pos, neg, start, plan, callback=bar, should_stop=progress.should_stop())
            release_freed_memory()  # the run's freed buffers back to the system, as generate() does: a flat RSS
            record = _record(model, plan)  # while the model is on the device it ran on
        out["samples"] = attach(out["samples"].to(devices.intermediate_device()), record)
        return (out,)


def _record(model, plan):
    """The run's ``auraflow`` record, for the save node (None for a model that cannot give one)."""
    record = getattr(model, "run_record", None)
    return record(plan) if record is not None else None
