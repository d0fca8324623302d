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

from __future__ import annotations

import json
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import ParameterError
from ..plan import plan_generation
from .answers import Answers
from .endpoint import API_URL_ENV, DEFAULT_API_URL, parse_endpoint
from .errors import Cancelled, RemoteError, RemoteInterrupted, RemoteTimeout
from .keys import clean_key, resolve_api_key
from .results import RemoteImage, RemoteResult, batch_seed
from .transport import DEFAULT_MAX_BODY_BYTES, Dropped, Exchange, HttpTransport, NotSent

log = logging.getLogger(__name__)


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying after ``delay`` seconds (None: use the backoff)."""

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


class RemoteClient:
    """Talks to the hosted Aura Flow API. Build it with `from_environment`, call `generate`."""

    def __init__(self, api_key: str, *, url: str = DEFAULT_API_URL, key_source: str = "the given key",
                 connect_timeout: float = 15.0, timeout: float = 180.0, retry: RetryPolicy | None = None,
                 max_concurrency: int = 2, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 poll_interval: float = 0.1, ssl_context: ssl.SSLContext | None = None):
        self.endpoint = parse_endpoint(url)
        key = clean_key(api_key, key_source)
        self.key_source = key_source
        self.timeout = float(timeout)  # total per request: connect, upload, generation (~80 s) and download
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max(1, int(max_concurrency))
        self.poll_interval = float(poll_interval)
        self.transport = HttpTransport(self.endpoint, key, connect_timeout=connect_timeout,
                                       max_body_bytes=max_body_bytes, ssl_context=ssl_context)
        self.answers = Answers(self.endpoint, key, key_source)

    def __repr__(self):  # never show the key
        return f"RemoteClient({self.endpoint.display!r}, key from {self.key_source})"

    @classmethod
    def from_environment(cls, key_file=None, **options) -> "RemoteClient":
        """Key from `resolve_api_key` (env, then ``key_file``), URL from ``$SEGMIND_API_URL`` or the default."""
        key, source = resolve_api_key(key_file)
        url = os.environ.get(API_URL_ENV, "").strip() or DEFAULT_API_URL
        return cls(key, url=url, key_source=source, **options)

    def _request_body(self, params: dict, seed: int) -> bytes:
        body = {name: params[name] for name in ("prompt", "negative_prompt", "cfg", "shift", "steps", "width",
                                                 "height", "sampler", "scheduler", "output_format",
                                                 "output_quality")}
        body.update(seed=seed, number_of_images=1)
        return json.dumps(body).encode("utf-8")

    # ------------------------------------------------------------------------------------------- one image

    def _attempt(self, ctx: "_Call", index: int, seed: int, body: bytes) -> RemoteImage:
        """One request; returns the image or raises RemoteError (final) / _Retry / Cancelled."""
        n = ctx.total
        exchange = Exchange(time.monotonic() + self.timeout)
        ctx.register(exchange)
        try:
            resp = self.transport.post(exchange, body)
        except NotSent as exc:
            if exchange.reason == "cancel":
                raise Cancelled() from None
            raise _Retry(RemoteError(f"could not connect to {self.endpoint.display} ({exc}); check the network "
                                     f"or {API_URL_ENV}", index=index, billed=False)) from None
        except Dropped as exc:
            if exchange.reason == "cancel":
                raise Cancelled() from None
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
            return self.answers.decode(resp, ctx.params, index, seed)
        if resp.status == 429:
            delay = self.answers.reset_delay(resp.headers)
            msg = self.answers.service_message(resp.body)
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
                                     f"{self.answers.service_message(resp.body)}{maybe}", status=resp.status,
                                     index=index, billed=None if resp.status == 504 else False))
        raise self.answers.fatal(resp, index)

    def _one_image(self, ctx: "_Call", index: int) -> RemoteImage:
        seed = batch_seed(ctx.params["seed"], index)
        body = self._request_body(ctx.params, seed)
        retries = rate_retries = 0
        while True:
            if ctx.cancelled.wait(max(0.0, ctx.not_before - time.monotonic())):  # a shared rate-limit pause
                raise Cancelled()
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
                    raise Cancelled() from None
            except RemoteError as e:
                if e.status in (400, 401, 402, 403, 404, 405, 406, 422):
                    ctx.halted = f"image {index + 1} failed with HTTP {e.status}"  # every request would fail alike
                raise

    # ------------------------------------------------------------------------------------------- public

    def generate(self, plan, *, should_stop: Callable[[], bool] | None = None,
                 on_progress: Callable[[int, int, str], None] | None = None) -> RemoteResult:
        """Generate the plan's ``number_of_images`` images. ``plan``: a remote `GenerationPlan`
        (``plan_generation(params, remote=True)``), or the parameters as a dict, checked here before anything is sent.

        Returns a `RemoteResult` when at least one image arrived (``result.failures`` lists the others); raises
        `RemoteError` when none did (a single failure is raised as is), `RemoteInterrupted` when ``should_stop()``
        turned true (polled every ``poll_interval`` seconds, also while waiting to retry). ``on_progress(done,
        total, text)`` is called when an image arrives and about once a second while waiting.
        """
        if isinstance(plan, Mapping):
            plan = plan_generation(plan, remote=True)
        elif not plan.remote:
            raise ParameterError("this plan was made for the local engine; plan a remote run with "
                                 "plan_generation(params, remote=True) (the service's sizes and names differ)")
        params = plan.params()
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
                    except Cancelled:
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

