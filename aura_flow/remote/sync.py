"""The sync v1 API: ``POST /v1/aura-flow`` holds one connection open for the whole generation (~80 s) and answers
the raw image bytes, with the accounting (``x-request-id``, ``x-cost``, ...) in its headers.

The provider keeps it in maintenance mode; the client uses it when asked (``SEGMIND_API_VERSION=v1``). Its limit:
a dropped connection cannot tell whether the image was made and billed, so a retry may pay twice (said in the log).
"""
from __future__ import annotations

import time

from .calls import Call, Job, Sender
from .results import RemoteImage


class SyncRequests(Sender):
    """One image = one POST to the configured URL, retried within the policy's bounds."""

    version = "v1"

    def one_image(self, ctx: Call, index: int, seed: int, body: bytes) -> RemoteImage:
        return self.with_retries(ctx, index, lambda: self._attempt(ctx, index, seed, body))

    def _attempt(self, ctx: Call, index: int, seed: int, body: bytes) -> RemoteImage:
        resp = self.exchange(ctx, index, lambda ex: self.transport.post(ex, body), time.monotonic() + self.timeout)
        if resp.status != 200:
            raise self.not_ok(ctx, resp, index)
        rid = resp.headers.get("x-request-id")
        if rid:
            ctx.name(Job(index, self.answers.scrub(rid), state="COMPLETED"))
            ctx.finish(index)
        return self.answers.decode(resp, ctx.params, index, seed)
