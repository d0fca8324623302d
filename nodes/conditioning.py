"""AuraFlow Text Encode, and reading ComfyUI CONDITIONING back into the engine's context tensors.

CONDITIONING is ComfyUI's own format, ``[[tensor (1, tokens, 2048), {options}], ...]``, so ComfyUI's core
conditioning nodes and its native AuraFlow text encoding (CLIP Text Encode with the AuraFlow checkpoint's CLIP)
can feed AuraFlow Sampler as well.
"""
from __future__ import annotations

import logging

from ..aura_flow.errors import ParameterError
from .comfyui import devices
from .words import node_words

log = logging.getLogger(__name__)

# options that ComfyUI's own sampler honours and AuraFlow Sampler does not; a warning names any that is set
_IGNORED_OPTIONS = ("area", "mask", "start_percent", "end_percent", "control", "gligen", "hooks")


class AuraFlowTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("AURAFLOW_TEXT_ENCODER", {"tooltip": "The text encoder from AuraFlow Loader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "The prompt. Long prompts are kept whole (no truncation at 256 tokens)."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The encoded prompt in ComfyUI's CONDITIONING format, for AuraFlow Sampler.",)
    FUNCTION = "encode"
    CATEGORY = "AuraFlow/conditioning"
    DESCRIPTION = "Encodes a prompt with AuraFlow's Pile-T5-XL text encoder."

    def encode(self, text_encoder, text):
        with node_words({"prompt": "text"}), devices.on_device(text_encoder, parts=("text_encoder",)):
            context = text_encoder.encode_prompt(text)
        return ([[context.to(devices.intermediate_device()), {}]],)


def context_from_conditioning(conditioning, name: str, width: int | None = None):
    """The (rows, tokens, width) context tensor held by a CONDITIONING input, checked.

    One entry is expected (what a text encoder, Conditioning Concat or Conditioning Average gives); several
    entries (Conditioning Combine) would need ComfyUI's area-weighted mixing, which this sampler does not do.
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ParameterError(f"{name}: expected a CONDITIONING (a list of [tensor, options]); connect AuraFlow Text "
                             "Encode or CLIP Text Encode")
    if len(conditioning) != 1:
        raise ParameterError(f"{name}: has {len(conditioning)} conditioning entries (from Conditioning Combine?); "
                             "AuraFlow Sampler takes one. Use Conditioning Concat or a single prompt instead")
    entry = conditioning[0]
    if not isinstance(entry, (list, tuple)) or not entry:
        raise ParameterError(f"{name}: expected a CONDITIONING entry [tensor, options]; connect AuraFlow Text Encode "
                             "or CLIP Text Encode")
    tensor, options = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
    if getattr(tensor, "ndim", None) != 3:
        raise ParameterError(f"{name}: the conditioning tensor must be (1, tokens, width), got "
                             f"{tuple(getattr(tensor, 'shape', ()))}")
    if width is not None and tensor.shape[-1] != width:
        raise ParameterError(f"{name}: the conditioning has width {tensor.shape[-1]} but this AuraFlow model takes "
                             f"{width} (Pile-T5-XL). Encode the prompt with AuraFlow Text Encode, or with CLIP Text "
                             "Encode using the CLIP of an AuraFlow checkpoint")
    ignored = [k for k in _IGNORED_OPTIONS if options.get(k) is not None]
    if ignored:
        log.warning("%s: conditioning options %s are not supported by AuraFlow Sampler and are ignored",
                    name, ", ".join(ignored))
    return tensor
