"""The ``auraflow`` record of a run (files and hashes, dtype, speed, noise device, LoRAs, version: see
aura_flow/provenance.py) carried from the node that ran the model to AuraFlow Save Image.

It travels on the output tensors themselves: the sampler's LATENT samples, then the IMAGE the AuraFlow VAE decodes
from them (ComfyUI's own VAE Decode calls that VAE with the very tensor), or AuraFlow Generate's IMAGE. A node
that makes new tensors (a resize, a batch join) drops it, and the image is then saved without it.
"""
from __future__ import annotations

ATTRIBUTE = "_auraflow_record"


def attach(tensor, record):
    """``tensor`` carrying ``record`` (nothing is attached for None); returns the tensor."""
    if record is not None:
        try:
            setattr(tensor, ATTRIBUTE, record)
        except (AttributeError, TypeError):  # not a torch tensor (a test's stand-in): nothing to carry
            pass
    return tensor


def record_of(tensor) -> dict | None:
    return getattr(tensor, ATTRIBUTE, None)
