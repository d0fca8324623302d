"""The ``--backend hosted`` flags of the ``batch`` command (aura_flow/cli/batch.py registers them): the ``remote``
command's service flags, in their own group."""
from __future__ import annotations

HOSTED_DESTS = ("concurrency", "key_file", "timeout", "api_version", "provider", "model")


def hosted_flags(p) -> None:
    from .remote import add_provider_flags, add_service_flags

    g = p.add_argument_group("--backend hosted", "a hosted queue: Segmind's v2 (SEGMIND_API_KEY) or fal's "
                                                 "(--provider fal, FAL_KEY), or a key file; each request id is in "
                                                 "the manifest before its image arrives, so a rerun fetches instead "
                                                 "of paying again")
    add_provider_flags(g)
    add_service_flags(g, timeout=None)
