"""AuraFlow Text Encode, the text encoder object it takes, and reading ComfyUI CONDITIONING back for the engine.

CONDITIONING is ComfyUI's own format, ``[[tensor (1, tokens, 2048), {options}], ...]``, so ComfyUI's core
conditioning nodes and its native AuraFlow text encoding (CLIP Text Encode with the AuraFlow checkpoint's CLIP)
can feed AuraFlow Sampler as well. The options ComfyUI's sampler honours for this model are honoured the same way
(aura_flow.sampling.conds): several entries (Conditioning Combine), areas, masks, strengths and timestep ranges.
"""
from __future__ import annotations

import logging

from ..aura_flow.errors import ParameterError
from .comfyui import devices, memory
from .words import TEXT_ENCODER, check_connected, check_text, node_words

log = logging.getLogger(__name__)

# options ComfyUI's sampler uses that have no meaning here (ControlNets, GLIGEN, hook keyframes): a warning names
# any that is set
_IGNORED_OPTIONS = ("control", "gligen", "hooks")


class TextEncoder:
    """AuraFlow Loader's ``text_encoder`` output: the loaded pipeline's Pile-T5 text encoder and tokenizer as an
    object of its own (like ComfyUI's CLIP), with its own ComfyUI ``patcher`` inside ComfyUI."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @property
    def text_encoder(self):
        return self.pipeline.text_encoder

    @property
    def dtype(self):
        return self.pipeline.dtype

    @property
    def context_dim(self) -> int:
        return self.pipeline.context_dim

    @property
    def patcher(self):
        return memory.patcher(self.pipeline, "text_encoder")

    def placed(self, part, device):
        self.pipeline.placed(part, device)

    def encode_prompt(self, text: str):
        return self.pipeline.encode_prompt(text)


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
    SEARCH_ALIASES = ["aura flow", "pony", "t5", "prompt", "clip text encode"]

    def encode(self, text_encoder, text):
        check_connected("text_encoder", text_encoder, "encode_prompt", TEXT_ENCODER)
        check_text("text", text, "give the prompt as text ('' for none)")
        with node_words({"prompt": "text"}):
            memory.load(text_encoder, "text_encoder")
            context = text_encoder.encode_prompt(text)
        return ([[context.to(devices.intermediate_device()), {}]],)


def _check_area(area, name: str):
    numbers = area[1:] if len(area) == 5 and area[0] == "percentage" else area
    if len(numbers) != 4 or not all(isinstance(v, (int, float)) for v in numbers):
        raise ParameterError(f"{name}: the conditioning area {area!r} is not ComfyUI's (height, width, y, x) in latent "
                             "pixels or ('percentage', h, w, y, x); set it with Conditioning (Set Area)")
    return tuple(area)


def conds_from_conditioning(conditioning, name: str, width: int | None = None):
    """The engine's conditioning for a CONDITIONING input, checked: the context tensor of a single entry without
    options, else a list of `aura_flow.sampling.conds.Cond` carrying ComfyUI's options."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ParameterError(f"{name}: expected a CONDITIONING (a list of [tensor, options]); connect AuraFlow Text "
                             "Encode or CLIP Text Encode")
    from ..aura_flow.sampling.conds import Cond

    out = []
    for entry in conditioning:
        if not isinstance(entry, (list, tuple)) or not entry:
            raise ParameterError(f"{name}: expected a CONDITIONING entry [tensor, options]; connect AuraFlow Text "
                                 "Encode or CLIP Text Encode")
        tensor, options = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
        if getattr(tensor, "ndim", None) != 3:
            raise ParameterError(f"{name}: the conditioning tensor must be (1, tokens, width), got "
                                 f"{tuple(getattr(tensor, 'shape', ()))}")
        if width is not None and tensor.shape[-1] != width:
            raise ParameterError(f"{name}: the conditioning has width {tensor.shape[-1]} but this AuraFlow model takes "
                                 f"{width} (Pile-T5-XL). Encode the prompt with AuraFlow Text Encode, or with CLIP "
                                 "Text Encode using the CLIP of an AuraFlow checkpoint")
        ignored = [k for k in _IGNORED_OPTIONS if options.get(k) is not None]
        if ignored:
            log.warning("%s: conditioning options %s do not apply to AuraFlow Sampler and are ignored",
                        name, ", ".join(ignored))
        mask = options.get("mask")
        if mask is not None and getattr(mask, "ndim", None) not in (2, 3):
            raise ParameterError(f"{name}: the conditioning mask must be a (height, width) or (batch, height, width) "
                                 f"MASK, got {tuple(getattr(mask, 'shape', ()))}")
        area = options.get("area")
        out.append(Cond(tensor, area=None if area is None else _check_area(area, name),
                        strength=float(options.get("strength", 1.0)), mask=mask,
                        mask_strength=float(options.get("mask_strength", 1.0)),
                        set_area_to_bounds=bool(options.get("set_area_to_bounds", False)),
                        start_percent=options.get("start_percent"), end_percent=options.get("end_percent")))
    return out[0].context if len(out) == 1 and out[0].plain else out
