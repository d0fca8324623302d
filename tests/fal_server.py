"""A stand-in for fal's queue on 127.0.0.1, with `remote_server.MediaServer` as its CDN (a second loopback server,
which must never see the key).

``POST /fal-ai/<model>`` (``Authorization: Key <key>``, a JSON body checked against the model's inputs as fal's
schema has them: unknown fields, steps outside 20..50, num_images outside 1..2 on pony-v7, a bad image_size ->
422 with a ``detail`` list) answers ``request_id`` (``fq-N``), ``status_url``, ``response_url``, ``cancel_url``.
``GET .../requests/<id>/status`` answers IN_QUEUE (with ``queue_position``) for ``queue_polls`` polls, then
IN_PROGRESS until ``progress_polls`` more polls have passed and ``service_time`` seconds have passed since the
submit, then COMPLETED. ``GET .../requests/<id>`` answers the output: ``images`` [{url on the CDN, width, height,
content_type}], ``seed``, ``prompt`` (``"expanded: " + prompt`` when expand_prompt was true), ``has_nsfw_concepts``,
``timings``. ``PUT .../requests/<id>/cancel`` answers 202 CANCELLATION_REQUESTED (400 ALREADY_COMPLETED when done).
Images are `remote_server.make_image` bands of the seed (aura-flow: 1024x1024 PNG; pony-v7: jpeg by default).

Faults for the next submits (`fail_next`): ``{"status": 422, "body": ...}`` (the submit's answer), ``failed``
(COMPLETED with ``error``), ``never`` (stays IN_PROGRESS), ``poll_drop`` (the first poll closes mid-body),
``offsite`` (status_url on the CDN's port), ``id`` (the request id is ``fault["id"]``), ``nsfw`` (flagged).
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque

from remote_server import CONTENT_TYPES, MediaServer, WithMedia, _Base, _Handler, make_image

FAL_KEY = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0:0123456789abcdef0123456789abcdef"
MODELS = {"aura-flow": {"prompt", "num_images", "seed", "guidance_scale", "num_inference_steps", "expand_prompt"},
          "pony-v7": {"prompt", "image_size", "num_images", "seed", "guidance_scale", "num_inference_steps",
                      "noise_source", "sync_mode", "enable_safety_checker", "output_format"}}
PRESETS = {"square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024),
           "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576)}


def _problem(model: str, body: dict) -> list:
    """fal's 422 ``detail`` entries for a body the model's schema refuses ([] when it is fine)."""
    out = [{"loc": ["body", k], "msg": "extra fields not permitted", "type": "value_error.extra"}
           for k in sorted(set(body) - MODELS[model])]
    if not isinstance(body.get("prompt"), str):
        out.append({"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"})
    steps = body.get("num_inference_steps", 20)
    if not isinstance(steps, int) or not 20 <= steps <= 50:
        out.append({"loc": ["body", "num_inference_steps"], "msg": "ensure this value is between 20 and 50",
                    "type": "value_error"})
    if model == "pony-v7":
        if body.get("num_images", 1) not in (1, 2):
            out.append({"loc": ["body", "num_images"], "msg": "ensure this value is between 1 and 2",
                        "type": "value_error"})
        size = body.get("image_size", "square_hd")
        preset = isinstance(size, str) and size in PRESETS
        if not (preset or isinstance(size, dict) and set(size) == {"width", "height"}):
            out.append({"loc": ["body", "image_size"], "msg": "not a preset or {width, height}",
                        "type": "value_error"})
        if body.get("output_format", "jpeg") not in ("jpeg", "png"):
            out.append({"loc": ["body", "output_format"], "msg": "unexpected value; permitted: 'jpeg', 'png'",
                        "type": "value_error"})
        if body.get("noise_source", "gpu") not in ("gpu", "cpu"):
            out.append({"loc": ["body", "noise_source"], "msg": "permitted: 'gpu', 'cpu'", "type": "value_error"})
    return out


class FakeFal(WithMedia, _Base):
    """``with FakeFal() as fal: fal.url ...``; ``fal.requests`` lists what arrived, ``fal.submits`` the POSTs,
    ``fal.media`` is the CDN, ``fal.states`` the statuses each request was answered."""

    def __init__(self, key: str = FAL_KEY, queue_polls: int = 1, progress_polls: int = 1,
                 service_time: float = 0.0):
        self.key = key
        self.queue_polls, self.progress_polls, self.service_time = queue_polls, progress_polls, service_time
        self.jobs: dict[str, dict] = {}
        self.states: dict[str, list] = {}
        self._next: deque = deque()
        self.media = MediaServer()
        fal = self

        class Handler(_Handler):
            def do_POST(self):
                fal._post(self)

            def do_GET(self):
                fal._get(self)

            def do_PUT(self):
                fal._put(self)

        super().__init__(Handler)
        self._count_lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.origin

    def fail_next(self, *faults):
        self._next.extend(faults)

    def _authorized(self, h) -> bool:
        if h.headers.get("Authorization") != f"Key {self.key}":
            h._json(401, {"detail": "Unauthorized: invalid or missing key"})
            return False
        return True

    def _post(self, h):
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.record(h, body)
        fault = self._next.popleft() if self._next else {}
        if "status" in fault:
            return h._send(fault["status"], fault.get("body", b'{"detail": "scripted"}'))
        if not self._authorized(h):
            return
        model = h.path.split("?")[0].removeprefix("/fal-ai/")
        if model not in MODELS:
            return h._json(404, {"detail": f"Application {model!r} not found"})
        if not isinstance(body, dict):
            return h._json(422, {"detail": [{"loc": ["body"], "msg": "not JSON", "type": "value_error"}]})
        problems = _problem(model, body)
        if problems:
            return h._json(422, {"detail": problems})
        with self._count_lock:
            rid = fault.get("id") or f"fq-{len(self.jobs) + 1}"
            self.jobs[rid] = {"model": model, "body": body, "fault": fault, "polls": 0, "time": time.monotonic(),
                              "cancelled": False}
            self.states[rid] = []
        base = f"{self.origin}/fal-ai/{model}/requests/{rid}"
        status_base = f"{self.media.origin}/fal-ai/{model}/requests/{rid}" if fault.get("kind") == "offsite" else base
        h._json(200, {"request_id": rid, "status_url": f"{status_base}/status", "response_url": base,
                      "cancel_url": f"{base}/cancel", "queue_position": 0})

    def _job(self, h, suffix: str):
        path = h.path.split("?")[0]
        parts = path.split("/")  # '', 'fal-ai', model, 'requests', id, [suffix]
        if len(parts) < 5 or parts[3] != "requests" or (suffix and parts[-1] != suffix):
            return None, None
        return parts[4], self.jobs.get(parts[4])

    def _state(self, job) -> str:
        polls = job["polls"]
        if job["cancelled"]:
            return "COMPLETED"
        if polls <= self.queue_polls:
            return "IN_QUEUE"
        if job["fault"].get("kind") == "never" or polls <= self.queue_polls + self.progress_polls or \
                time.monotonic() - job["time"] < self.service_time:
            return "IN_PROGRESS"
        return "COMPLETED"

    def _get(self, h):
        self.record(h)
        if not self._authorized(h):
            return
        status = h.path.split("?")[0].endswith("/status")
        rid, job = self._job(h, "status" if status else "")
        if job is None:
            return h._json(404, {"detail": "Request not found"})
        fault = job["fault"]
        if status:
            job["polls"] += 1
            if fault.get("kind") == "poll_drop" and job["polls"] == 1:
                h._send(200, b'{"status": "IN_QU', length=200)
                h.close_connection = True
                return
            state = self._state(job)
            self.states[rid].append(state)
            doc = {"status": state, "request_id": rid, "response_url": f"{self.origin}/fal-ai/{job['model']}/"
                                                                       f"requests/{rid}"}
            if state == "IN_QUEUE":
                doc["queue_position"] = self.queue_polls - job["polls"]
            if state == "COMPLETED" and fault.get("kind") == "failed":
                doc["error"] = fault.get("error", "the app crashed")
            if state == "COMPLETED" and job["cancelled"]:
                doc["error"] = "Request was cancelled"
            return h._json(200, doc)
        if self._state(job) != "COMPLETED":
            return h._json(400, {"detail": "Request is still in progress"})
        if fault.get("kind") == "failed":
            return h._json(500, {"detail": fault.get("error", "the app crashed")})
        body = job["body"]
        seed = body.get("seed", 0)
        if job["model"] == "aura-flow":
            (w, hgt), fmt, ctype = (1024, 1024), "png", "image/png"
        else:
            size = body.get("image_size", "square_hd")
            w, hgt = (size["width"], size["height"]) if isinstance(size, dict) else PRESETS[size]
            fmt = "png" if body.get("output_format") == "png" else "jpg"
            ctype = CONTENT_TYPES[fmt]
        url = self.media.put(f"{rid}.{fmt}", make_image(w, hgt, seed, fmt, 95), fmt)
        prompt = body["prompt"]
        h._json(200, {"images": [{"url": url, "width": w, "height": hgt, "content_type": ctype}], "seed": seed,
                      "prompt": f"expanded: {prompt}" if body.get("expand_prompt") else prompt,
                      "has_nsfw_concepts": [fault.get("kind") == "nsfw"], "timings": {"inference": 1.25}})

    def _put(self, h):
        self.record(h)
        if not self._authorized(h):
            return
        rid, job = self._job(h, "cancel")
        if job is None:
            return h._json(404, {"detail": "Request not found"})
        if self._state(job) == "COMPLETED":
            return h._json(400, {"status": "ALREADY_COMPLETED"})
        job["cancelled"] = True
        h._json(202, {"status": "CANCELLATION_REQUESTED"})
