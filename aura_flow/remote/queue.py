"""The async v2 API: submit, poll, fetch.

``POST /v2/aura-flow`` (same key header and JSON body as v1) answers at once with a ``request_id`` and the
``status_url`` / ``response_url`` of the request; ``GET status_url`` says QUEUED, PROCESSING, COMPLETED or FAILED
(FAILED may come as HTTP 422 with that body); ``GET response_url`` holds the result, whose ``output`` names the
image (a media URL on another host, or inline data). Status and result expire one hour after submission (404).

Only the submit is ever billed, so only it follows v1's careful retry rules; polls and fetches are free and are
retried on transient faults (bounded, with backoff) without ever submitting again. The key goes to the API's host
only: status and result URLs elsewhere are refused, and the media host gets a request without it. No redirect is
followed anywhere.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from .calls import Call, Job, Retry, Sender
from .endpoint import (API_VERSION_ENV, REQUEST_ID, Endpoint, on_api_host, parse_endpoint, v2_request_paths,
                       v2_submit_endpoint)
from .errors import Cancelled, RemoteError, RemoteTimeout
from .outputs import describe, media_sources
from .results import RemoteImage
from .transport import Response

log = logging.getLogger(__name__)

STATUS_BODY_CAP = 1024 * 1024  # a submit or status answer is a few hundred bytes of JSON
WAITING = ("QUEUED", "PROCESSING")
KNOWN = ("QUEUED", "PROCESSING", "COMPLETED", "FAILED")


@dataclass
class PollPolicy:
    """How often the status is asked for: ``first`` seconds after the submit, then each wait ``factor`` times the
    last, up to ``most``. Tests shrink these."""

    first: float = 1.0
    factor: float = 1.5
    most: float = 5.0
    request_timeout: float = 30.0  # one status poll; a silent one is retried, not waited on for the whole timeout
    max_retries: int = 5  # transient faults in a row while polling or fetching one request

    def next(self, delay: float) -> float:
        return min(self.most, delay * self.factor)


DEFAULT_POLL = PollPolicy()  # what a client built without ``poll=`` uses


@dataclass
class Ticket(Job):
    status_ep: Endpoint | None = None
    response_ep: Endpoint | None = None
    cancel_ep: Endpoint | None = None  # where a cancel goes (fal); None where the service has none (Segmind)


class QueueRequests(Sender):
    """One image = one submit (retried only while no id has come back), then polls and fetches of that request."""

    version = "v2"
    WAITING, KNOWN = WAITING, KNOWN  # the status values that mean "not yet", and every one this client knows
    failed_note = " (a failed request is not billed)"
    key_words = "the x-api-key header"

    def __init__(self, *args, poll: PollPolicy | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.poll = poll or DEFAULT_POLL
        self.submit_ep = self.submit_endpoint()

    # ------------------------------------------------------------------------------------------- protocol hooks
    # Segmind's v2 queue here; fal.py overrides them for fal's queue.
    def submit_endpoint(self) -> Endpoint:
        return v2_submit_endpoint(self.transport.endpoint)

    def request_paths(self, request_id: str) -> tuple[str, str, str | None]:
        """The documented status, result and cancel paths of a request (cancel None: the service has none)."""
        return (*v2_request_paths(self.submit_ep, request_id), None)

    def submit_hint(self) -> str:
        return (f". If this address serves only the sync API, choose v1 ({self.say('api_version')} v1, or "
                f"{API_VERSION_ENV}=v1)")

    @staticmethod
    def failure(doc: dict) -> str | None:
        """The error of a status or result that reports a failed request, else None."""
        if doc.get("status") == "FAILED":
            return str(doc.get("error") or "(no error given)")
        return None

    def annotate(self, image: RemoteImage, result: dict, params: dict) -> RemoteImage:
        """Add what the result says about the image beyond its bytes (fal: the prompt used, the NSFW flag)."""
        return image

    def one_image(self, ctx: Call, index: int, seed: int, body: bytes) -> RemoteImage:
        job = self.with_retries(ctx, index, lambda: self._submit(ctx, index, body))
        return self._collect(ctx, job, seed, self.poll.first)

    def fetch_image(self, ctx: Call, index: int, request_id: str) -> RemoteImage:
        """The image of a request submitted before (by this client or another run, within the hour its result is
        kept): polled at once, nothing submitted. Its seed is the one the service reports, else None."""
        status_path, response_path, cancel_path = self.request_paths(request_id)
        api = self.transport.endpoint
        status_ep = on_api_host(api, status_path, "status_url", self.answers.scrub)
        response_ep = on_api_host(api, response_path, "response_url", self.answers.scrub)
        cancel_ep = on_api_host(api, cancel_path, "cancel_url", self.answers.scrub) if cancel_path else None
        job = Ticket(index, request_id, response_ep.display, status_ep=status_ep, response_ep=response_ep,
                     cancel_ep=cancel_ep)
        ctx.name(job)
        return self._collect(ctx, job, None, 0.0)

    def _collect(self, ctx: Call, job: Ticket, seed: int | None, first_poll: float) -> RemoteImage:
        """Poll the named request until it completes, then fetch its image."""
        index = job.index
        deadline = time.monotonic() + self.timeout
        try:
            result = self._wait(ctx, job, deadline, first_poll)
            image = self._image(ctx, job, result, seed, deadline)
        except RemoteError as err:  # every error after the submit names the request, to find it again
            err.request_id = err.request_id or job.request_id
            if job.request_id not in str(err):
                err.args = (f"image {index + 1}/{ctx.total}, request id {job.request_id}: {err}",)
            raise
        ctx.finish(index)
        return image

    # ------------------------------------------------------------------------------------------- submit

    def _submit(self, ctx: Call, index: int, body: bytes) -> Ticket:
        resp = self.exchange(ctx, index, lambda ex: self.transport.send(ex, self.submit_ep, "POST", body,
                                                                        max_body_bytes=STATUS_BODY_CAP,
                                                                        billed_200=None),
                             time.monotonic() + self.timeout, where=self.submit_ep.display)
        if not 200 <= resp.status < 300:
            err = self.not_ok(ctx, resp, index, where=self.submit_ep.display)
            if resp.status in (404, 405) and self.submit_hint():  # e.g. a proxy that knows only the sync API
                err.args = (f"{err}{self.submit_hint()}",)
            raise err
        doc = _json(resp)
        rid = doc.get("request_id") if doc else None
        if not isinstance(rid, str) or not rid.strip() or len(rid) > 200 or not rid.strip().isprintable():
            ctx.halted = ctx.halted or f"image {index + 1}'s submit was answered without a request id"
            raise RemoteError(
                f"the service accepted image {index + 1}/{ctx.total} (HTTP {resp.status}) but named no request id "
                f"({describe(doc, self.answers.scrub) if doc else 'the answer is not JSON'}); a job may have been "
                "queued and billed: look for it in the provider's console. Not retried, so it is not paid "
                f"twice{self.submit_hint()}", status=resp.status, index=index, billed=None)
        rid = self.answers.scrub(rid.strip())
        if not REQUEST_ID.fullmatch(rid):  # it goes into URL paths and file names: '..' or 'a/b' would escape them
            ctx.halted = ctx.halted or f"image {index + 1}'s submit was answered with a malformed request id"
            raise RemoteError(
                f"the service accepted image {index + 1}/{ctx.total} (HTTP {resp.status}) but named the request id "
                f"{rid[:80]!r}, which is not of the form request ids take (letters, digits, '-', '_', '.', starting "
                "with a letter or digit); refused, so no other path of the API is asked. A job may have been queued "
                "and billed: look for it in the provider's console. Not retried, so it is not paid twice",
                status=resp.status, index=index, billed=None)
        status_path, response_path, cancel_path = self.request_paths(rid)
        try:
            api = self.transport.endpoint
            status_ep = on_api_host(api, _text(doc.get("status_url")) or status_path, "status_url",
                                    self.answers.scrub)
            response_ep = on_api_host(api, _text(doc.get("response_url")) or response_path, "response_url",
                                      self.answers.scrub)
            cancel = _text(doc.get("cancel_url")) or cancel_path
            cancel_ep = on_api_host(api, cancel, "cancel_url", self.answers.scrub) if cancel else None
        except RemoteError as err:
            ctx.halted = ctx.halted or f"image {index + 1}'s answer pointed off the API host"
            err.args = (f"image {index + 1}/{ctx.total}, request id {rid}: {err}; the request may still complete "
                        "and be billed",)
            err.index, err.request_id = index, rid
            raise
        ticket = Ticket(index, rid, response_ep.display, status_ep=status_ep, response_ep=response_ep,
                        cancel_ep=cancel_ep)
        ctx.name(ticket)
        log.info("AuraFlow remote: image %d/%d: request id %s queued", index + 1, ctx.total, rid)
        return ticket

    # ------------------------------------------------------------------------------------------- poll, fetch

    def _wait(self, ctx: Call, job: Ticket, deadline: float, first_poll: float) -> dict:
        """Poll (the first time after ``first_poll`` seconds) until COMPLETED; returns the result document (its
        metrics merged with the status's)."""
        wait = first_poll
        while True:
            if ctx.cancelled.wait(max(0.0, min(wait, deadline - time.monotonic()))):
                raise Cancelled()
            if time.monotonic() >= deadline:
                raise self._timeout(ctx, job)
            resp = self._get(ctx, job, job.status_ep, "status", deadline, cap=STATUS_BODY_CAP,
                             per_request=self.poll.request_timeout)
            doc = _json(resp) or {}
            state, ok = doc.get("status"), 200 <= resp.status < 300
            if ok and state in self.WAITING:
                position = doc.get("queue_position")  # fal's: shown in the progress text and a timeout's message
                job.state = state + (f" at queue position {position}" if type(position) is int else "")
                wait = self.poll.next(wait) if wait >= self.poll.first else self.poll.first
                continue
            if ok and state == "COMPLETED" and self.failure(doc) is None:
                job.state = state
                break
            self._raise_terminal(ctx, job, resp, doc, "status")
        resp = self._get(ctx, job, job.response_ep, "result", deadline, billed_200=True)
        result = _json(resp)
        if resp.status != 200 or result is None or self.failure(result) is not None:
            self._raise_terminal(ctx, job, resp, result or {}, "result", completed=True)
        metrics = {**(doc.get("metrics") or {}), **(result.get("metrics") or {})}
        return {**result, "metrics": metrics}

    def _raise_terminal(self, ctx: Call, job: Ticket, resp: Response, doc: dict, what: str, completed=False):
        i, n, rid, keep = job.index + 1, ctx.total, job.request_id, self._kept(job)
        failure = self.failure(doc)
        if failure is not None:
            ctx.finish(job.index)
            raise RemoteError(f"image {i}/{n}: the service reports request id {rid} FAILED: "
                              f"{self.answers.scrub(failure)}{self.failed_note}", index=job.index,
                              billed=False if self.failed_note else None, request_id=rid)
        if resp.status == 404:
            ctx.finish(job.index)
            raise RemoteError(f"image {i}/{n}: the service no longer knows request id {rid} (HTTP 404 for its "
                              f"{what}): a request's status and result expire one hour after it is submitted; "
                              "look for it in the console's Generations list", status=404, index=job.index,
                              billed=True if completed else None, request_id=rid)
        if 200 <= resp.status < 300 and doc:
            state = self.answers.scrub(str(doc.get("status")))
            raise RemoteError(f"image {i}/{n}: the service reports status {state!r} for request id {rid}, which "
                              f"this client does not know (expected {', '.join(self.KNOWN)}); {keep}", index=job.index,
                              billed=True if completed else None, request_id=rid)
        if 200 <= resp.status < 300:
            raise RemoteError(f"image {i}/{n}: the {what} of request id {rid} is not a JSON object "
                              f"({self.answers.service_message(resp.body)}); {keep}", status=200, index=job.index,
                              billed=True if completed else None, request_id=rid)
        err = self.answers.fatal(resp, job.index, where=f"the {what} URL of request id {rid}")
        if resp.status in (401, 403):
            ctx.halted = ctx.halted or f"image {i}'s {what} was refused with HTTP {resp.status}"
        err.args = (f"image {i}/{n}: {err}; {keep}",)
        err.request_id, err.billed = rid, True if completed else None
        raise err

    def _get(self, ctx: Call, job: Ticket, target: Endpoint, what: str, deadline: float, *, key: bool = True,
             cap: int | None = None, per_request: float | None = None, billed_200: bool | None = None) -> Response:
        """GET ``target``, retrying transient faults (refused, dropped, silent, 408, 429, 5xx) with backoff."""
        failures, where = 0, f" for the {what} of request id {job.request_id}"
        while True:
            end = deadline if per_request is None else min(deadline, time.monotonic() + per_request)
            try:
                resp = self.exchange(ctx, job.index, lambda ex: self.transport.send(
                    ex, target, key=key, max_body_bytes=cap, billed_200=billed_200), end, what=where,
                    where=target.display if not key else None, billable=False)
                if resp.status not in (408, 429) and resp.status < 500:
                    return resp
                retry = self._transient(ctx, resp, job, what)
            except RemoteTimeout:
                if time.monotonic() >= deadline:
                    raise self._timeout(ctx, job) from None
                retry = Retry(RemoteError(f"no answer{where} within {per_request:g} s", index=job.index))
            except Retry as r:
                retry = r
            failures += 1
            if failures > self.poll.max_retries:
                raise RemoteError(f"image {job.index + 1}/{ctx.total}: lost track of request id {job.request_id} "
                                  f"after {failures} tries to fetch its {what} ({retry.error}); {self._kept(job)}",
                                  status=retry.error.status, index=job.index, billed=None,
                                  request_id=job.request_id)
            delay = retry.delay if retry.delay is not None else self.retry.backoff_delay(failures - 1)
            log.warning("AuraFlow remote: image %d/%d: %s; asking again in %.1f s (nothing is submitted again)",
                        job.index + 1, ctx.total, retry.error, delay)
            if ctx.cancelled.wait(max(0.0, min(delay, deadline - time.monotonic()))):
                raise Cancelled()
            if time.monotonic() >= deadline:
                raise self._timeout(ctx, job)

    def _transient(self, ctx: Call, resp: Response, job: Ticket, what: str) -> Retry:
        msg = self.answers.service_message(resp.body)
        if resp.status == 429:
            delay = self.answers.reset_delay(resp.headers)
            delay = self.retry.rate_limit_default_wait if delay is None else max(0.0, delay)
            ctx.pause_until(time.monotonic() + delay)  # new submits wait for the reset too
            return Retry(RemoteError(f"rate limited (429) while asking for the {what} of request id "
                                     f"{job.request_id}: {msg}", status=429, index=job.index), delay=delay)
        return Retry(RemoteError(f"HTTP {resp.status} for the {what} of request id {job.request_id}: {msg}",
                                 status=resp.status, index=job.index))

    def _timeout(self, ctx: Call, job: Ticket) -> RemoteTimeout:
        return RemoteTimeout(f"image {job.index + 1}/{ctx.total}: request id {job.request_id} did not complete "
                             f"within {self.timeout:g} s ({self.timeout_words()}; last status "
                             f"{job.state}); {self._kept(job)}", index=job.index, billed=None,
                             request_id=job.request_id)

    def _kept(self, job: Ticket) -> str:
        return (f"it may still complete and be billed: its result stays at {job.response_url} for an hour "
                f"after submission (GET with {self.key_words})")

    # ------------------------------------------------------------------------------------------- the image

    def _image(self, ctx: Call, job: Ticket, result: dict, seed: int | None, deadline: float) -> RemoteImage:
        i, n, rid = job.index + 1, ctx.total, job.request_id
        billed = (f"; it was billed: its result stays at {job.response_url} for an hour, and "
                  f"{self.answers.provider.label} support can look it up by request id {rid}")
        try:
            sources = media_sources(result)
        except ValueError as exc:
            raise RemoteError(f"image {i}/{n}: the inline image of request id {rid} is {exc}{billed}",
                              index=job.index, billed=True, request_id=rid) from None
        if not sources:
            raise RemoteError(f"image {i}/{n}: the result of request id {rid} names no image "
                              f"({describe(result, self.answers.scrub)}){billed}", index=job.index, billed=True,
                              request_id=rid)
        if len(sources) > 1:
            log.warning("AuraFlow remote: image %d/%d: request id %s returned %d images for one asked; the first is "
                        "kept", i, n, rid, len(sources))
        kind, value = sources[0]
        ctype = ""
        if kind == "url":
            value, ctype = self._media(ctx, job, value, deadline, billed)
        headers = _accounting(result, rid)
        if ctype:
            headers["content-type"] = ctype
        image = self.answers.decode(Response(200, headers, value), ctx.params, job.index, seed)
        return self.annotate(image, result, ctx.params)

    def _media(self, ctx: Call, job: Ticket, url: str, deadline: float, billed: str) -> tuple[bytes, str]:
        """The image bytes from the media host named in ``output``: no key, no redirect, capped."""
        i, n, rid, shown = job.index + 1, ctx.total, job.request_id, self.answers.scrub(url.split("?")[0])
        try:
            target = parse_endpoint(url, "the image URL")
        except RemoteError as err:
            raise RemoteError(f"image {i}/{n}: the image of request id {rid} is at {shown}, not fetched: {err}"
                              f"{billed}", index=job.index, billed=True, request_id=rid) from None
        resp = self._get(ctx, job, target, "image", deadline, key=False, billed_200=True)
        if resp.status == 200:
            return resp.body, resp.headers.get("content-type", "")
        if 300 <= resp.status < 400:
            why = (f"redirects ({resp.status}) to "
                   f"{self.answers.scrub(resp.headers.get('location', '(no location)').split('?')[0])}; not "
                   "followed (this client follows no redirects)")
        else:
            why = f"answered HTTP {resp.status}: {self.answers.service_message(resp.body)}"
        raise RemoteError(f"image {i}/{n}: the media host of request id {rid} ({shown}) {why}{billed}",
                          status=resp.status, index=job.index, billed=True, request_id=rid)


def _json(resp: Response) -> dict | None:
    try:
        doc = json.loads(resp.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def _accounting(result: dict, request_id: str) -> dict:
    """v2's metrics as v1's accounting headers, so every image reads the same (``x-request-id``, ``x-cost``...)."""
    metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else {}
    out = {"x-request-id": request_id}
    for header, key in (("x-cost", "cost"), ("x-remaining-credits", "remaining_credits"),
                        ("x-generation-time", "inference_time")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[header] = f"{value:g}"
        elif isinstance(value, str) and value.strip():
            out[header] = value.strip()
    seed = result.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) or isinstance(seed, str) and seed.strip().isdigit():
        out["x-seed-value"] = str(seed).strip()
    return out

