"""The ``--backend hosted`` flags of the ``batch`` command (aura_flow/cli/batch.py registers them): the ``remote``
command's service flags, in their own group."""
from __future__ import annotations

HOSTED_DESTS = ("concurrency", "key_file", "timeout", "api_version")


def hosted_flags(p) -> None:
    from .remote import add_service_flags

    g = p.add_argument_group("--backend hosted", "the hosted Aura Flow API's v2 queue (needs SEGMIND_API_KEY or a "
                                                 "key file); each request id is in the manifest before its image "
                                                 "arrives, so a rerun fetches instead of paying again")
    add_service_flags(g, timeout=None)
