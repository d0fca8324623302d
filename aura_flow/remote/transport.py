"""One HTTP exchange with the service on its own connection: TLS, the key header, bounded bodies, and an abort
from another thread that ends a blocked read (Cancel, the total timeout)."""
from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from .endpoint import API_URL_ENV, Endpoint
from .errors import RemoteError, Cancelled

# The largest body accepted: a 2048x2048 PNG of noise is about 12.6 MB.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class Exchange:
    """One request on its own connection. `abort` (from the waiting thread) shuts the socket so a blocked read ends."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.reason: str | None = None  # "timeout" | "cancel" once aborted
        self._conn = None
        self._lock = threading.Lock()

    def attach(self, conn):
        with self._lock:
            self._conn = conn
            if self.reason:
                raise Cancelled()

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


class Dropped(Exception):
    """Internal: the connection failed after (part of) the request was sent; ``status`` if a response had begun."""

    def __init__(self, what: str, status=None, timed_out: bool = False):
        super().__init__(what)
        self.status = status
        self.timed_out = timed_out


class NotSent(Exception):
    """Internal: connecting failed; nothing reached the service."""


@dataclass
class Response:
    status: int
    headers: dict  # lower-case names
    body: bytes


class HttpTransport:
    """Requests to the API's host with the key in a header, and key-less GETs of media elsewhere; bodies are capped
    at ``max_body_bytes``. Redirects are never followed: a 3xx comes back as it is."""

    def __init__(self, endpoint: Endpoint, key: str, *, connect_timeout: float, max_body_bytes: int,
                 ssl_context: ssl.SSLContext | None = None, key_header: str = "x-api-key", key_prefix: str = "",
                 url_env: str = API_URL_ENV):
        self.endpoint = endpoint
        self._key = key
        self._key_header = key_header  # Segmind: x-api-key: <key>; fal: Authorization: Key <key>
        self._key_prefix = key_prefix
        self.url_env = url_env
        self.connect_timeout = float(connect_timeout)
        self.max_body_bytes = int(max_body_bytes)
        self._ssl_context = ssl_context

    def post(self, exchange: Exchange, body: bytes, target: Endpoint | None = None) -> Response:
        """POST JSON to ``target`` (default: the endpoint) with the key."""
        return self.send(exchange, target or self.endpoint, "POST", body)

    def send(self, exchange: Exchange, target: Endpoint, method: str = "GET", body: bytes | None = None, *,
             key: bool = True, max_body_bytes: int | None = None, billed_200: bool | None = True) -> Response:
        """One request on its own connection. ``key=True`` only to the endpoint's own host (else refused before
        connecting); ``billed_200`` says whether an over-cap 200 was billed (for the message and the error)."""
        if key and not target.same_host(self.endpoint):
            raise RemoteError(f"refused to send the API key to {target.origin}: only {self.endpoint.origin} gets it",
                              billed=None)
        cap = self.max_body_bytes if max_body_bytes is None else int(max_body_bytes)
        ep = target
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
                                  f"nothing was sent. Check the system's CA certificates, or {self.url_env}",
                                  billed=False) from None
            except (OSError, http.client.HTTPException) as exc:
                if exchange.reason:
                    raise Cancelled() from None
                raise NotSent(f"{exc.__class__.__name__}: {exc}") from None
            if exchange.reason:  # aborted while connecting: send nothing
                raise Cancelled()
            conn.sock.settimeout(max(0.05, exchange.deadline - time.monotonic()))
            try:  # nothing is sent before endheaders: a path or header http.client refuses costs nothing
                conn.putrequest(method, ep.path, skip_accept_encoding=True)
                if body is not None:
                    conn.putheader("Content-Type", "application/json")
                conn.putheader("Accept", "*/*")
                if key:
                    conn.putheader(self._key_header, self._key_prefix + self._key)
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
            except (ValueError, http.client.HTTPException) as exc:
                raise RemoteError(f"the request to {ep.display} cannot be sent ({exc.__class__.__name__}: its path "
                                  f"or a header holds characters HTTP does not allow); nothing was sent. Check "
                                  f"{self.url_env}", billed=False) from None
            try:
                conn.endheaders(body)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise Dropped(exc.__class__.__name__, timed_out=isinstance(exc, TimeoutError)) from None
            headers = {k.lower(): v for k, v in resp.getheaders()}
            length = headers.get("content-length")
            billed = resp.status == 200 and billed_200
            note = (" A 200 is billed; if the service really sends images this large, raise max_body_bytes"
                    if billed else "")
            if length is not None and length.strip().isdigit() and int(length) > cap:
                raise RemoteError(
                    f"{ep.host} announced a {int(length):,}-byte body (HTTP {resp.status}), over the "
                    f"{cap:,}-byte cap; refused without reading it.{note}",
                    status=resp.status, billed=billed if resp.status == 200 else False)
            chunks, size = [], 0
            try:
                while True:
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > cap:
                        raise RemoteError(
                            f"{ep.host} sent more than {cap:,} bytes (HTTP {resp.status}); stopped reading at the "
                            f"cap.{note}", status=resp.status, billed=billed if resp.status == 200 else False)
                    chunks.append(chunk)
            except (OSError, http.client.HTTPException) as exc:
                raise Dropped(f"{exc.__class__.__name__} after {size:,} bytes", resp.status,
                              timed_out=isinstance(exc, TimeoutError)) from None
            if exchange.reason:  # the socket was shut under a body without a length: it is truncated
                raise Dropped(f"aborted after {size:,} bytes", resp.status)
            if length is not None and length.strip().isdigit() and size < int(length):
                raise Dropped(f"connection closed after {size:,} of {int(length):,} bytes", resp.status)
            return Response(resp.status, headers, b"".join(chunks))
        finally:
            conn.close()
