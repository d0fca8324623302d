"""Where a v2 result keeps its image: the ``output`` field (always present, in several shapes), else ``images``.

Shapes seen in the provider's docs and SDK: a media URL string; a list of them; the same JSON-stringified
(``"[\\"https://...\\"]"``); objects with a ``url`` (``images: [{"url": ..., "content_type": ...}]``); a
``data:image/...;base64,`` URI; bare base64 of the image bytes. Each source is ``("url", text)`` or
``("data", bytes)``; nothing here touches the network.
"""
from __future__ import annotations

import base64
import binascii
import json

from ..images import image_extension

_URL_KEYS = ("url", "image_url", "image", "images", "output", "data")
_MAX_DEPTH = 4


def media_sources(doc: dict) -> list[tuple[str, object]]:
    """The image sources a result names, in order: ``output`` first, then ``images`` / ``image``."""
    found: list[tuple[str, object]] = []
    _collect(doc.get("output"), found, 0)
    if not found:
        for key in ("images", "image", "image_url"):
            _collect(doc.get(key), found, 0)
    return found


def _collect(value, found: list, depth: int) -> None:
    if depth > _MAX_DEPTH or value is None:
        return
    if isinstance(value, list):
        for item in value:
            _collect(item, found, depth + 1)
    elif isinstance(value, dict):
        for key in _URL_KEYS:
            if key in value:
                _collect(value[key], found, depth + 1)
                return
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:"):
            found.append(("data", _data_uri(text)))
        elif "://" in text and not text.startswith(("[", "{", '"')):
            found.append(("url", text))
        elif text[:1] in ("[", "{", '"'):
            try:
                _collect(json.loads(text), found, depth + 1)
            except ValueError:
                pass
        else:
            data = _base64_image(text)
            if data is not None:
                found.append(("data", data))


def _data_uri(text: str) -> bytes:
    head, sep, payload = text.partition(",")
    if not sep or ";base64" not in head:
        raise ValueError("a data: URI without base64 content")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a data: URI whose base64 content does not decode") from None


def _base64_image(text: str) -> bytes | None:
    """Bare base64 text when it decodes to image bytes (PNG, JPEG, WebP), else None."""
    if len(text) < 16:
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if image_extension(data) != "bin" else None


def describe(doc: dict, scrub) -> str:
    """A short, scrubbed account of an answer (its ``output``, its field names), for an error message."""
    fields = f"fields {sorted(doc)[:12]}"
    if "output" not in doc:
        return scrub(fields)
    output = doc["output"]
    text = output if isinstance(output, str) else json.dumps(output)[:200]
    return scrub(f"output {text[:120]!r}; {fields}")
