"""Every HTTP route the pack adds to ComfyUI's server, registered in one place (`register`, called by the pack's
``__init__``); the logic is plain functions, testable without ComfyUI.

- ``GET /auraflow/sigmas?scheduler=normal&steps=25&shift=1.73&denoise=1&sampler=uni_pc`` answers
  ``{"sigmas": [...]}``: exactly the schedule the AuraFlow Sampler will run with those settings (the editor draws it
  on the node, web/auraflow.js), or HTTP 400 with ``{"error": "<which parameter, what is allowed>"}``. The work is
  bounded (at most `MAX_SCHEDULE_STEPS` sigmas) and runs off ComfyUI's event loop.
- ``GET /auraflow/remote/key`` answers ``{"configured": bool, "source": "environment" | "file" | null,
  "path": "<key file>", "env": "SEGMIND_API_KEY", "providers": {"segmind": {...the same...}, "fal": {...}}}`` —
  never a key. ``POST /auraflow/remote/key`` with a JSON body ``{"key": "...", "provider": "segmind" | "fal"}``
  (provider default segmind) writes ``<ComfyUI user dir>/auraflow/segmind_api_key`` or ``fal_key`` (owner-only
  permissions); ``{"key": ""}`` deletes it (the editor's "Set remote API key" dialog, web/remote_key.js). The key
  file sits beside ComfyUI's per-user folders, not in one, so /userdata never serves it, and the key never passes
  through ComfyUI's settings.
"""
from __future__ import annotations

import logging
import math
import os

from ..aura_flow import remote
from ..aura_flow.errors import ParameterError
from ..aura_flow.params import DEFAULTS as _NODE_DEFAULTS
from ..aura_flow.params import shown
from .comfyui import folders
from .comfyui.server import add_routes

log = logging.getLogger(__name__)

SIGMAS_ROUTE = "/auraflow/sigmas"
KEY_ROUTE = "/auraflow/remote/key"
KEY_BODY_LIMIT = 4096  # bytes of a POST to the key route: {"key": "SG_..."} is about 40
ROUTE = SIGMAS_ROUTE  # the sigma route's old name
# a parameter left out takes the sampler node's default; no sampler means none that drops the penultimate sigma
DEFAULTS = {"scheduler": _NODE_DEFAULTS["scheduler"], "steps": _NODE_DEFAULTS["steps"],
            "shift": _NODE_DEFAULTS["shift"], "denoise": 1.0, "sampler": None}


# ------------------------------------------------------------------------------------------------ sigmas
def _number(query: dict, name: str, kind: type):
    text = query.get(name)
    if text is None or text == "":
        return DEFAULTS[name]
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={shown(text)} is not a number (e.g. {name}={DEFAULTS[name]})") from None
    if kind is int:
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{name}={shown(text)} is not a whole number (e.g. {name}={DEFAULTS[name]})")
        return int(value)
    return value


def sigmas_response(query: dict) -> tuple[int, dict]:
    """(HTTP status, JSON body) for the query parameters of ``GET /auraflow/sigmas``.

    Missing parameters take the sampler node's defaults (normal, 25 steps, shift 1.73, denoise 1, no sampler).
    Every parameter error is a 400 whose ``error`` names the parameter, the value and what is allowed.
    """
    try:
        steps = _number(query, "steps", int)
        shift = _number(query, "shift", float)
        denoise = _number(query, "denoise", float)
    except ValueError as exc:
        return 400, {"error": str(exc)}
    scheduler = query.get("scheduler") or DEFAULTS["scheduler"]
    sampler = query.get("sampler") or None
    from ..aura_flow.plan import sigmas  # imports torch: on the first request, not when the pack loads

    try:
        values = [float(v) for v in sigmas(scheduler, steps, shift=shift, denoise=denoise, sampler=sampler).tolist()]
    except ParameterError as exc:
        return 400, {"error": str(exc)}
    if not all(math.isfinite(v) for v in values):  # JSON has no NaN; say so rather than send invalid JSON
        return 400, {"error": f"scheduler={scheduler!r} gives no usable schedule for these settings"}
    return 200, {"sigmas": values}


