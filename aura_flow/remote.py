"""Client for the hosted Aura Flow API (Segmind): ``POST /v1/aura-flow`` with a JSON body, raw image bytes back.

Standard library HTTP only (http.client), no ComfyUI imports. The API key is read from ``SEGMIND_API_KEY`` or a
key file (see `resolve_api_key`) and lives only in the request header: it is never logged, never put in an
exception message, and scrubbed from anything the service echoes back.

One request returns one image ("Returns: Image" in the service's docs), so ``number_of_images = N`` becomes N
requests with ``number_of_images = 1`` and seeds ``seed, seed+1, ...`` (mod 2**64); image ``i`` is reproduced by
asking for one image with seed ``seed+i``. They run on a small thread pool (2 at a time by default: the free
tier allows 5 requests a minute and a generation takes about 80 s). Every image that arrived is kept when a later
one fails; `RemoteResult.failures` says which failed and why.

Retries: 429 waits for the reset time the service names (bounded) and retries; 408/5xx, refused connections and
dropped connections retry with exponential backoff and jitter (bounded). Only a 200 is billed, but a dropped
connection, a 504 or a timeout may hide a generation that finished and was billed: those are said in the log,
and a total timeout is not retried at all, so one generation is never paid for twice silently.
"""
from __future__ import annotations

import http.client
import ipaddress
import io
import json
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from .params import MAX_SEED, validate_generation

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.segmind.com/v1/aura-flow"
API_KEY_ENV = "SEGMIND_API_KEY"
API_URL_ENV = "SEGMIND_API_URL"
KEY_FILE_ENV = "AURAFLOW_SEGMIND_KEY_FILE"
KEY_FILE_NAME = "segmind_api_key"
KEY_FILE_SUBDIR = "auraflow"  # <ComfyUI user dir>/auraflow/segmind_api_key, ~/.config/auraflow/segmind_api_key

# The largest body accepted: a 2048x2048 PNG of noise is about 12.6 MB.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_ERROR_TEXT_LIMIT = 300  # characters of a service error message shown
_FORMATS = {"WEBP": "webp", "JPEG": "jpg", "PNG": "png"}
_RESET_HEADERS = ("x-ratelimit-reset", "x-rate-limit-reset", "ratelimit-reset", "x-ratelimit-reset-requests",
                  "retry-after")


class RemoteError(RuntimeError):
    """The hosted API could not deliver. The message says what happened and what to do; never contains the key.

    ``status`` is the HTTP status (None for network faults), ``index`` the image of a batch it concerns,
    ``billed`` True/False/None (unknown), ``data`` the body bytes of an image that arrived but was rejected.
    Raised by `RemoteClient.generate`, it carries the whole call's `RemoteResult` as ``result`` (its
    ``failures`` hold every image's error, with their ``data``).
    """

    result = None

    def __init__(self, message, *, status=None, index=None, billed=False, data=None):
        super().__init__(message)
        self.status = status
        self.index = index
        self.billed = billed
        self.data = data


class MissingKeyError(RemoteError):
    """No API key in the environment or the key file."""


class RemoteTimeout(RemoteError):
    """The service did not answer within the total timeout (the generation may still finish and be billed)."""


