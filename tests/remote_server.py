"""A fake hosted Aura Flow API on 127.0.0.1 for the remote client's tests, both its APIs, and a media host.

Plays the service: a correct request (x-api-key, ``Content-Type: application/json``, a JSON body) gets a real
image made with PIL at the requested size and format. Each image is two colour bands derived from the seed (top
half `seed_colour(seed)`, bottom half its complement), so a test can check that pixels went through unchanged.

- v1 ``POST /v1/aura-flow``: the image bytes, with the accounting headers (``x-request-id`` ``req-N``...).
- v2 ``POST /v2/aura-flow``: ``{"request_id": "rq-N", "status": "QUEUED", "status_url", "response_url"}``;
  ``GET /v2/requests/<id>/status`` answers QUEUED for ``queue_polls`` polls, PROCESSING for ``processing_polls``,
  then COMPLETED (the credits are taken then); ``GET /v2/requests/<id>`` the result, whose ``output`` is the URL of
  the image on `MediaServer`, a SECOND loopback server that records every request's headers.

Faults are scripted per request: `fail_next(*faults)` applies to the next submits in arrival order,
`fail_seed(seed, *faults)` to the submits carrying that seed (so concurrent batches stay deterministic). A fault is
``{"status": 500, "body": b"...", "type": "text/html", "headers": {...}}`` for an error answer to the submit, or
``{"kind": K, ...}``. At the submit (both APIs): ``slow`` (``seconds`` before answering), ``hangup`` (close
without answering), ``redirect`` (a 302 elsewhere). On the image (v1's answer, v2's media fetch): ``drop`` (close
mid-body), ``garbage`` (a 200 with non-image bytes), ``huge`` (announce 2 GB), ``stream`` (``bytes`` of data
without a length), ``size`` (a correct image of ``width``x``height``), ``media_redirect``. v2 only: ``failed``
(FAILED with ``error``, as HTTP 422), ``expire`` (the status answers 404), ``queued`` (never leaves the queue),
``unknown`` (status ``status``), ``poll_drop`` / ``poll_hangup`` / ``poll_status`` (the first ``times`` polls
drop mid-body / close unanswered / answer ``status``, with ``headers``), ``offsite`` (status_url on the media host),
``no_id``, ``id`` (the request id is ``fault["id"]``), ``bare`` (no status/response URLs), ``relative`` (URLs
without a host), ``output`` (the result's output is ``make(media_url, image_bytes)``).
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
IMAGE_FAULTS = ("drop", "garbage", "huge", "stream", "size", "media_redirect")


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


class _Handler(BaseHTTPRequestHandler):
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

    def _json(self, status, doc, headers=None):
        self._send(status, json.dumps(doc).encode(), headers=headers)

    def _error(self, status, message):
        self._json(status, {"error": message})


class _Base:
    """A loopback server on its own thread; ``requests`` records what arrived."""

    def __init__(self, handler, tls=None):
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), handler)
        self.scheme = "http"
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def origin(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

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

    def record(self, handler, body=None) -> dict:
        rec = {"method": handler.command, "path": handler.path, "headers": dict(handler.headers.items()),
               "body": body, "time": time.monotonic()}
        with self._lock:
            self.requests.append(rec)
            rec["number"] = len(self.requests)
        return rec


def send_image(h: _Handler, svc: _Base, data: bytes, fmt: str, fault: dict | None, headers: dict | None = None):
    """Answer with image bytes, or with the image fault scripted for them."""
    kind = (fault or {}).get("kind")
    if kind == "garbage":
        return h._send(200, b"\x00garbage, not an image" * 10, "image/webp", headers)
    if kind == "huge":
        h._send(200, data[:100], CONTENT_TYPES[fmt], headers, length=2 * 1024 ** 3)
        svc.sleep(5)
        return
    if kind == "drop":
        h._send(200, data[: len(data) // 2], CONTENT_TYPES[fmt], headers, length=len(data))
        h.wfile.flush()
        h.close_connection = True
        return
    if kind == "media_redirect":
        return h._send(302, b"", "text/plain", {"Location": "https://elsewhere.example/image.png"})
    if kind == "stream":  # no length: the body ends when the connection closes
        h.send_response(200)
        h.send_header("Content-Type", CONTENT_TYPES[fmt])
        h.send_header("Connection", "close")
        h.end_headers()
        chunk, sent = b"\x00" * 65536, 0
        try:
            while sent < fault["bytes"] and not svc._closing.is_set():
                h.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass
        h.close_connection = True
        return
    h._send(200, data, CONTENT_TYPES[fmt], headers)


class MediaServer(_Base):
    """The media host a v2 result points at: serves stored images; its ``requests`` show every header it got."""

    def __init__(self, tls=None):
        self.files: dict[str, tuple[bytes, str, dict | None]] = {}
        media = self

        class Handler(_Handler):
            def do_GET(self):
                media.record(self)
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                if name not in media.files:
                    return self._error(404, "no such file")
                data, fmt, fault = media.files[name]
                if fault and fault.get("kind") == "drop" and not fault.get("done"):
                    fault["done"] = True  # the first fetch drops; a retry gets the whole image
                elif fault and fault.get("kind") == "drop":
                    fault = None
                send_image(self, media, data, fmt, fault)

        super().__init__(Handler, tls)

    def put(self, name: str, data: bytes, fmt: str, fault: dict | None = None) -> str:
        self.files[name] = (data, fmt, fault)
        return f"{self.origin}/media/{name}"


class WithMedia:
    """A service whose results point at its own `MediaServer` (``self.media``), started and stopped with it."""

    @property
    def submits(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]

    def __enter__(self):
        self.media.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.media.__exit__(*exc)


class FakeService(WithMedia, _Base):
    """``with FakeService() as svc: svc.url ...``; ``svc.requests`` lists what arrived (method, path, headers,
    body), ``svc.submits`` the POSTs, ``svc.media`` is the media host."""

    def __init__(self, key: str = KEY, credits: float = 100.0, cost: float = 0.5, tls=None, queue_polls: int = 1,
                 processing_polls: int = 1):
        """``tls=(certfile, keyfile)`` serves https."""
        self.key = key
        self.credits = credits
        self.cost = cost
        self.queue_polls = queue_polls
        self.processing_polls = processing_polls
        self.in_flight = 0
        self.max_in_flight = 0
        self.jobs: dict[str, dict] = {}
        self.open_jobs = 0  # v2 requests submitted and not yet finished (result fetched, failed or expired)
        self.max_open_jobs = 0
        self._next = deque()
        self._by_seed = defaultdict(deque)
        self.media = MediaServer()
        super().__init__(self._handler_class(), tls)

    # scripting ---------------------------------------------------------------------------------------
    def fail_next(self, *faults):
        self._next.extend(faults)

    def fail_seed(self, seed: int, *faults):
        self._by_seed[seed].extend(faults)

    @property
    def url(self) -> str:
        return f"{self.origin}/v1/aura-flow"

    def polls(self, request_id: str | None = None) -> list[dict]:
        return [r for r in self.requests if r["method"] == "GET" and r["path"].endswith("/status")
                and (request_id is None or f"/{request_id}/" in r["path"])]

    def _close_job(self, job):
        with self._lock:
            if not job.get("closed"):
                job["closed"] = True
                self.open_jobs -= 1

    # the handler -------------------------------------------------------------------------------------
    def _handler_class(self):
        svc = self

        class Handler(_Handler):
            def do_GET(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) >= 3 and parts[:2] == ["v2", "requests"]:
                    return svc._get_request(self, parts[2], status=parts[3:] == ["status"])
                svc.record(self)
                self._send(405, b"<html><head><title>405 Method Not Allowed</title></head><body>nope</body></html>",
                           "text/html")

            def do_POST(self):
                with svc._lock:
                    svc.in_flight += 1
                    svc.max_in_flight = max(svc.max_in_flight, svc.in_flight)
                try:
                    svc._post(self)
                finally:
                    with svc._lock:
                        svc.in_flight -= 1

        return Handler

    def _post(self, h: _Handler):
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        number = self.record(h, body)["number"]
        with self._lock:
            seed = body.get("seed") if isinstance(body, dict) else None
            if seed in self._by_seed and self._by_seed[seed]:
                fault = self._by_seed[seed].popleft()
            elif self._next:
                fault = self._next.popleft()
            else:
                fault = None
        if fault and "status" in fault and "kind" not in fault:
            return h._send(fault["status"], fault.get("body", b'{"error": "scripted"}'),
                           fault.get("type", "application/json"), fault.get("headers"))
        kind = (fault or {}).get("kind")
        if kind == "slow":
            self.sleep(fault["seconds"])
        if kind == "hangup":
            h.close_connection = True
            return
        if kind == "redirect":
            return h._send(302, b"", "text/plain", {"Location": "https://elsewhere.example/v1/aura-flow"})
        if h.headers.get("x-api-key") != self.key:
            return h._error(401, "Unauthorized: invalid or missing API key")
        if (h.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return h._error(406, "Content-Type must be application/json")
        if not isinstance(body, dict):
            return h._error(400, "body is not JSON")
        if h.path.split("?")[0] == "/v2/aura-flow":
            return self._submit(h, body, fault)
        data, fmt = self._image(body, fault)
        with self._lock:
            self.credits -= self.cost
            headers = {"x-remaining-credits": f"{self.credits:g}", "x-seed-value": body.get("seed", 0),
                       "x-generation-time": "1.25", "x-cost": f"{self.cost:g}",
                       "x-request-id": f"req-{number}"}
        send_image(h, self, data, fmt, fault, headers)

    @staticmethod
    def _image(body: dict, fault) -> tuple[bytes, str]:
        w, h = body.get("width", 1024), body.get("height", 1024)
        if (fault or {}).get("kind") == "size":
            w, h = fault["width"], fault["height"]
        fmt = body.get("output_format", "webp")
        return make_image(w, h, body.get("seed", 0), fmt, body.get("output_quality", 80)), fmt

    # v2 ----------------------------------------------------------------------------------------------
    def _submit(self, h: _Handler, body: dict, fault):
        with self._lock:
            rid = f"rq-{len(self.jobs) + 1}"
            self.jobs[rid] = {"id": rid, "body": body, "fault": fault or {}, "polls": 0, "state": "QUEUED"}
            self.open_jobs += 1
            self.max_open_jobs = max(self.max_open_jobs, self.open_jobs)
        kind = (fault or {}).get("kind")
        if kind == "no_id":
            return h._json(200, {"status": "QUEUED"})
        if kind == "id":  # a request id the client must refuse to put in a path ('..', 'a/b')
            return h._json(200, {"request_id": fault["id"], "status": "QUEUED"})
        if kind == "bare":  # the client derives the documented paths
            return h._json(200, {"request_id": rid, "status": "QUEUED"})
        base = {"offsite": self.media.origin, "relative": ""}.get(kind, self.origin)
        h._json(200, {"request_id": rid, "status": "QUEUED", "poll_url": f"{self.origin}/v1/requests/{rid}",
                      "status_url": f"{base}/v2/requests/{rid}/status",
                      "response_url": f"{base if kind == 'relative' else self.origin}/v2/requests/{rid}"})

    def _get_request(self, h: _Handler, rid: str, status: bool):
        self.record(h)
        if h.headers.get("x-api-key") != self.key:
            return h._error(401, "Unauthorized: invalid or missing API key")
        job = self.jobs.get(rid)
        if job is None:
            return h._error(404, "Request not found or expired")
        fault, kind = job["fault"], job["fault"].get("kind")
        if kind == "expire":
            self._close_job(job)
            return h._error(404, "Request not found or expired")
        if status:
            job["polls"] += 1
            if kind in ("poll_drop", "poll_hangup", "poll_status") and job["polls"] <= fault.get("times", 1):
                if kind == "poll_hangup":
                    h.close_connection = True
                    return
                if kind == "poll_status":
                    return h._json(fault["status"], {"error": "scripted poll failure"}, headers=fault.get("headers"))
                h._send(200, b'{"status": "PROCE', length=200)
                h.wfile.flush()
                h.close_connection = True
                return
            self._advance(job)
            doc = {"status": job["state"], "request_id": rid, "metrics": job.get("metrics", {})}
            if job["state"] == "FAILED":
                self._close_job(job)
                return h._json(422, {**doc, "error": fault.get("error", "inference failed")})
            return h._json(200, doc)
        if job["state"] == "FAILED":
            return h._json(422, {"status": "FAILED", "request_id": rid, "error": fault.get("error", "failed")})
        if job["state"] != "COMPLETED":
            return h._json(200, {"status": job["state"], "request_id": rid})
        self._close_job(job)
        h._json(200, {"status": "COMPLETED", "request_id": rid, "output": job["output"],
                      "seed": job["body"].get("seed"), "metrics": job["metrics"]})

    def _advance(self, job):
        fault, kind = job["fault"], job["fault"].get("kind")
        polls = job["polls"] - (fault.get("times", 1) if kind in ("poll_drop", "poll_hangup", "poll_status") else 0)
        if job["state"] in ("COMPLETED", "FAILED"):
            return
        if kind == "unknown":
            job["state"] = fault["status"]
        elif kind == "queued" or polls <= self.queue_polls:
            job["state"] = "QUEUED"
        elif polls <= self.queue_polls + self.processing_polls:
            job["state"] = "PROCESSING"
        elif kind == "failed":
            job["state"] = "FAILED"
            job["metrics"] = {"inference_time": 0.4}
        else:
            data, fmt = self._image(job["body"], fault)
            url = self.media.put(f"{job['id']}.{fmt}", data, fmt, fault if kind in IMAGE_FAULTS else None)
            with self._lock:
                self.credits -= self.cost
                job["metrics"] = {"cost": self.cost, "remaining_credits": self.credits, "inference_time": 1.25,
                                  "queue_time": 0.1}
            job["output"] = fault["make"](url, data) if kind == "output" else url
            job["state"] = "COMPLETED"
