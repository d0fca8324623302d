"""Reading the service's answers: an image checked against what was asked, or an error that says what to do, and
rate-limit reset times. Everything the service says is scrubbed of the key, put on one line and bounded."""
from __future__ import annotations

import io
import json
import logging
import re
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from .endpoint import Endpoint
from .errors import RemoteError
from .providers import SEGMIND, Provider
from .results import RemoteImage
from .transport import Response

log = logging.getLogger(__name__)

_ERROR_TEXT_LIMIT = 300  # characters of a service error message shown
_MESSAGE_BYTES = 64 * 1024  # of an error body read for its message (scrubbed whole, then cut)
_KEY_PIECE = 6  # any run of this many characters of the key counts as the key, across whitespace and cuts
_FORMATS = {"WEBP": "webp", "JPEG": "jpg", "PNG": "png"}
_RESET_HEADERS = ("x-ratelimit-reset", "x-rate-limit-reset", "ratelimit-reset", "x-ratelimit-reset-requests",
                  "x-rate-limit-reset-at-utc", "retry-after")


class Answers:
    """Reads answers for one client: ``endpoint`` and ``key_source`` for messages, ``key`` only to scrub it."""

    def __init__(self, endpoint: Endpoint, key: str, key_source: str, provider: Provider = SEGMIND):
        self.endpoint = endpoint
        self._key = key
        self.key_source = key_source
        self.provider = provider

    def scrub(self, text: str) -> str:
        """Service text made safe to show: the key removed in every form (whole, split by whitespace, in pieces,
        its start at the end of a cut text), then one line, then cut to a bounded length."""
        text = " ".join(redact_key(text, self._key).split())
        if len(text) <= _ERROR_TEXT_LIMIT:
            return text
        return redact_key(text[:_ERROR_TEXT_LIMIT], self._key, cut=True) + "…"

    def redacted(self, text: str, limit: int = 4000) -> str:
        """Longer service text kept whole (a prompt fal expanded): the key removed, cut at ``limit`` characters."""
        return redact_key(redact_key(text, self._key)[:limit], self._key, cut=len(text) > limit)

    def holds_key(self, body: bytes) -> bool:
        """Whether ``body`` holds the key or a piece of it (then it is never written anywhere): every piece
        searched in the whole body, and pieces split by whitespace in the first 64 KiB."""
        key = self._key.encode()
        width = min(_KEY_PIECE, len(key))
        if any(key[i:i + width] in body for i in range(len(key) - width + 1)):
            return True
        head = body[:_MESSAGE_BYTES].decode("latin-1")
        return redact_key(head, self._key) != head

    def service_message(self, body: bytes) -> str:
        cut = len(body) > _MESSAGE_BYTES
        text = body[:_MESSAGE_BYTES].decode("utf-8", "replace")
        if cut:  # the key may straddle the cut: its first characters end the text
            text = redact_key(text, self._key, cut=True)
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            for name in ("error", "message", "detail", "msg"):
                if doc.get(name):
                    value = doc[name]
                    if isinstance(value, list) and all(isinstance(v, dict) for v in value):  # fal's 422 details
                        value = "; ".join(_detail(v) for v in value[:8])
                    return self.scrub(value if isinstance(value, str) else json.dumps(value))
        if re.search(r"<\s*(html|!doctype)", text, re.I):
            title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
            return self.scrub(f"an HTML page{': ' + title.group(1) if title else ''}")
        return self.scrub(text) or "(empty body)"

    def fatal(self, resp: Response, index: int, where: str | None = None) -> RemoteError:
        """The error for a status that retrying cannot fix; ``where`` names the URL asked (default: the API's)."""
        s, msg, where = resp.status, self.service_message(resp.body), where or self.endpoint.display
        p = self.provider
        if s in (400, 422):
            text = f"the service rejected the parameters ({s}): {msg}"
        elif s == 401:
            text = (f"the service refused the API key from {self.key_source} (401: missing or invalid): {msg}. "
                    f"Check the key ({p.key_hint}) in {p.key_env} or the key file")
        elif s == 402:
            text = f"not enough credits (402): {msg}. Top up at {p.billing}"
        elif s == 403:
            text = f"the API key is not allowed to use this model (403 forbidden): {msg}"
        elif s == 404:
            text = f"no model or endpoint at {where} (404): {msg}. Check {p.url_env} (default {p.default_url})"
        elif s == 405:
            text = (f"{where} does not accept POST (405 method not allowed; the body was {msg}). {p.url_env} "
                    f"probably points at a web page, not the API; the default is {p.default_url}")
        elif s == 406:
            low = msg.lower()
            if ("content" in low and "type" in low) or "json" in low:
                text = (f"the service refused the request's content type (406): {msg}. The client sends "
                        "application/json; a proxy in between may be rewriting it")
            elif "credit" in low or "balance" in low:
                text = f"not enough credits (406): {msg}. Top up at {p.billing}"
            else:
                text = f"the service refused the request (406 not acceptable: credits or content type): {msg}"
        elif 300 <= s < 400:
            text = (f"{where} redirects ({s}) to {self.scrub(resp.headers.get('location', '(no location)'))}; not "
                    f"followed, so the key goes nowhere else. If the API moved, set {p.url_env} to the new address")
        else:
            text = f"the service answered HTTP {s}: {msg}"
        return RemoteError(text, status=s, index=index, billed=False,
                           request_id=self.scrub(resp.headers["x-request-id"]) if resp.headers.get("x-request-id")
                           else None)

    def _kept(self, body: bytes, index: int) -> tuple[bytes | None, str]:
        """The bytes of a billed answer to keep for the user, and a note: none when they hold the key."""
        if self.holds_key(body):
            log.warning("image %d: the service's answer holds the API key; its bytes are not kept", index + 1)
            return None, " (its bytes hold the API key, so they are not kept)"
        return body, ""

    def decode(self, resp: Response, params: dict, index: int, seed: int | None) -> RemoteImage:
        """The image in ``resp``, checked against ``params``' size and format (those that are not None)."""
        from PIL import Image, UnidentifiedImageError

        ctype = resp.headers.get("content-type", "")
        rid = self.scrub(resp.headers["x-request-id"]) if resp.headers.get("x-request-id") else None
        billed_note = (f"; a 200 is billed: report it to {self.provider.label} support with request id "
                       f"{rid or '(none)'}")
        kept, kept_note = self._kept(resp.body, index)
        try:
            img = Image.open(io.BytesIO(resp.body))
            fmt = _FORMATS.get(img.format or "")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
            img, fmt = None, None
        if img is None or fmt is None:
            raise RemoteError(f"the service answered 200 but the body is not an image (content type "
                              f"{self.scrub(ctype) or 'none'}, {len(resp.body):,} bytes, starting "
                              f"{self.scrub(repr(resp.body[:16]))}){billed_note}{kept_note}",
                              status=200, index=index, billed=True, data=kept, request_id=rid)
        if params.get("width") is not None and img.size != (params["width"], params["height"]):
            raise RemoteError(f"the service returned a {img.size[0]}x{img.size[1]} {fmt} image, but "
                              f"{params['width']}x{params['height']} was asked "
                              + ("(a 200 is billed, so the bytes are kept apart" if kept is not None else
                                 "(a 200 is billed; its bytes hold the API key, so they are not kept")
                              + (f"; request id {rid})" if rid else ")"),
                              status=200, index=index, billed=True, data=kept, request_id=rid)
        try:
            img.load()
            rgb = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise RemoteError(f"the service's {fmt} image is damaged ({exc.__class__.__name__}: "
                              f"{self.scrub(str(exc))}){billed_note}{kept_note}",
                              status=200, index=index, billed=True, data=kept, request_id=rid) from None
        data = resp.body
        if kept is None:  # the image is good, but its file carries the key (metadata): only its pixels are kept
            from ..images import encode_image

            data = encode_image(rgb, fmt, params.get("output_quality", 80))
        if params.get("output_format") is not None and fmt != params["output_format"]:
            log.warning("image %d: asked for %s, the service sent %s; kept as sent", index + 1,
                        params["output_format"], fmt)
        accounting = {k: self.scrub(v) for k, v in resp.headers.items()
                      if k in ("x-remaining-credits", "x-seed-value", "x-generation-time", "x-cost",
                               "x-request-id")}
        try:
            used_seed = int(accounting["x-seed-value"]) if "x-seed-value" in accounting else seed
        except ValueError:
            used_seed = seed
        return RemoteImage(index, used_seed, data, fmt, img.size[0], img.size[1], rgb, accounting)

    def reset_delay(self, headers: dict) -> float | None:
        for name in _RESET_HEADERS:
            value = (headers.get(name) or "").strip()
            if not value:
                continue
            try:
                number = float(value)
            except ValueError:
                try:
                    return parsedate_to_datetime(value).timestamp() - time.time()
                except (TypeError, ValueError):
                    pass
                try:  # ISO 8601 (x-rate-limit-reset-at-utc); without a zone it is UTC
                    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
                except ValueError:
                    continue
                if when.tzinfo is None:
                    when = when.replace(tzinfo=timezone.utc)
                return when.timestamp() - time.time()
            if number > 1e12:  # epoch milliseconds
                return number / 1000.0 - time.time()
            if number > 1e9:  # epoch seconds
                return number - time.time()
            return number  # seconds from now
        return None


