"""HTTP routes the pack adds to ComfyUI's server.

``GET /auraflow/sigmas?scheduler=normal&steps=25&shift=1.73&denoise=1&sampler=uni_pc`` answers
``{"sigmas": [...]}``: exactly the schedule the AuraFlow Sampler will run with those settings (the editor draws it
on the node, web/auraflow.js), or HTTP 400 with ``{"error": "<which parameter, what is allowed>"}``.

The logic is the plain function `sigmas_response`, testable without ComfyUI; `register()` adds the route to
``server.PromptServer.instance.routes`` only when ComfyUI's server is running (the pack's ``__init__`` calls it).
"""
from __future__ import annotations

import logging
import math

from .comfy_compat import add_routes

try:  # inside the ComfyUI pack
    from ..aura_flow.params import DEFAULTS as _NODE_DEFAULTS, ParameterError

    _IN_PACK = True
except ImportError:  # imported from the repository root (tests, tools)
    from aura_flow.params import DEFAULTS as _NODE_DEFAULTS, ParameterError

    _IN_PACK = False

log = logging.getLogger(__name__)

ROUTE = "/auraflow/sigmas"
# a parameter left out takes the sampler node's default; no sampler means none that drops the penultimate sigma
DEFAULTS = {"scheduler": _NODE_DEFAULTS["scheduler"], "steps": _NODE_DEFAULTS["steps"],
            "shift": _NODE_DEFAULTS["shift"], "denoise": 1.0, "sampler": None}


def _number(query: dict, name: str, kind: type):
    text = query.get(name)
    if text is None or text == "":
        return DEFAULTS[name]
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={text!r} is not a number (e.g. {name}={DEFAULTS[name]})") from None
    if kind is int:
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{name}={text!r} is not a whole number (e.g. {name}={DEFAULTS[name]})")
        return int(value)
    return value


def _engine_sigmas():
    """The engine's ``sigmas`` (imports torch, so only on the first request, not when the pack loads)."""
    if _IN_PACK:
        from ..aura_flow.sampling.schedules import sigmas
    else:
        from aura_flow.sampling.schedules import sigmas
    return sigmas


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
    try:
        values = _engine_sigmas()(scheduler, steps, shift=shift, denoise=denoise, sampler=sampler)
    except ParameterError as exc:
        return 400, {"error": str(exc)}
    return 200, {"sigmas": [float(v) for v in values.tolist()]}


def register() -> bool:
    """Add the route to ComfyUI's server; False (and nothing done) outside a running ComfyUI."""

    def add(web, routes):
        @routes.get(ROUTE)
        async def auraflow_sigmas(request):
            status, body = sigmas_response(dict(request.rel_url.query))
            return web.json_response(body, status=status)

    return add_routes(ROUTE, add)
