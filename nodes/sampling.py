"""AuraFlow Sampler: ComfyUI's KSampler semantics for AuraFlow, on ComfyUI LATENTs (raw SDXL VAE space)."""
from __future__ import annotations

import logging

from ..aura_flow.errors import ParameterError
from ..aura_flow.params import RANGES, check_area, check_range, check_size
from ..aura_flow.plan import plan_sampling
from .comfyui import devices, progress
from .conditioning import context_from_conditioning
from .widgets import generation_inputs, speed_input
from .words import WEIGHT_DTYPE, node_words

log = logging.getLogger(__name__)

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
                "model": ("AURAFLOW_MODEL", {"tooltip": "The model from AuraFlow Loader."}),
                "positive": ("CONDITIONING", {"tooltip": "What the image should show (AuraFlow Text Encode)."}),
                "negative": ("CONDITIONING", {"tooltip": "What it should not show; unused when cfg is 1."}),
                **sampler_inputs(),
            },
            "optional": {
                "latent_image": ("LATENT", {"tooltip": "Start latent (VAE Encode of an image for image-to-image). "
                                                       "Not connected: an empty latent of width x height x "
                                                       "batch_size."}),
                "speed": speed_input(),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The sampled latent (raw SDXL VAE space); decode it with VAE Decode.",)
    FUNCTION = "sample"
    CATEGORY = "AuraFlow/sampling"
    DESCRIPTION = "Samples an AuraFlow latent from a prompt with ComfyUI's samplers and schedulers."

    def sample(self, model, positive, negative, seed, steps, cfg, sampler_name, scheduler, shift, denoise,
               width=1024, height=1024, batch_size=1, latent_image=None, speed="auto"):
        with node_words(SAMPLER_WORDS):
            return self._sample(model, positive, negative, seed, steps, cfg, sampler_name, scheduler, shift, denoise,
                                width, height, batch_size, latent_image, speed)

    def _sample(self, model, positive, negative, seed, steps, cfg, sampler_name, scheduler, shift, denoise, width,
                height, batch_size, latent_image, speed):
        import torch

        width_ctx = getattr(model, "context_dim", None)
        pos = context_from_conditioning(positive, "positive", width_ctx)
        neg = context_from_conditioning(negative, "negative", width_ctx)
        # every setting is checked (and the schedule made) before the model moves to the GPU
        plan = plan_sampling(seed=seed, steps=steps, cfg=cfg, sampler=sampler_name, scheduler=scheduler, shift=shift,
                             denoise=denoise, speed=speed)
        if latent_image is None:
            width, height = check_size("width", width), check_size("height", height)
            batch_size = check_range("number_of_images", batch_size)
            check_area(width, height, batch_size, names=("width", "height", "batch_size"))
            latent_image = {"samples": torch.zeros(batch_size, 4, height // 8, width // 8)}
        elif not isinstance(latent_image, dict) or not isinstance(latent_image.get("samples"), torch.Tensor):
            raise ParameterError("latent_image: expected a LATENT (from VAE Encode or Empty Latent Image)")
        elif latent_image.get("noise_mask") is not None:
            log.warning("AuraFlow Sampler: the latent's noise_mask (inpainting) is not supported; the whole image "
                        "is sampled")
        bar = progress.Progress(max(len(plan.sigmas) - 1, 0))
        with devices.on_device(model, parts=("transformer",)), progress.interruptible():
            start = dict(latent_image)
            start["samples"] = latent_image["samples"].to(model.device)
            out = model.sample(pos, neg, start, plan, callback=bar, should_stop=progress.should_stop())
        out["samples"] = out["samples"].to(devices.intermediate_device())
        return (out,)