class RemoteInterrupted(RemoteError):
    """``should_stop()`` turned true. ``result`` holds the images that had already arrived."""

    def __init__(self, message, result=None):
        super().__init__(message, billed=None)
        self.result = result


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying after ``delay`` seconds (None: use the backoff)."""

    def __init__(self, error: RemoteError, delay: float | None = None, rate_limited: bool = False):
        super().__init__(str(error))
        self.error = error
        self.delay = delay
        self.rate_limited = rate_limited


class _Cancelled(Exception):
    """Internal: the whole call is being cancelled (interrupt or an earlier fatal error)."""


# ----------------------------------------------------------------------------------------------- key and URL


def default_key_file() -> Path:
    """The key file used outside ComfyUI: ``$AURAFLOW_SEGMIND_KEY_FILE`` or
    ``$XDG_CONFIG_HOME/auraflow/segmind_api_key`` (``~/.config/auraflow/segmind_api_key``)."""
    given = os.environ.get(KEY_FILE_ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / KEY_FILE_SUBDIR / KEY_FILE_NAME


def comfyui_key_file(user_dir) -> Path:
    """The key file inside ComfyUI: ``<ComfyUI user dir>/auraflow/segmind_api_key`` (``ComfyUI/user/...``).

    It sits beside the per-user folders (``user/default``), so ComfyUI's /userdata routes do not serve it.
    """
    return Path(user_dir) / KEY_FILE_SUBDIR / KEY_FILE_NAME


def _clean_key(raw: str, source: str) -> str:
    key = raw.strip()
    if not key:
        raise MissingKeyError(f"the API key in {source} is empty; set {API_KEY_ENV} or write the key into the key file")
    # Printable ASCII without spaces: anything else would make http.client raise with the value in its message.
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise MissingKeyError(f"the API key in {source} contains spaces, control or non-ASCII characters; "
                              "write the key alone (Segmind keys look like SG_ followed by 16 hex digits)")
    return key


def resolve_api_key(key_file=None) -> tuple[str, str]:
    """Return ``(key, source)``: ``$SEGMIND_API_KEY`` first, then the key file (``key_file`` or `default_key_file`).

    ``source`` names where the key came from, for messages; the key itself is never part of one.
    """
    env = os.environ.get(API_KEY_ENV, "")
    if env.strip():
        return _clean_key(env, f"the {API_KEY_ENV} environment variable"), f"the {API_KEY_ENV} environment variable"
    path = Path(key_file) if key_file else default_key_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise MissingKeyError(f"cannot read the API key file {path}: {exc.__class__.__name__}; "
                              f"fix its permissions or set {API_KEY_ENV}") from None
    if not text.strip():
        elsewhere = "" if path == default_key_file() else (
            f" (outside ComfyUI: {default_key_file()}, or the path in {KEY_FILE_ENV})")
        raise MissingKeyError(
            f"no Segmind API key: set the {API_KEY_ENV} environment variable, or write the key alone into the key "
            f"file {path}{elsewhere}. Get a key at https://cloud.segmind.com/console/api-keys")
    return _clean_key(text, f"the key file {path}"), f"the key file {path}"


def save_api_key(key: str, path) -> Path:
    """Write ``key`` to ``path`` readable by the owner only (atomic replace); an empty key deletes the file."""
    path = Path(path)
    if not key.strip():
        path.unlink(missing_ok=True)
        return path
    key = _clean_key(key, "the given key")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when a stale .tmp with wider permissions was there
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    os.replace(tmp, path)
    return path


def batch_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a batch: one request per image, seeds seed, seed+1, ... modulo 2**64."""
    return (seed + index) % (MAX_SEED + 1)


def image_extension(data: bytes) -> str:
    """The file extension for image bytes, from their magic number (``bin`` when they are no image)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "bin"


def write_new_file(directory, stem: str, data: bytes) -> Path:
    """Write ``data`` to ``directory/stem.<ext>`` (``stem_1.<ext>``... if taken), never overwriting a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ext = image_extension(data)
    for n in range(100000):
        path = directory / (f"{stem}.{ext}" if n == 0 else f"{stem}_{n}.{ext}")
        try:
            with open(path, "xb") as fh:
                fh.write(data)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free name for {stem}.{ext}; clean the folder")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str

    @property
    def display(self) -> str:
        """The URL without user:password or query, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path.split('?')[0]}"


def parse_endpoint(url: str) -> Endpoint:
    """Check the API URL: https anywhere, plain http only to loopback (tests, local proxies)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise RemoteError(f"{API_URL_ENV}: not a valid URL; use e.g. {DEFAULT_API_URL}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise RemoteError(f"{API_URL_ENV}: expected an https:// URL with a host, e.g. {DEFAULT_API_URL}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise RemoteError(f"{API_URL_ENV}: plain http:// is refused for {host} (the API key would travel "
                          "unencrypted); use https://, or http:// only to 127.0.0.1, ::1 or localhost")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Endpoint(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path)


# ----------------------------------------------------------------------------------------------- results


@dataclass
class RemoteImage:
    index: int  # position in the batch
    seed: int  # the seed used (the service's x-seed-value when it reports one)
    data: bytes  # the body exactly as received (no metadata added)
    format: str  # webp | jpg | png, from the bytes
    width: int
    height: int
    image: object  # PIL.Image.Image in RGB
    headers: dict = field(default_factory=dict)  # the accounting headers, lower-case names

    @property
    def remaining_credits(self) -> Optional[str]:
        return self.headers.get("x-remaining-credits")


