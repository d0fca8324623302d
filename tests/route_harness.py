"""ComfyUI's server stood in for, so the pack's route handlers run in tests without ComfyUI or aiohttp: a fake
``server.PromptServer.instance.routes`` that records handlers, and a fake ``aiohttp.web.json_response``.

``handlers = register_routes(monkeypatch)`` registers the pack's routes and returns ``{(method, path): handler}``;
``call(handler, query=..., body=...)`` runs one on an event loop and returns ``(status, body)``.
"""
from __future__ import annotations

import asyncio
import json
import sys
import types

from workflow_exec import pack_module


class _Routes:
    def __init__(self):
        self.handlers = {}

    def _add(self, method, path):
        def decorate(fn):
            self.handlers[(method, path)] = fn
            return fn
        return decorate

    def get(self, path):
        return self._add("GET", path)

    def post(self, path):
        return self._add("POST", path)


class Request:
    """What the handlers read of an aiohttp request; ``reads`` counts how often the body was read."""

    def __init__(self, query=None, body: bytes | None = None, content_type="application/json", content_length=None):
        self.rel_url = types.SimpleNamespace(query=dict(query or {}))
        self.content_type = content_type
        self._body = body or b""
        self.content_length = len(self._body) if content_length is None and body is not None else content_length
        self.reads = 0

    async def json(self):
        self.reads += 1
        return json.loads(self._body)


def register_routes(monkeypatch) -> dict:
    routes = _Routes()
    web = types.SimpleNamespace(json_response=lambda body, status=200: (status, json.loads(json.dumps(body))))
    monkeypatch.setitem(sys.modules, "aiohttp", types.SimpleNamespace(web=web))
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(
        PromptServer=types.SimpleNamespace(instance=types.SimpleNamespace(routes=routes))))
    monkeypatch.setattr(pack_module("nodes.comfyui.server"), "_ADDED", set())
    assert pack_module("nodes.routes").register() is True
    return routes.handlers


def call(handler, request: Request):
    return asyncio.run(handler(request))
