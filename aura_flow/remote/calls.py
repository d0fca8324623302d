"""What the v1 requests and the v2 queue share: the state of one `RemoteClient.generate` call (cancel, shared
rate-limit pause, live exchanges, requests the service has named), the retry bounds, and the loop that sends a
request that no id names yet — a v1 request or a v2 submit — retrying only what cannot be billed twice silently.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .answers import Answers
from .errors import Cancelled, RemoteError, RemoteTimeout
from .transport import Dropped, Exchange, HttpTransport, NotSent, Response

log = logging.getLogger(__name__)

FATAL_FOR_BATCH = (400, 401, 402, 403, 404, 405, 406, 422)  # every other request of the batch would fail alike


class Retry(Exception):
    """This attempt failed in a way worth retrying after ``delay`` seconds (None: use the backoff)."""

    def __init__(self, error: RemoteError, delay: float | None = None, rate_limited: bool = False):
        super().__init__(str(error))
        self.error = error
        self.delay = delay
        self.rate_limited = rate_limited


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


@dataclass
class Job:
    """A request the service has named: its id, and where its result can be fetched for an hour (v2)."""

    index: int
    request_id: str
    response_url: str | None = None
    state: str = "QUEUED"


class Call:
    """State shared by the worker threads of one `RemoteClient.generate` call."""

    def __init__(self, params: dict, total: int):
        self.params = params
        self.total = total
        self.template: dict = {}  # fal: the JSON body every request of the call shares (its seed added per image)
        self.cancelled = threading.Event()
        self.halted: str | None = None  # set when a failure means no further request can succeed
        self.not_before = 0.0  # monotonic time before which no request is sent (a rate-limit reset)
        self.jobs: dict[int, Job] = {}  # named by the service and not finished (v2), by image index
        self.named: list[tuple[int, str]] = []  # (index, request id) in the order the service named them
        self._active: set[Exchange] = set()
        self._lock = threading.Lock()

    def register(self, ex: Exchange):
        with self._lock:
            self._active.add(ex)
        if self.cancelled.is_set():
            ex.abort("cancel")

    def unregister(self, ex: Exchange):
        with self._lock:
            self._active.discard(ex)

    def pause_until(self, when: float):
        with self._lock:
            self.not_before = max(self.not_before, when)

    def name(self, job: Job) -> Job:
        """The service named a request: kept open (it may still complete) until `finish`."""
        with self._lock:
            self.jobs[job.index] = job
            self.named.append((job.index, job.request_id))
        return job

    def finish(self, index: int):
        with self._lock:
            self.jobs.pop(index, None)

    def open_jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self.jobs.values(), key=lambda j: j.index)

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


class Sender:
    """Sends what no request id names yet and reads the answers every status shares. ``names`` maps the client's
    option names (``number_of_images``, ``timeout``, ...) to how the caller's user spells them (CLI flags)."""

    def __init__(self, transport: HttpTransport, answers: Answers, retry: RetryPolicy, timeout: float,
                 names: dict | None = None):
        self.transport = transport
        self.answers = answers
        self.retry = retry
        self.timeout = timeout
        self.names = dict(names or {})

    def cancel_open(self, ctx: "Call") -> str:
        """Ask the service to drop the call's unfinished requests; what to tell the user ("" where the service has
        no cancel, as Segmind's)."""
        return ""

    def say(self, option: str) -> str:
        return self.names.get(option, option)

    def timeout_words(self) -> str:
        """"the total timeout", naming the setting where the caller's user has one (``--timeout``)."""
        return f"the total timeout, {self.names['timeout']}" if "timeout" in self.names else "the total timeout"

    def exchange(self, ctx: Call, index: int, send: Callable[[Exchange], Response], deadline: float,
                 what: str = "", where: str | None = None, billable: bool = True) -> Response:
        """Run ``send`` registered with the call; connection faults become Retry, RemoteTimeout or Cancelled.
        ``what`` ends the fault's description (" for the status of ..."), ``where`` names the URL asked;
        ``billable=False`` for requests that never bill (v2's polls and fetches)."""
        exchange = Exchange(deadline)
        ctx.register(exchange)
        try:
            return send(exchange)
        except NotSent as exc:
            if exchange.reason == "cancel":
                raise Cancelled() from None
            raise Retry(RemoteError(f"could not connect to {where or self.transport.endpoint.display}{what} ({exc}); "
                                    f"check the network or {self.transport.url_env}", index=index,
                                    billed=False)) from None
        except Dropped as exc:
            if exchange.reason == "cancel":
                raise Cancelled() from None
            if exchange.reason == "timeout" or exc.timed_out:
                raise RemoteTimeout(
                    f"image {index + 1}/{ctx.total}: no complete answer within {self.timeout:g} s "
                    f"({self.timeout_words()}); not retried, because the service may still finish the "
                    "generation and bill it", index=index, billed=None) from None
            got = f" during a {exc.status} response" if exc.status else ""
            if not billable:
                raise Retry(RemoteError(f"the connection dropped{got}{what} ({exc})", index=index)) from None
            billed = ("it was billed (only a 200 is), and the retry is billed again" if exc.status == 200 else
                      "the dropped request may have been billed")
            raise Retry(RemoteError(f"the connection dropped{got}{what} ({exc}); {billed}", index=index,
                                    billed=True if exc.status == 200 else None)) from None
        finally:
            ctx.unregister(exchange)

    def not_ok(self, ctx: Call, resp: Response, index: int, where: str | None = None) -> Retry | RemoteError:
        """The Retry (429, 408, 5xx) or the final error for an answer that carries no result."""
        if resp.status == 429:
            delay = self.answers.reset_delay(resp.headers)
            msg = self.answers.service_message(resp.body)
            if delay is not None and delay > self.retry.max_rate_limit_wait:
                return RemoteError(f"rate limited (429): the service resets in {delay:.0f} s, longer than the "
                                   f"{self.retry.max_rate_limit_wait:g} s this client waits: {msg}. Try again "
                                   f"later or lower {self.say('number_of_images')}", status=429, index=index,
                                   billed=False)
            wait_s = self.retry.rate_limit_default_wait if delay is None else max(0.0, delay)
            ctx.pause_until(time.monotonic() + wait_s)  # the other requests of the batch wait for the reset too
            return Retry(RemoteError(f"rate limited (429): {msg}", status=429, index=index, billed=False),
                         delay=wait_s, rate_limited=True)
        if resp.status == 408 or resp.status >= 500:
            maybe = ("; a 504 may hide a generation that finished and was billed"
                     if resp.status == 504 else " (not billed)")
            return Retry(RemoteError(f"the service failed with HTTP {resp.status}: "
                                     f"{self.answers.service_message(resp.body)}{maybe}", status=resp.status,
                                     index=index, billed=None if resp.status == 504 else False))
        return self.answers.fatal(resp, index, where)

    def with_retries(self, ctx: Call, index: int, attempt: Callable[[], object]):
        """Call ``attempt()`` until it returns, retrying Retry within the policy's bounds; waits are interruptible."""
        retries = rate_retries = 0
        while True:
            if ctx.cancelled.wait(max(0.0, ctx.not_before - time.monotonic())):  # a shared rate-limit pause
                raise Cancelled()
            if ctx.halted is not None:
                raise RemoteError(f"not sent, because {ctx.halted}", index=index, billed=False)
            try:
                return attempt()
            except Retry as r:
                if r.rate_limited:
                    if rate_retries >= self.retry.max_rate_limit_retries:
                        r.error.args = (f"{r.error} — still rate limited after {rate_retries + 1} tries; try again "
                                        f"later or lower {self.say('number_of_images')}",)
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
                    raise Cancelled() from None
            except RemoteError as e:
                if e.status in FATAL_FOR_BATCH and ctx.halted is None:
                    ctx.halted = f"image {index + 1} failed with HTTP {e.status}"
                raise
