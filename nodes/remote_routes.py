"""The route behind the editor's "Segmind API key" dialog (web/remote_key.js): it writes the key file, never reads it.

``GET /auraflow/remote/key`` answers ``{"configured": bool, "source": "environment" | "file" | null,
"path": "<key file>"}`` — never the key. ``POST /auraflow/remote/key`` with a JSON body ``{"key": "SG_..."}``
writes ``<ComfyUI user dir>/auraflow/segmind_api_key`` (owner-only permissions); ``{"key": ""}`` deletes it. The
key file sits beside ComfyUI's per-user folders, not in one, so /userdata never serves it, and the key never
passes through ComfyUI's settings (which are stored and served in plain text).

The logic is plain functions testable without ComfyUI; `register()` adds the routes only when ComfyUI's server
is running.
"""
from __future__ import annotations

import logging
import os

from .comfy_compat import add_routes, engine_module

log = logging.getLogger(__name__)

ROUTE = "/auraflow/remote/key"


def key_file_path():
    """``$AURAFLOW_SEGMIND_KEY_FILE`` if set, else ``<ComfyUI user dir>/auraflow/segmind_api_key`` inside ComfyUI,
    else the command line's ``~/.config/auraflow/segmind_api_key``."""
    remote = engine_module("remote")
    try:
        import folder_paths
    except ImportError:
        folder_paths = None
    if folder_paths is None or os.environ.get(remote.KEY_FILE_ENV):
        return remote.default_key_file()
    return remote.comfyui_key_file(folder_paths.get_user_directory())


def key_status() -> dict:
    remote = engine_module("remote")
    path = key_file_path()
    if os.environ.get(remote.API_KEY_ENV, "").strip():
        source = "environment"
    elif path.is_file() and path.stat().st_size > 0:
        source = "file"
    else:
        source = None
    return {"configured": source is not None, "source": source, "path": str(path), "env": remote.API_KEY_ENV}


def save_key_response(body) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a POST: writes or deletes the key file; the answer never holds the key."""
    remote = engine_module("remote")
    if not isinstance(body, dict) or not isinstance(body.get("key"), str):
        return 400, {"error": 'send JSON {"key": "SG_..."}, or {"key": ""} to delete the key file'}
    try:
        path = remote.save_api_key(body["key"], key_file_path())
    except remote.RemoteError as exc:  # its message names the problem, never the key
        return 400, {"error": str(exc)}
    except OSError as exc:
        return 500, {"error": f"could not write the key file: {exc.__class__.__name__}: {exc.strerror or ''}"}
    log.info("AuraFlow: Segmind API key %s %s", "saved to" if body["key"].strip() else "removed from", path)
    return 200, key_status()


def register() -> bool:
    """Add the routes to ComfyUI's server; False (and nothing done) outside a running ComfyUI."""

    def add(web, routes):
        @routes.get(ROUTE)
        async def auraflow_remote_key_status(request):
            return web.json_response(key_status())

        @routes.post(ROUTE)
        async def auraflow_remote_key_save(request):
            if request.content_type != "application/json":  # a plain HTML form cannot post JSON cross-site
                return web.json_response({"error": "send Content-Type: application/json"}, status=415)
            try:
                body = await request.json()
            except ValueError:
                body = None
            status, answer = save_key_response(body)
            return web.json_response(answer, status=status)

    return add_routes(ROUTE, add)