# ------------------------------------------------------------------------------------------------ the API key
def key_file_path(provider=None):
    """The provider's key file (default Segmind): ``$AURAFLOW_SEGMIND_KEY_FILE`` (``$AURAFLOW_FAL_KEY_FILE``) if
    set, else ``<ComfyUI user dir>/auraflow/segmind_api_key`` (``fal_key``) inside ComfyUI, else the command line's
    ``~/.config/auraflow/...``."""
    p = remote.get_provider(provider)
    user = folders.user_directory()
    if user is None or os.environ.get(p.key_file_env):
        return remote.default_key_file(p)
    return remote.comfyui_key_file(user, p)


def key_status(provider=None) -> dict:
    """Whether the provider's key (default Segmind) is configured, where from, and where its file is."""
    p = remote.get_provider(provider)
    path = key_file_path(p)
    if os.environ.get(p.key_env, "").strip():
        source = "environment"
    elif path.is_file() and path.stat().st_size > 0:
        source = "file"
    else:
        source = None
    return {"configured": source is not None, "source": source, "path": str(path), "env": p.key_env}


def all_key_status() -> dict:
    """The route's answer: Segmind's status at the top level (as before), every provider's under ``providers``."""
    return {**key_status(), "providers": {name: key_status(name) for name in remote.PROVIDER_NAMES}}


def save_key_response(body) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a POST: writes or deletes the key file; the answer never holds the key."""
    if not isinstance(body, dict) or not isinstance(body.get("key"), str):
        return 400, {"error": 'send JSON {"key": "...", "provider": "segmind" or "fal"}, or {"key": ""} to delete '
                              "the key file"}
    try:
        provider = remote.get_provider(body.get("provider"))
    except ParameterError as exc:
        return 400, {"error": str(exc)}
    try:
        path = remote.save_api_key(body["key"], key_file_path(provider), provider)
    except remote.RemoteError as exc:  # its message names the problem, never the key
        return 400, {"error": str(exc)}
    except OSError as exc:
        return 500, {"error": f"could not write the key file: {exc.__class__.__name__}: {exc.strerror or ''}"}
    log.info("AuraFlow: %s API key %s %s", provider.label, "saved to" if body["key"].strip() else "removed from",
             path)
    return 200, all_key_status()


# ------------------------------------------------------------------------------------------------ registration
def register() -> bool:
    """Add every route to ComfyUI's server; False (and nothing done) outside a running ComfyUI."""

    def add_sigmas(web, routes):
        @routes.get(SIGMAS_ROUTE)
        async def auraflow_sigmas(request):
            import asyncio

            query = dict(request.rel_url.query)
            # off the event loop: the first call imports torch, and a schedule is up to MAX_SCHEDULE_STEPS values
            status, body = await asyncio.get_running_loop().run_in_executor(None, sigmas_response, query)
            return web.json_response(body, status=status)

    def add_key(web, routes):
        @routes.get(KEY_ROUTE)
        async def auraflow_remote_key_status(request):
            return web.json_response(all_key_status())

        @routes.post(KEY_ROUTE)
        async def auraflow_remote_key_save(request):
            if request.content_type != "application/json":  # a plain HTML form cannot post JSON cross-site
                return web.json_response({"error": "send Content-Type: application/json"}, status=415)
            if request.content_length is None or request.content_length > KEY_BODY_LIMIT:  # before reading it
                return web.json_response({"error": f'send JSON {{"key": "SG_..."}} of at most {KEY_BODY_LIMIT} bytes '
                                                   "with a Content-Length"}, status=413)
            try:
                body = await request.json()
            except ValueError:
                body = None
            status, answer = save_key_response(body)
            return web.json_response(answer, status=status)

    return add_routes(SIGMAS_ROUTE, add_sigmas) & add_routes(KEY_ROUTE, add_key)
