"""AuraFlow Loader: one node that reads any checkpoint layout and hands out the model, its text encoder and a VAE."""
from __future__ import annotations

import logging

from ..aura_flow.params import DTYPES
from .comfyui import devices, folders, memory
from .conditioning import TextEncoder
from .vae import AuraFlowVAE
from .words import check_text, node_words

log = logging.getLogger(__name__)

FROM_CHECKPOINT = "(from checkpoint)"
MODEL_FOLDERS = folders.CHECKPOINT_FOLDERS + (folders.GGUF_FOLDER,)  # where a checkpoint name is looked up


def _checkpoint_names() -> list[str]:
    names = []
    for folder in folders.CHECKPOINT_FOLDERS:
        names += folders.model_names(folder)
    return sorted(set(names) | set(folders.gguf_names())) + folders.diffusers_names()


class AuraFlowLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": (_checkpoint_names(), {
                    "tooltip": "The AuraFlow model: an all-in-one .safetensors (models/checkpoints), a transformer-only "
                               ".safetensors or .gguf (models/diffusion_models or models/unet; Pony V7 too), or a "
                               "diffusers folder with model_index.json (models/diffusers)."}),
                "text_encoder": ([FROM_CHECKPOINT] + folders.model_names("text_encoders"), {
                    "default": FROM_CHECKPOINT,
                    "tooltip": "Pile-T5-XL text encoder from models/text_encoders; needed when the checkpoint has "
                               "none (transformer-only files)."}),
                "vae": ([FROM_CHECKPOINT] + folders.model_names("vae"), {
                    "default": FROM_CHECKPOINT,
                    "tooltip": "SDXL VAE from models/vae; needed when the checkpoint has none."}),
                "tokenizer": ([FROM_CHECKPOINT] + folders.tokenizer_names(), {
                    "default": FROM_CHECKPOINT,
                    "tooltip": "Pile-T5 tokenizer (tokenizer.model or tokenizer.json under models/text_encoders). "
                               "By default the checkpoint's own, one beside the file, or the one ComfyUI ships."}),
                "weight_dtype": (list(DTYPES), {
                    "default": "auto",
                    "tooltip": "Weight precision of the transformer and text encoder. auto: what ComfyUI picks for "
                               "this GPU (bf16 or fp16); fp8 halves the memory and computes in bf16/fp16. "
                               "The VAE always runs in fp32."}),
            }
        }

    RETURN_TYPES = ("AURAFLOW_MODEL", "AURAFLOW_TEXT_ENCODER", "VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The AuraFlow transformer, for AuraFlow Sampler and AuraFlow Generate.",
                       "The Pile-T5-XL text encoder, for AuraFlow Text Encode.",
                       "The SDXL VAE; works with ComfyUI's VAE Decode / VAE Encode and the AuraFlow VAE nodes.")
    FUNCTION = "load"
    CATEGORY = "AuraFlow/loaders"
    DESCRIPTION = "Loads AuraFlow (or Pony V7) from a diffusers folder, an all-in-one file or a transformer-only file."
    SEARCH_ALIASES = ["aura flow", "pony", "pony v7", "gguf", "fp8", "checkpoint loader", "diffusers"]

    def load(self, checkpoint, text_encoder=FROM_CHECKPOINT, vae=FROM_CHECKPOINT, tokenizer=FROM_CHECKPOINT,
             weight_dtype="auto"):
        pick = "pick a file in the list (press R in the editor to refresh it)"
        check_text("checkpoint", checkpoint, pick)
        for name, value in (("text_encoder", text_encoder), ("vae", vae), ("tokenizer", tokenizer)):
            if value is not None:  # None: from the checkpoint, as the default
                check_text(name, value, f"{pick}, or {FROM_CHECKPOINT!r}")
        ckpt = folders.resolve_model(checkpoint, MODEL_FOLDERS, what="checkpoint", diffusers=True)

        def optional(name, folder, what, **kw):
            if name in (None, "", FROM_CHECKPOINT):
                return None
            return folders.resolve_model(name, (folder,), what=what, **kw)

        from ..aura_flow.pipeline.pipeline import load  # torch: when the node runs, not when the pack loads

        device, auto_dtype = devices.load_placement()
        with node_words({"dtype": "weight_dtype"}):
            pipeline = load(
                ckpt,
                text_encoder=optional(text_encoder, "text_encoders", "text encoder"),
                vae=optional(vae, "vae", "VAE"),
                tokenizer=optional(tokenizer, "text_encoders", "tokenizer", tokenizer=True),
                dtype=auto_dtype if weight_dtype == "auto" else weight_dtype,
                device=device,
                # inside ComfyUI its memory manager places every part (nodes/comfyui/memory.py)
                offload_text_encoder=False if memory.managed() else "auto",
            )
        return (pipeline, TextEncoder(pipeline), AuraFlowVAE(pipeline))
