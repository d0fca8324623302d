"""The pack's ComfyUI nodes: one table, from which NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS are built.

Ids are stable once shipped (saved workflows name them); display names may change. Node modules are torch-free
at import time, so loading the pack stays fast. ComfyUI itself is reached only through nodes/comfyui/.
"""
from __future__ import annotations

from .conditioning import AuraFlowTextEncode
from .generate import AuraFlowGenerate
from .loading import AuraFlowLoader
from .lora import AuraFlowLoraLoader
from .prompt_list import AuraFlowPromptList
from .remote import AuraFlowRemoteGenerate
from .sampling import AuraFlowSampler
from .saving import AuraFlowSaveImage
from .vae import AuraFlowVAEDecode, AuraFlowVAEEncode

# (node id, class, display name), in menu order
NODES = (
    ("AuraFlowLoader", AuraFlowLoader, "AuraFlow Loader"),
    ("AuraFlowLoraLoader", AuraFlowLoraLoader, "AuraFlow LoRA Loader"),
    ("AuraFlowTextEncode", AuraFlowTextEncode, "AuraFlow Text Encode"),
    ("AuraFlowSampler", AuraFlowSampler, "AuraFlow Sampler"),
    ("AuraFlowGenerate", AuraFlowGenerate, "AuraFlow Generate"),
    ("AuraFlowRemoteGenerate", AuraFlowRemoteGenerate, "AuraFlow Remote Generate"),
    ("AuraFlowVAEDecode", AuraFlowVAEDecode, "AuraFlow VAE Decode"),
    ("AuraFlowVAEEncode", AuraFlowVAEEncode, "AuraFlow VAE Encode"),
    ("AuraFlowSaveImage", AuraFlowSaveImage, "AuraFlow Save Image"),
    ("AuraFlowPromptList", AuraFlowPromptList, "AuraFlow Prompt List"),
)

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, cls, _display in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: display for node_id, _cls, display in NODES}

__all__ = ["NODES", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
