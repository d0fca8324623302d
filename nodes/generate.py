"""AuraFlow Generate: the hosted Aura Flow API's parameters on the local model, in one node.

Its widgets are `nodes.widgets.generation_inputs(remote=False)`, the same as AuraFlow Remote Generate's in the same
order, so a workflow can swap one node for the other.
"""
from __future__ import annotations

import io
import logging

from ..aura_flow.images import encode_image
from ..aura_flow.plan import plan_generation
from .comfyui import devices, memory, progress
from .records import attach
from .widgets import generation_inputs, noise_device_input, speed_input
from .words import MODEL, WEIGHT_DTYPE, check_connected, check_prompts, node_words

log = logging.getLogger(__name__)


class AuraFlowGenerate:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = generation_inputs(remote=False)
        return {**inputs, "required": {
            "model": ("AURAFLOW_MODEL", {"tooltip": "The model from AuraFlow Loader (with its text encoder and VAE)."}),
            **inputs["required"],
        }, "optional": {"speed": speed_input(), "noise_device": noise_device_input()}}

    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("images", "seed")
    OUTPUT_TOOLTIPS = ("The generated images, encoded and decoded with output_format/output_quality as the hosted "
                       "API returns them (png is lossless).",
                       "The seed used (the whole batch shares one noise tensor, as in ComfyUI).")
    FUNCTION = "generate"
    CATEGORY = "AuraFlow/generate"
    DESCRIPTION = "Generates images from a prompt with the local AuraFlow model and the hosted API's parameters."
    SEARCH_ALIASES = ["aura flow", "pony", "text to image", "txt2img"]

    def generate(self, model, speed="auto", noise_device="cpu", **params):
        check_connected("model", model, "generate", MODEL)
        check_prompts(params)
        with node_words({"dtype": WEIGHT_DTYPE}):
            return self._generate(model, speed, noise_device, params)

    def _generate(self, model, speed, noise_device, params):
        import numpy as np
        import torch
        from PIL import Image

        plan = plan_generation(params, speed=speed, noise_device=noise_device)  # every parameter, before any stage
        bar = progress.Progress(plan.steps)
        with progress.interruptible():  # each stage asks ComfyUI to load only its part
            result = model.generate(plan, callback=bar, should_stop=progress.should_stop(),
                                    stage=lambda parts: memory.using(model, parts))
        if plan.output_format == "png":
            images = result.tensor
        else:  # what the hosted API would return: the image through its lossy encoding
            decoded = []
            for pil in result.images:
                data = encode_image(pil, plan.output_format, plan.output_quality)
                decoded.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0)
            images = torch.from_numpy(np.stack(decoded))
        return (attach(images.to(devices.intermediate_device()), result.record or None, result.params or None),
                result.seed)
