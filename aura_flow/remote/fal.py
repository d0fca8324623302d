"""fal's queue (``https://queue.fal.run``): submit, poll, fetch, cancel; the polling, retries, caps and key rules
are queue.py's, shared with Segmind's v2 queue.

``POST {base}/fal-ai/<model>`` with ``Authorization: Key <key>`` and the model's JSON input answers
``request_id``, ``status_url``, ``response_url`` and ``cancel_url``. ``GET status_url`` says ``IN_QUEUE`` (with
``queue_position``), ``IN_PROGRESS`` or ``COMPLETED`` (a failed run is COMPLETED with an ``error``); ``GET
response_url`` answers the model's output: ``images`` [{url, width, height, content_type}], ``seed``, ``prompt``
(what was drawn: the expanded prompt when ``expand_prompt`` was on) and, for pony-v7, ``has_nsfw_concepts``. The
images are fetched from fal's CDN without the key. ``PUT cancel_url`` asks fal to drop a request not yet finished
(202 ``CANCELLATION_REQUESTED``; 400 ``ALREADY_COMPLETED``).

The key goes only to the queue's own scheme, host and port: status, result and cancel URLs elsewhere are refused.
What each model takes is fal_params.py's.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from urllib.parse import quote

from .calls import Call
from .endpoint import Endpoint
from .errors import Cancelled, RemoteError
from .fal_params import MODEL_PATHS
from .queue import QueueRequests, Ticket, _json
from .results import RemoteImage
from .transport import Exchange, NotSent, Dropped

log = logging.getLogger(__name__)

CANCEL_TIMEOUT = 5.0  # seconds for each cancel request: Cancel and Ctrl-C must not hang on a silent service


class FalRequests(QueueRequests):
    """One image = one submit to fal's queue (never retried once an id came back), then polls and the result."""

    version = "queue"
    WAITING = ("IN_QUEUE", "IN_PROGRESS")
    KNOWN = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    failed_note = ""  # fal's billing of failed runs is not documented: nothing is claimed
    key_words = "the Authorization: Key header"

    def __init__(self, *args, model: str = "aura-flow", **kwargs):
        self.model = model
        super().__init__(*args, **kwargs)

    def submit_endpoint(self) -> Endpoint:
        base = self.transport.endpoint.path.split("?")[0].rstrip("/")
        return replace(self.transport.endpoint, path=f"{base}/{MODEL_PATHS[self.model]}")

    def request_paths(self, request_id: str) -> tuple[str, str, str]:
        rid = quote(request_id, safe="-_.")
        base = f"{self.submit_ep.path}/requests/{rid}"
        return f"{base}/status", base, f"{base}/cancel"

    def submit_hint(self) -> str:
        return ""

    @staticmethod
    def failure(doc: dict) -> str | None:
        if doc.get("status") == "COMPLETED" and doc.get("error"):
            error = doc["error"]
            return error if isinstance(error, str) else json.dumps(error)[:300]
        return None

    def annotate(self, image: RemoteImage, result: dict, params: dict) -> RemoteImage:
        """The prompt fal drew when it differs from the one sent (expand_prompt), and the image's NSFW flag."""
        nsfw = result.get("has_nsfw_concepts")
        if isinstance(nsfw, list) and nsfw and isinstance(nsfw[0], bool):
            image.nsfw = nsfw[0]
        used, sent = result.get("prompt"), params.get("prompt")
        if isinstance(used, str) and used.strip() and (sent is None or used.strip() != sent.strip()):
            image.prompt_used = self.answers.redacted(used)
        timings = result.get("timings")
        if isinstance(timings, dict) and isinstance(timings.get("inference"), (int, float)):
            image.headers.setdefault("x-generation-time", f"{timings['inference']:.2f}")
        return image

    # ------------------------------------------------------------------------------------------- cancel
    def cancel_open(self, ctx: Call) -> str:
        """``PUT cancel_url`` for every request named and not finished; returns what to tell the user."""
        jobs = [j for j in ctx.open_jobs() if getattr(j, "cancel_ep", None) is not None]
        if not jobs:
            return ""
        said = []
        for job in jobs:
            said.append(f"{job.request_id} ({self._cancel(job)})")
        text = f"asked fal to cancel request id(s) {', '.join(said)}"
        log.warning("AuraFlow remote: %s", text)
        return text

    def _cancel(self, job: Ticket) -> str:
        exchange = Exchange(time.monotonic() + CANCEL_TIMEOUT)
        try:
            resp = self.transport.send(exchange, job.cancel_ep, "PUT", b"", max_body_bytes=64 * 1024,
                                       billed_200=None)
        except (NotSent, Dropped, Cancelled) as exc:
            return f"the cancel did not reach fal: {exc.__class__.__name__}"
        except RemoteError as exc:
            return f"the cancel was refused: {exc}"
        doc = _json(resp) or {}
        state = self.answers.scrub(str(doc.get("status") or ""))
        if resp.status in (200, 202):
            return state.lower().replace("_", " ") or "cancellation requested"
        if state == "ALREADY_COMPLETED":
            return "already completed, so it may be billed; fetch it by its request id"
        return f"HTTP {resp.status}: {self.answers.service_message(resp.body)}"
