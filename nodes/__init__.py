"""The pack's ComfyUI nodes: one table, from which NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS are built.

Ids are stable once shipped (saved workflows name them); display names may change. Node modules are torch-free
at import time, so loading the pack stays fast.
"""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

# (node id, module, class, display name), in menu order
NODES = (
    ("AuraFlowLoader", "loading", "AuraFlowLoader", "AuraFlow Loader"),
    ("AuraFlowTextEncode", "conditioning", "AuraFlowTextEncode", "AuraFlow Text Encode"),
    ("AuraFlowSampler", "sampling", "AuraFlowSampler", "AuraFlow Sampler"),
    ("AuraFlowGenerate", "generate", "AuraFlowGenerate", "AuraFlow Generate"),
    ("AuraFlowRemoteGenerate", "remote", "AuraFlowRemoteGenerate", "AuraFlow Remote Generate"),
    ("AuraFlowVAEDecode", "vae", "AuraFlowVAEDecode", "AuraFlow VAE Decode"),
    ("AuraFlowVAEEncode", "vae", "AuraFlowVAEEncode", "AuraFlow VAE Encode"),
    ("AuraFlowSaveImage", "saving", "AuraFlowSaveImage", "AuraFlow Save Image"),
)


def _build():
    classes, names = {}, {}
    for node_id, module_name, class_name, display in NODES:
        qualified = f"{__name__}.{module_name}"
        try:
            module = importlib.import_module(qualified)
        except ModuleNotFoundError as exc:
            if exc.name != qualified:
                raise
            log.warning("AuraFlow: node module %s.py is missing; %s is not available", module_name, node_id)
            continue
        classes[node_id] = getattr(module, class_name)
        names[node_id] = display
    return classes, names


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _build()

__all__ = ["NODES", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
