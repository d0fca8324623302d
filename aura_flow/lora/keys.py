"""LoRA key grammar: which part of a key names the layer and which the tensor, and which transformer layer a name
means in each spelling trainers use.

A key is ``<prefix><module><sep><parameter>``:
- prefix: ``transformer.`` (diffusers), ``base_model.model.`` / ``transformer.base_model.model.`` (peft),
  ``diffusion_model.`` / ``model.diffusion_model.`` (ComfyUI), ``lora_unet_`` (kohya), ``lycoris_`` (lycoris /
  SimpleTuner), ``lora_transformer_`` (OneTrainer), or none;
- module: a diffusers module name (``joint_transformer_blocks.0.attn.to_q``) or an original fal / ComfyUI one
  (``double_layers.0.attn.w2q``), with dots, or with every dot written as ``_`` after the underscore prefixes;
- parameter: ``lora_A.weight``, ``lora_down.weight``, ``alpha``, ``lokr_w1``, ``hada_w1_a``, ``diff``, …
Text-encoder keys (``lora_te*``, ``text_encoder*``) are recognised so that they can be reported as ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# the file's parameter name -> its role in the patch math
PARAMETERS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_A": "down", "lora_B": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "alpha": "alpha", "dora_scale": "magnitude", "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b", "lokr_t1": "lokr_t1",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "diff": "diff", "diff_b": "diff_b",
}
_MAX_PARAM_DOTS = max(p.count(".") for p in PARAMETERS)

# longest first, so that "transformer.base_model.model." wins over "transformer."
PREFIXES = ("transformer.base_model.model.", "base_model.model.transformer.", "base_model.model.",
            "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_transformer_", "lora_unet_",
            "lycoris_", "unet.", "")
TEXT_ENCODER_PREFIXES = ("lora_te", "lycoris_te", "text_encoder", "text_encoders.", "te.", "te1.", "te2.",
                         "lora_clip", "clip_")

# markers of other models' layer names (in the underscore spelling), first match wins
LOOKALIKES = (
    ("an SD 1.x / SDXL UNet LoRA", ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks",
                                    "middle_block")),
    ("a Flux LoRA", ("double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "proj_mlp",
                     "norm_added_q")),
    ("an SD3 LoRA", ("joint_blocks", "context_block", "x_block")),
    ("a video model's LoRA (Wan, HunyuanVideo)", ("self_attn", "cross_attn", "ffn_0", "ffn_2")),
    ("a LoRA for another diffusers transformer (SD3, Flux, PixArt, Sana…)", ("ff_net_", "transformer_blocks_")),
)


def split_key(key: str) -> tuple[str, str] | None:
    """``(module path, parameter)`` of a LoRA key, or None when its ending is no known LoRA parameter."""
    parts = key.split(".")
    for n in range(min(_MAX_PARAM_DOTS + 1, len(parts) - 1), 0, -1):
        param = ".".join(parts[-n:])
        if param in PARAMETERS:
            return ".".join(parts[:-n]), param
    return None


def is_text_encoder(module_path: str) -> bool:
    return module_path.startswith(TEXT_ENCODER_PREFIXES)


def looks_like(module_paths) -> str | None:
    """What model the layer names look like they were made for, or None."""
    spelled = [p.replace(".", "_") for p in module_paths]
    for what, markers in LOOKALIKES:
        if any(marker in p for marker in markers for p in spelled):
            return what
    return None


@dataclass(frozen=True)
class Target:
    """A transformer layer a LoRA module path resolved to."""
    layer: str                  # diffusers module name, a key of patchable_layers(transformer)
    original: bool = False      # the file names it in the original (fal / ComfyUI) layout
    swapped_halves: bool = False  # ...whose output rows are this layer's with the two halves swapped (modF.1)


def original_names(layer_names) -> dict[str, tuple[str, bool]]:
    """diffusers module name -> (original module name, whether the original weight's two row halves are swapped),
    taken from the pack's own key converter (`aura_flow.weights.keymap.transformer_to_original`) so the two never disagree.
    Layers it does not know get no original name."""
    from ..weights.keymap import transformer_to_original

    out = {}
    tag = torch.arange(2.0).reshape(2, 1)
    for name in layer_names:
        try:
            converted = transformer_to_original({f"{name}.weight": tag})
        except KeyError:
            continue
        (key, value), = converted.items()
        out[name] = (key.removesuffix(".weight"), bool(value[0, 0] == 1.0))
    return out


class LayerIndex:
    """Every spelling of every patchable layer's name -> `Target`."""

    def __init__(self, layer_names):
        self.layers = tuple(layer_names)
        self._lookup: dict[str, Target] = {}
        ambiguous = set()

        def add(spelling, target):
            if self._lookup.get(spelling, target) != target:
                ambiguous.add(spelling)
            self._lookup[spelling] = target

        for name in self.layers:
            add(name, Target(name))
            add(name.replace(".", "_"), Target(name))
        for name, (orig, swapped) in original_names(self.layers).items():
            target = Target(name, original=True, swapped_halves=swapped)
            add(orig, target)
            add(orig.replace(".", "_"), target)
        for spelling in ambiguous:  # a name two layers could claim is no name
            del self._lookup[spelling]

    def resolve(self, module_path: str) -> Target | None:
        for prefix in PREFIXES:
            if module_path.startswith(prefix):
                target = self._lookup.get(module_path[len(prefix):])
                if target is not None:
                    return target
        return None
