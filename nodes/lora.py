"""AuraFlow LoRA Loader: a model in, the same model with one more LoRA out; chainable, never changing its input."""
from __future__ import annotations

import logging

from ..aura_flow.params import LORA_STRENGTH, check_range
from .comfyui import folders
from .words import MODEL, check_connected, check_text

log = logging.getLogger(__name__)


class AuraFlowLoraLoader:
    @classmethod
    def INPUT_TYPES(cls):
        rng = LORA_STRENGTH
        return {"required": {
            "model": ("AURAFLOW_MODEL", {"tooltip": "The model from AuraFlow Loader or another AuraFlow LoRA Loader "
                                                    "(chain them to stack LoRAs)."}),
            "lora_name": (folders.model_names(folders.LORA_FOLDER), {
                "tooltip": "A LoRA for AuraFlow or Pony V7 from models/loras: diffusers/PEFT, kohya, ComfyUI or "
                           "LyCORIS (LoKr, LoHa, SimpleTuner) .safetensors."}),
            "strength": ("FLOAT", {"default": rng.default, "min": rng.lo, "max": rng.hi, "step": 0.01,
                                   "tooltip": "How strongly the LoRA applies: 1 as trained, 0 off, negative values "
                                              f"subtract it ({rng.lo:g} to {rng.hi:g})."}),
        }}

    RETURN_TYPES = ("AURAFLOW_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA added to its input's; the input model (and every other branch "
                       "using it) stays as it was.",)
    FUNCTION = "load"
    CATEGORY = "AuraFlow/loaders"
    DESCRIPTION = "Adds a LoRA to an AuraFlow model without changing the input model; chain several to stack them."
    SEARCH_ALIASES = ["aura flow", "pony", "lora", "lycoris", "lokr", "loha"]

    def load(self, model, lora_name, strength=1.0):
        strength = check_range("strength", strength, LORA_STRENGTH)
        with_loras = check_connected("model", model, "with_loras", MODEL).with_loras
        check_text("lora_name", lora_name, "pick a LoRA in the list (press R in the editor to refresh it)")
        path = folders.resolve_model(lora_name, (folders.LORA_FOLDER,), what="LoRA")
        # the file is checked and matched onto the transformer now (cached per file version); nothing is applied
        # until a run of the new model, and the input model keeps its own list
        view = with_loras([*model.loras, (path, strength)])
        log.info("AuraFlow LoRA Loader: %s at %g (%d LoRA(s) on this model)", lora_name, strength, len(view.loras))
        return (view,)
