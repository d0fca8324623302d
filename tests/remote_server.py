"""A fake hosted Aura Flow API on 127.0.0.1 for the remote client's tests.

Plays the service: a correct request (x-api-key, ``Content-Type: application/json``, a JSON body) gets a real
image made with PIL at the requested size and format, plus the accounting headers. Each image is two colour
bands derived from the seed (top half `seed_colour(seed)`, bottom half its complement), so a test can check that
pixels went through unchanged and unrotated.

Faults are scripted per request: `fail_next(*faults)` applies to the next requests in arrival order,
`fail_seed(seed, *faults)` to the requests carrying that seed (so concurrent batches stay deterministic). A fault is
a dict: ``{"status": 500, "body": b"...", "type": "text/html", "headers": {...}}`` for an error answer, or
``{"kind": K, ...}`` with K one of ``slow`` (``seconds`` before answering normally), ``drop`` (close mid-body),
``garbage`` (a 200 with non-image bytes), ``hangup`` (close without answering), ``redirect``
(a 302 elsewhere), ``huge`` (announce a 2 GB body), ``stream`` (send ``bytes`` of data
without a length), ``size`` (a correct image of ``width``x``height`` instead).
"""
from __future__ import annotations

import io
import json
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

KEY = "SG_0123456789abcdef"
CONTENT_TYPES = {"webp": "image/webp", "jpg": "image/jpeg", "png": "image/png"}


def seed_colour(seed: int) -> tuple[int, int, int]:
    return (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)


def make_image(width: int, height: int, seed: int, fmt: str, quality: int = 80) -> bytes:
    top = seed_colour(seed)
    img = Image.new("RGB", (width, height), top)
    img.paste(tuple(255 - c for c in top), (0, height // 2, width, height))
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, {"webp": "WEBP", "jpg": "JPEG"}[fmt], quality=quality)
    return buf.getvalue()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # a client that hung up (interrupt tests) is expected
            super().handle_error(request, client_address)


class FakeService:
    """``with FakeService() as svc: svc.url ...``; ``svc.requests`` lists what arrived (headers, body)."""

    def __init__(self, key: str = KEY, credits: float = 100.0, cost: float = 0.5, tls=None):
        """``tls=(certfile, keyfile)`` serves https."""
        self.key = key
        self.credits = credits
        self.cost = cost
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._next = deque()
        self._by_seed = defaultdict(deque)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self.scheme = "http"
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    # scripting ---------------------------------------------------------------------------------------
    def fail_next(self, *faults):
        self._next.extend(faults)

    def fail_seed(self, seed: int, *faults):
        self._by_seed[seed].extend(faults)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host}:{port}/v1/aura-flow"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def sleep(self, seconds: float):
        """Sleep in a handler, ending early when the server closes."""
        self._closing.wait(seconds)

    # the handler -------------------------------------------------------------------------------------
    def _handler_class(self):
        svc = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status, body: bytes, ctype="application/json", headers=None, length=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.send_header("Connection", "close")
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status, message):
                self._send(status, json.dumps({"error": message}).encode())

            def do_GET(self):
                self._send(405, b"<html><head><title>405 Method Not Allowed</title></head><body>nope</body></html>",
                           "text/html")

            def do_POST(self):
                with svc._lock:
                    svc.in_flight += 1
                    svc.max_in_flight = max(svc.max_in_flight, svc.in_flight)
                try:
                    self._post()
                finally:
                    with svc._lock:
                        svc.in_flight -= 1

            def _post(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                record = {"headers": dict(self.headers.items()), "body": body, "path": self.path,
                          "time": time.monotonic()}
                with svc._lock:
                    svc.requests.append(record)
                    seed = body.get("seed") if isinstance(body, dict) else None
                    if seed in svc._by_seed and svc._by_seed[seed]:
                        fault = svc._by_seed[seed].popleft()
                    elif svc._next:
                        fault = svc._next.popleft()
                    else:
                        fault = None
                if fault and "status" in fault:
                    return self._send(fault["status"], fault.get("body", b'{"error": "scripted"}'),
                                      fault.get("type", "application/json"), fault.get("headers"))
                kind = (fault or {}).get("kind")
                if kind == "slow":
                    svc.sleep(fault["seconds"])
                if kind == "hangup":
                    self.close_connection = True
                    return
                if kind == "redirect":
                    return self._send(302, b"", "text/plain", {"Location": "https://elsewhere.example/v1/aura-flow"})
                if self.headers.get("x-api-key") != svc.key:
                    return self._error(401, "Unauthorized: invalid or missing API key")
                if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                    return self._error(406, "Content-Type must be application/json")
                if not isinstance(body, dict):
                    return self._error(400, "body is not JSON")
                w, h = body.get("width", 1024), body.get("height", 1024)
                fmt = body.get("output_format", "webp")
                if kind == "size":
                    w, h = fault["width"], fault["height"]
                data = make_image(w, h, body.get("seed", 0), fmt, body.get("output_quality", 80))
                with svc._lock:
                    svc.credits -= svc.cost
                    credits = svc.credits
                    rid = f"req-{len(svc.requests)}"
                headers = {"x-remaining-credits": f"{credits:g}", "x-seed-value": body.get("seed", 0),
                           "x-generation-time": "1.25", "x-cost": f"{svc.cost:g}", "x-request-id": rid}
                if kind == "garbage":
                    return self._send(200, b"\x00garbage, not an image" * 10, "image/webp", headers)
                if kind == "huge":
                    self._send(200, data[:100], CONTENT_TYPES[fmt], headers, length=2 * 1024 ** 3)
                    svc.sleep(5)
                    return
                if kind == "drop":
                    self._send(200, data[: len(data) // 2], CONTENT_TYPES[fmt], headers, length=len(data))
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if kind == "stream":  # no length: the body ends when the connection closes
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPES[fmt])
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = b"\x00" * 65536
                    sent = 0
                    try:
                        while sent < fault["bytes"] and not svc._closing.is_set():
                            self.wfile.write(chunk)
                            sent += len(chunk)
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                self._send(200, data, CONTENT_TYPES[fmt], headers)

        return Handler
