"""LoRAs for the AuraFlow transformer: diffusers/peft, kohya and ComfyUI key styles, and lycoris LoKr, LoHa, full
and DoRA, applied as run-time patches on the transformer's `PatchableLinear` layers (never merged into weights).

- `formats`: reading a file (lazily), grouping keys into modules, each format's scale rules;
- `keys`: the key grammar and the layer names in every spelling (diffusers, original fal / ComfyUI);
- `patches`: the patch math (`WeightPatch` implementations);
- `apply`: matching onto a transformer, errors and reports, switching LoRAs on and off;
- `blame`: after a run turned NaN, which active LoRA overflows (and in which layer), to name it as the cause.

Typical use::

    report = apply_loras(pipe.transformer, [("style.safetensors", 0.8), ("character.safetensors", 1.0)])
    apply_loras(pipe.transformer, [])  # back to the base model, bit for bit
"""
from .apply import ApplyReport, LoraReport, PreparedLora, apply_loras, prepare_lora
from .formats import LoraFile

__all__ = ["LoraFile", "PreparedLora", "LoraReport", "ApplyReport", "prepare_lora", "apply_loras"]
