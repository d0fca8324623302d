"""The ``auraflow`` record of a run (files and hashes, dtype, speed, noise device, LoRAs, version: see
aura_flow/provenance.py) carried from the node that ran the model to AuraFlow Save Image.

It travels on the output tensors themselves: the sampler's LATENT samples, then the IMAGE the AuraFlow VAE decodes
from them (ComfyUI's own VAE Decode calls that VAE with the very tensor), or AuraFlow Generate's IMAGE. A node
that makes new tensors (a resize, a batch join) drops it, and the image is then saved without it.
"""
from __future__ import annotations

ATTRIBUTE = "_auraflow_record"
# AuraFlow Generate's checked parameters (prompt, seed, ...), saved as ``parameters`` as the command line saves them:
# with a list node upstream (AuraFlow Prompt List) the workflow alone no longer says which prompt made which image
PARAMETERS = "_auraflow_parameters"
# AuraFlow Remote Generate's request record (seeds, request ids): the prompt's EXTRA_PNGINFO is one dict shared by
# all its nodes, so with several remote nodes only the tensor says which record belongs to which image
REMOTE = "_auraflow_remote"
REMOTE_KEY = "auraflow_remote"  # that record's key in the saved images' metadata


def attach(tensor, record, parameters=None, remote=None):
    """``tensor`` carrying ``record``, ``parameters`` and ``remote`` (nothing is attached for None); returns it."""
    for name, value in ((ATTRIBUTE, record), (PARAMETERS, parameters), (REMOTE, remote)):
        if value is not None:
            try:
                setattr(tensor, name, value)
            except (AttributeError, TypeError):  # not a torch tensor (a test's stand-in): nothing to carry
                pass
    return tensor


def record_of(tensor) -> dict | None:
    return getattr(tensor, ATTRIBUTE, None)


def parameters_of(tensor) -> dict | None:
    return getattr(tensor, PARAMETERS, None)


def remote_of(tensor) -> dict | None:
    return getattr(tensor, REMOTE, None)
