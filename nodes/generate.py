"""AuraFlow Generate: the hosted Aura Flow API's parameters on the local model, in one node.

Its widgets are `nodes.widgets.generation_inputs(remote=False)`, the same as AuraFlow Remote Generate's in the same
order, so a workflow can swap one node for the other.
"""
from __future__ import annotations

import io
import logging

from . import comfy_compat as compat
from .widgets import generation_inputs, speed_input

log = logging.getLogger(__name__)


class AuraFlowGenerate:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = generation_inputs(remote=False)
        return {**inputs, "required": {
            "model": ("AURAFLOW_MODEL", {"tooltip": "The model from AuraFlow Loader (with its text encoder and VAE)."}),
            **inputs["required"],
        }, "optional": {"speed": speed_input()}}

    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("images", "seed")
    OUTPUT_TOOLTIPS = ("The generated images, encoded and decoded with output_format/output_quality as the hosted "
                       "API returns them (png is lossless).",
                       "The seed used (the whole batch shares one noise tensor, as in ComfyUI).")
    FUNCTION = "generate"
    CATEGORY = "AuraFlow/generate"
    DESCRIPTION = "Generates images from a prompt with the local AuraFlow model and the hosted API's parameters."

    def generate(self, model, speed="auto", **params):
        import numpy as np
        import torch
        from PIL import Image

        imageio = compat.engine_module("images")
        checked = compat.engine.validate_generation(params)  # generate() checks speed too, before any stage
        progress = compat.Progress(checked["steps"])
        with compat.interruptible():  # each stage brings only its part to the GPU
            result = model.generate(callback=progress, should_stop=compat.should_stop(), speed=speed,
                                    stage=lambda parts: compat.on_device(model, parts), **params)
        p = result.params
        if p["output_format"] == "png":
            images = result.tensor
        else:  # what the hosted API would return: the image through its lossy encoding
            decoded = []
            for pil in result.images:
                data = imageio.encode_image(pil, p["output_format"], p["output_quality"])
                decoded.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0)
            images = torch.from_numpy(np.stack(decoded))
        return (images.to(compat.intermediate_device()), result.seed)