def _detail(item: dict) -> str:
    """One entry of a validation error's ``detail`` list: ``field: message``."""
    loc = item.get("loc")
    field = ".".join(str(x) for x in loc if x != "body") if isinstance(loc, list) else ""
    msg = item.get("msg") or item.get("message") or json.dumps(item)[:200]
    return f"{field}: {msg}" if field else str(msg)


def redact_key(text: str, key: str, *, cut: bool = False) -> str:
    """``text`` with every run of `_KEY_PIECE` or more characters of ``key`` replaced by ``***``, also where
    whitespace splits it; with ``cut``, a text cut off inside the key loses the key's first characters at its end."""
    if not key or not text:
        return text
    width = min(_KEY_PIECE, len(key))
    pieces = {key[i:i + width] for i in range(len(key) - width + 1)}
    where = [i for i, c in enumerate(text) if not c.isspace()]  # the text without whitespace, mapped back
    dense = "".join(text[i] for i in where)
    hide = bytearray(len(text))
    for j in range(len(dense) - width + 1):
        if dense[j:j + width] in pieces:
            for i in where[j:j + width]:
                hide[i] = 1
    if cut:
        for n in range(min(len(key), len(dense)), 3, -1):  # 4 characters and more: shorter is no secret
            if dense.endswith(key[:n]):
                for i in where[len(dense) - n:]:
                    hide[i] = 1
                break
    if not any(hide):
        return text
    out, i = [], 0
    while i < len(text):
        if hide[i]:
            while i < len(text) and (hide[i] or (text[i].isspace() and i + 1 < len(text) and hide[i + 1])):
                i += 1
            out.append("***")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
