"""Adding HTTP routes to ComfyUI's server, once per path, only while its server runs."""
from __future__ import annotations

import logging


log = logging.getLogger(__name__)

_ADDED: set[str] = set()


def add_routes(path: str, add) -> bool:
    """Call ``add(aiohttp.web, PromptServer.instance.routes)`` once per ``path`` inside a running ComfyUI.

    True when the routes are (or already were) added; False, and nothing done, in tests, tools, or ComfyUI's
    modules imported without its server started.
    """
    if path in _ADDED:
        return True
    try:
        import server
    except ImportError:
        return False
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    from aiohttp import web

    add(web, instance.routes)
    _ADDED.add(path)
    log.debug("AuraFlow: added %s", path)
    return True