@dataclass
class RemoteResult:
    params: dict  # the validated parameters of the whole call
    images: list = field(default_factory=list)  # RemoteImage, in batch order
    failures: list = field(default_factory=list)  # RemoteError with .index, in batch order
    remaining_credits: Optional[str] = None  # the lowest balance the responses reported (the latest)

    @property
    def seed(self) -> int:
        """The seed of the first image that arrived (the requested one if none did)."""
        return self.images[0].seed if self.images else self.params["seed"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def failure_summary(self) -> str:
        n = self.params["number_of_images"]
        return "; ".join(f"image {e.index + 1}/{n} failed: {e}" for e in self.failures)


@dataclass
class RetryPolicy:
    """Bounds on retrying. Tests shrink the delays; the defaults suit the hosted service."""

    max_retries: int = 2  # extra attempts after 408/5xx/refused/dropped connections
    backoff: float = 2.0  # first backoff delay in seconds, doubled each retry
    backoff_max: float = 30.0
    jitter: float = 0.5  # the delay is multiplied by a random factor in [1, 1 + jitter]
    max_rate_limit_retries: int = 3  # retries after 429
    max_rate_limit_wait: float = 65.0  # longest wait for a rate-limit reset (the service's window is a minute)
    rate_limit_default_wait: float = 12.0  # when a 429 names no reset time (5 requests a minute = one per 12 s)

    def backoff_delay(self, retry: int) -> float:
        base = min(self.backoff_max, self.backoff * (2 ** retry))
        return base * (1.0 + random.random() * self.jitter)


# ----------------------------------------------------------------------------------------------- one exchange


class _Exchange:
    """One POST on its own connection. `abort` (from the waiting thread) shuts the socket so a blocked read ends."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.reason: str | None = None  # "timeout" | "cancel" once aborted
        self._conn = None
        self._lock = threading.Lock()

    def attach(self, conn):
        with self._lock:
            self._conn = conn
            if self.reason:
                raise _Cancelled()

    def abort(self, reason: str):
        with self._lock:
            if self.reason is None:
                self.reason = reason
            sock = getattr(self._conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Dropped(Exception):
    """Internal: the connection failed after (part of) the request was sent; ``status`` if a response had begun."""

    def __init__(self, what: str, status=None, timed_out: bool = False):
        super().__init__(what)
        self.status = status
        self.timed_out = timed_out


class _NotSent(Exception):
    """Internal: connecting failed; nothing reached the service."""


@dataclass
class _Response:
    status: int
    headers: dict  # lower-case names
    body: bytes


class RemoteClient:
    """Talks to the hosted Aura Flow API. Build it with `from_environment`, call `generate`."""

    def __init__(self, api_key: str, *, url: str = DEFAULT_API_URL, key_source: str = "the given key",
                 connect_timeout: float = 15.0, timeout: float = 180.0, retry: RetryPolicy | None = None,
                 max_concurrency: int = 2, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 poll_interval: float = 0.1, ssl_context: ssl.SSLContext | None = None):
        self.endpoint = parse_endpoint(url)
        self._key = _clean_key(api_key, key_source)
        self.key_source = key_source
        self.connect_timeout = float(connect_timeout)
        self.timeout = float(timeout)  # total per request: connect, upload, generation (~80 s) and download
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_body_bytes = int(max_body_bytes)
        self.poll_interval = float(poll_interval)
        self._ssl_context = ssl_context

    def __repr__(self):  # never show the key
        return f"RemoteClient({self.endpoint.display!r}, key from {self.key_source})"

    @classmethod
    def from_environment(cls, key_file=None, **options) -> "RemoteClient":
        """Key from `resolve_api_key` (env, then ``key_file``), URL from ``$SEGMIND_API_URL`` or the default."""
        key, source = resolve_api_key(key_file)
        url = os.environ.get(API_URL_ENV, "").strip() or DEFAULT_API_URL
        return cls(key, url=url, key_source=source, **options)

    # ------------------------------------------------------------------------------------------- helpers

    def _scrub(self, text: str) -> str:
        """Service text made safe to show: the key removed, one line, bounded length."""
        text = text.replace(self._key, "***")
        text = " ".join(text.split())
        return text if len(text) <= _ERROR_TEXT_LIMIT else text[:_ERROR_TEXT_LIMIT] + "…"

    def _service_message(self, body: bytes) -> str:
        text = body[:4096].decode("utf-8", "replace")
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            for name in ("error", "message", "detail", "msg"):
                if doc.get(name):
                    value = doc[name]
                    return self._scrub(value if isinstance(value, str) else json.dumps(value))
        if re.search(r"<\s*(html|!doctype)", text, re.I):
            title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
            return self._scrub(f"an HTML page{': ' + title.group(1) if title else ''}")
        return self._scrub(text) or "(empty body)"

    def _request_body(self, params: dict, seed: int) -> bytes:
        body = {name: params[name] for name in ("prompt", "negative_prompt", "cfg", "shift", "steps", "width",
                                                 "height", "sampler", "scheduler", "output_format",
                                                 "output_quality")}
        body.update(seed=seed, number_of_images=1)
        return json.dumps(body).encode("utf-8")

    # ------------------------------------------------------------------------------------------- HTTP

    def _post(self, exchange: _Exchange, body: bytes) -> _Response:
        ep = self.endpoint
        if ep.scheme == "https":
            conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=self.connect_timeout,
                                               context=self._ssl_context or ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(ep.host, ep.port, timeout=self.connect_timeout)
        try:
            exchange.attach(conn)
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as exc:
                raise RemoteError(f"the TLS certificate of {ep.host} is not trusted ({exc.verify_message}); "
                                  f"nothing was sent. Check the system's CA certificates, or {API_URL_ENV}",
                                  billed=False) from None
            except (OSError, http.client.HTTPException) as exc:
                if exchange.reason:
                    raise _Cancelled() from None
                raise _NotSent(f"{exc.__class__.__name__}: {exc}") from None
            if exchange.reason:  # aborted while connecting: send nothing
                raise _Cancelled()
            conn.sock.settimeout(max(0.05, exchange.deadline - time.monotonic()))
            try:
                conn.putrequest("POST", ep.path, skip_accept_encoding=True)
                conn.putheader("Content-Type", "application/json")
                conn.putheader("Accept", "*/*")
                conn.putheader("x-api-key", self._key)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise _Dropped(exc.__class__.__name__, timed_out=isinstance(exc, TimeoutError)) from None
            headers = {k.lower(): v for k, v in resp.getheaders()}
            length = headers.get("content-length")
            billed = (" A 200 is billed; if the service really sends images this large, raise max_body_bytes"
                      if resp.status == 200 else "")
            if length is not None and length.strip().isdigit() and int(length) > self.max_body_bytes:
                raise RemoteError(
                    f"the service announced a {int(length):,}-byte body (HTTP {resp.status}), over the "
                    f"{self.max_body_bytes:,}-byte cap; refused without reading it.{billed}",
                    status=resp.status, billed=resp.status == 200)
            chunks, size = [], 0
            try:
                while True:
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise RemoteError(
                            f"the service sent more than {self.max_body_bytes:,} bytes (HTTP {resp.status}); "
                            f"stopped reading at the cap.{billed}", status=resp.status, billed=resp.status == 200)
                    chunks.append(chunk)
            except (OSError, http.client.HTTPException) as exc:
                raise _Dropped(f"{exc.__class__.__name__} after {size:,} bytes", resp.status,
                               timed_out=isinstance(exc, TimeoutError)) from None
            if exchange.reason:  # the socket was shut under a body without a length: it is truncated
                raise _Dropped(f"aborted after {size:,} bytes", resp.status)
            if length is not None and length.strip().isdigit() and size < int(length):
                raise _Dropped(f"connection closed after {size:,} of {int(length):,} bytes", resp.status)
            return _Response(resp.status, headers, b"".join(chunks))
        finally:
            conn.close()

    # ------------------------------------------------------------------------------------------- one image

    def _fatal(self, resp: _Response, index: int) -> RemoteError:
        """The error for a status that retrying cannot fix."""
        s, msg, where = resp.status, self._service_message(resp.body), self.endpoint.display
        if s in (400, 422):
            text = f"the service rejected the parameters ({s}): {msg}"
        elif s == 401:
            text = (f"the service refused the API key from {self.key_source} (401: missing or invalid): {msg}. "
                    f"Check the key (SG_ followed by 16 hex digits) in {API_KEY_ENV} or the key file")
        elif s == 402:
            text = f"not enough credits (402): {msg}. Top up at https://cloud.segmind.com/console/billing"
        elif s == 403:
            text = f"the API key is not allowed to use this model (403 forbidden): {msg}"
        elif s == 404:
            text = f"no model or endpoint at {where} (404): {msg}. Check {API_URL_ENV} (default {DEFAULT_API_URL})"
        elif s == 405:
            text = (f"{where} does not accept POST (405 method not allowed; the body was {msg}). {API_URL_ENV} "
                    f"probably points at a web page, not the API; the default is {DEFAULT_API_URL}")
        elif s == 406:
            low = msg.lower()
            if ("content" in low and "type" in low) or "json" in low:
                text = (f"the service refused the request's content type (406): {msg}. The client sends "
                        "application/json; a proxy in between may be rewriting it")
            elif "credit" in low or "balance" in low:
                text = f"not enough credits (406): {msg}. Top up at https://cloud.segmind.com/console/billing"
            else:
                text = f"the service refused the request (406 not acceptable: credits or content type): {msg}"
        elif 300 <= s < 400:
            text = (f"{where} redirects ({s}) to {self._scrub(resp.headers.get('location', '(no location)'))}; not "
                    f"followed, so the key goes nowhere else. If the API moved, set {API_URL_ENV} to the new address")
        else:
            text = f"the service answered HTTP {s}: {msg}"
        return RemoteError(text, status=s, index=index, billed=False)

    def _decode(self, resp: _Response, params: dict, index: int, seed: int) -> RemoteImage:
        from PIL import Image, UnidentifiedImageError

        ctype = resp.headers.get("content-type", "")
        billed_note = ("; a 200 is billed: report it to Segmind support with x-request-id "
                       f"{self._scrub(resp.headers.get('x-request-id', '(none)'))}")
        try:
            img = Image.open(io.BytesIO(resp.body))
            fmt = _FORMATS.get(img.format or "")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
            img, fmt = None, None
        if img is None or fmt is None:
            raise RemoteError(f"the service answered 200 but the body is not an image (content type "
                              f"{self._scrub(ctype) or 'none'}, {len(resp.body):,} bytes, starting "
                              f"{self._scrub(repr(resp.body[:16]))}){billed_note}",
                              status=200, index=index, billed=True, data=resp.body)
        if img.size != (params["width"], params["height"]):
            raise RemoteError(f"the service returned a {img.size[0]}x{img.size[1]} {fmt} image, but "
                              f"{params['width']}x{params['height']} was asked (a 200 is billed, so the bytes are "
                              "kept apart)",
                              status=200, index=index, billed=True, data=resp.body)
        try:
            img.load()
            rgb = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise RemoteError(f"the service's {fmt} image is damaged ({exc.__class__.__name__}: "
                              f"{self._scrub(str(exc))}){billed_note}",
                              status=200, index=index, billed=True, data=resp.body) from None
        if fmt != params["output_format"]:
            log.warning("image %d: asked for %s, the service sent %s; kept as sent", index + 1,
                        params["output_format"], fmt)
        accounting = {k: self._scrub(v) for k, v in resp.headers.items()
                      if k in ("x-remaining-credits", "x-seed-value", "x-generation-time", "x-cost",
                               "x-request-id")}
        try:
            used_seed = int(accounting.get("x-seed-value", seed))
        except ValueError:
            used_seed = seed
        return RemoteImage(index, used_seed, resp.body, fmt, img.size[0], img.size[1], rgb, accounting)

    def _reset_delay(self, headers: dict) -> float | None:
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
                    continue
            if number > 1e12:  # epoch milliseconds
                return number / 1000.0 - time.time()
            if number > 1e9:  # epoch seconds
                return number - time.time()
            return number  # seconds from now
        return None

    def _attempt(self, ctx: "_Call", index: int, seed: int, body: bytes) -> RemoteImage:
        """One request; returns the image or raises RemoteError (final) / _Retry / _Cancelled."""
        n = ctx.total
        exchange = _Exchange(time.monotonic() + self.timeout)
        ctx.register(exchange)
        try:
            resp = self._post(exchange, body)
        except _NotSent as exc:
            if exchange.reason == "cancel":
                raise _Cancelled() from None
            raise _Retry(RemoteError(f"could not connect to {self.endpoint.display} ({exc}); check the network "
                                     f"or {API_URL_ENV}", index=index, billed=False)) from None
        except _Dropped as exc:
            if exchange.reason == "cancel":
                raise _Cancelled() from None
            if exchange.reason == "timeout" or exc.timed_out:
                raise RemoteTimeout(
                    f"image {index + 1}/{n}: no complete answer within {self.timeout:g} s (the total timeout); "
                    "not retried, because the service may still finish the generation and bill it",
                    index=index, billed=None) from None
            billed = ("it was billed (only a 200 is), and the retry is billed again" if exc.status == 200 else
                      "the dropped request may have been billed")
            got = f" during a {exc.status} response" if exc.status else ""
            raise _Retry(RemoteError(f"the connection dropped{got} ({exc}); {billed}", index=index,
                                     billed=True if exc.status == 200 else None)) from None
        finally:
            ctx.unregister(exchange)
        if resp.status == 200:
            return self._decode(resp, ctx.params, index, seed)
        if resp.status == 429:
            delay = self._reset_delay(resp.headers)
            msg = self._service_message(resp.body)
            if delay is not None and delay > self.retry.max_rate_limit_wait:
                raise RemoteError(f"rate limited (429): the service resets in {delay:.0f} s, longer than the "
                                  f"{self.retry.max_rate_limit_wait:g} s this client waits: {msg}. Try again later "
                                  "or lower number_of_images", status=429, index=index, billed=False)
            wait_s = self.retry.rate_limit_default_wait if delay is None else max(0.0, delay)
            ctx.pause_until(time.monotonic() + wait_s)  # the other requests of the batch wait for the reset too
            raise _Retry(RemoteError(f"rate limited (429): {msg}", status=429, index=index, billed=False),
                         delay=wait_s, rate_limited=True)
        if resp.status == 408 or resp.status >= 500:
            maybe = ("; a 504 may hide a generation that finished and was billed"
                     if resp.status == 504 else " (not billed)")
            raise _Retry(RemoteError(f"the service failed with HTTP {resp.status}: "
                                     f"{self._service_message(resp.body)}{maybe}", status=resp.status,
                                     index=index, billed=None if resp.status == 504 else False))
        raise self._fatal(resp, index)

    def _one_image(self, ctx: "_Call", index: int) -> RemoteImage:
        seed = batch_seed(ctx.params["seed"], index)
        body = self._request_body(ctx.params, seed)
        retries = rate_retries = 0
        while True:
            if ctx.cancelled.wait(max(0.0, ctx.not_before - time.monotonic())):  # a shared rate-limit pause
                raise _Cancelled()
            if ctx.halted is not None:
                raise RemoteError(f"not sent, because {ctx.halted}", index=index, billed=False)
            try:
                return self._attempt(ctx, index, seed, body)
            except _Retry as r:
                if r.rate_limited:
                    if rate_retries >= self.retry.max_rate_limit_retries:
                        r.error.args = (f"{r.error} — still rate limited after {rate_retries + 1} tries; try again "
                                        "later or lower number_of_images",)
                        raise r.error from None
                    rate_retries += 1
                    delay = r.delay
                else:
                    if retries >= self.retry.max_retries:
                        r.error.args = (f"{r.error} — gave up after {retries + 1} tries",)
                        raise r.error from None
                    delay = self.retry.backoff_delay(retries)
                    retries += 1
                log.warning("AuraFlow remote: image %d/%d: %s; retrying in %.1f s", index + 1, ctx.total,
                            r.error, delay)
                if not r.rate_limited and ctx.cancelled.wait(delay):  # a 429's wait is the shared pause above
                    raise _Cancelled() from None
            except RemoteError as e:
                if e.status in (400, 401, 402, 403, 404, 405, 406, 422):
                    ctx.halted = f"image {index + 1} failed with HTTP {e.status}"  # every request would fail alike
                raise

    # ------------------------------------------------------------------------------------------- public

    def generate(self, params: dict, *, should_stop: Callable[[], bool] | None = None,
                 on_progress: Callable[[int, int, str], None] | None = None) -> RemoteResult:
        """Generate ``params["number_of_images"]`` images. Validates everything before sending anything.

        Returns a `RemoteResult` when at least one image arrived (``result.failures`` lists the others); raises
        `RemoteError` when none did (a single failure is raised as is), `RemoteInterrupted` when ``should_stop()``
        turned true (polled every ``poll_interval`` seconds, also while waiting to retry). ``on_progress(done,
        total, text)`` is called when an image arrives and about once a second while waiting.
        """
        params = validate_generation(params, remote=True)
        n = params["number_of_images"]
        ctx = _Call(params, n)
        result = RemoteResult(params)
        log.info("AuraFlow remote: %d image(s) %dx%d, %d steps, from %s", n, params["width"], params["height"],
                 params["steps"], self.endpoint.display)
        pool = ThreadPoolExecutor(max_workers=min(n, self.max_concurrency), thread_name_prefix="auraflow-remote")
        start = last_note = time.monotonic()
        arrived: dict[int, RemoteImage] = {}
        failed: dict[int, RemoteError] = {}
        try:
            futures = {pool.submit(self._one_image, ctx, i): i for i in range(n)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=self.poll_interval, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = futures[fut]
                    try:
                        img = fut.result()
                    except RemoteError as e:
                        e.index = i
                        failed[i] = e
                        log.warning("AuraFlow remote: image %d/%d failed: %s", i + 1, n, e)
                        continue
                    except _Cancelled:
                        continue
                    arrived[i] = img
                    result.remaining_credits = _lower_credits(result.remaining_credits, img.remaining_credits)
                    log.info("AuraFlow remote: image %d/%d arrived (seed %d, %s s, cost %s, credits left %s)", i + 1,
                             n, img.seed, img.headers.get("x-generation-time", "?"), img.headers.get("x-cost", "?"),
                             img.remaining_credits or "?")
                ctx.check_deadlines()
                now = time.monotonic()
                if should_stop is not None and should_stop():
                    result.images = [arrived[i] for i in sorted(arrived)]
                    result.failures = [failed[i] for i in sorted(failed)]
                    raise RemoteInterrupted(f"remote generation interrupted with {len(arrived)} of {n} image(s) "
                                            "received; requests already sent may still be billed", result)
                if on_progress is not None and (done or now - last_note >= 1.0):
                    last_note = now
                    finished = len(arrived) + len(failed)
                    on_progress(finished, n, f"AuraFlow remote: {finished}/{n} done, waiting "
                                             f"{now - start:.0f} s")
        finally:
            ctx.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
        result.images = [arrived[i] for i in sorted(arrived)]
        result.failures = [failed[i] for i in sorted(failed)]
        if not result.images:
            if len(result.failures) == 1:
                err = result.failures[0]
            else:
                err = RemoteError(f"no image arrived: {result.failure_summary()}",
                                  status=result.failures[0].status, billed=None)
            err.result = result
            raise err
        return result


def _lower_credits(old: Optional[str], new: Optional[str]) -> Optional[str]:
    """Concurrent answers arrive in any order: the lowest balance reported is the latest."""
    if new is None or old is None:
        return new if old is None else old
    try:
        return new if float(new) < float(old) else old
    except ValueError:
        return new


class _Call:
    """State shared by the worker threads of one `RemoteClient.generate` call."""

    def __init__(self, params: dict, total: int):
        self.params = params
        self.total = total
        self.cancelled = threading.Event()
        self.halted: str | None = None  # set when a failure means no further request can succeed
        self.not_before = 0.0  # monotonic time before which no request is sent (a rate-limit reset)
        self._active: set[_Exchange] = set()
        self._lock = threading.Lock()

    def register(self, ex: _Exchange):
        with self._lock:
            self._active.add(ex)
        if self.cancelled.is_set():
            ex.abort("cancel")

    def unregister(self, ex: _Exchange):
        with self._lock:
            self._active.discard(ex)

    def pause_until(self, when: float):
        with self._lock:
            self.not_before = max(self.not_before, when)

    def check_deadlines(self):
        now = time.monotonic()
        with self._lock:
            late = [ex for ex in self._active if now >= ex.deadline]
        for ex in late:
            ex.abort("timeout")

    def cancel(self):
        self.cancelled.set()
        with self._lock:
            active = list(self._active)
        for ex in active:
            ex.abort("cancel")
