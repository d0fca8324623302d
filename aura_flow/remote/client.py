"""Client for the hosted Aura Flow APIs: Segmind (the default; its async v2 queue, or the sync v1 API when asked)
and fal's queue (``provider="fal"``, models ``aura-flow`` and ``pony-v7``; see fal.py and fal_params.py).

v2 (queue.py): ``POST /v2/aura-flow`` answers a request id at once; the client polls the request's status, fetches
its result and then the image named in its ``output``. A lost connection costs a poll, never a second generation.
v1 (sync.py): ``POST /v1/aura-flow`` holds the connection for the whole ~80 s and answers the image bytes.
``SEGMIND_API_VERSION=v1``, ``api_version="v1"``, the CLI's ``--api-version v1`` or the node's ``api_version``
input select it.

Standard library HTTP only (http.client), no ComfyUI imports. The API key is read from ``SEGMIND_API_KEY`` or a
key file (see `resolve_api_key`) and goes only to the API's host, in a header: it is never logged, never put in an
exception message, and scrubbed from anything the service echoes back.

One request returns one image, so ``number_of_images = N`` becomes N requests with ``number_of_images = 1`` and
seeds ``seed, seed+1, ...`` (mod 2**64); image ``i`` is reproduced by asking for one image with seed ``seed+i``.
They run on a small thread pool (2 at a time by default: the free tier allows 5 requests a minute and a
generation takes about 80 s). Every image that arrived is kept when a later one fails; `RemoteResult.failures`
says which failed and why. Every request the service names has its request id in the image's headers, the
failures and the progress text, so a billed result can be found again.

Retries of what no id names yet (a v1 request, a v2 submit): 429 waits for the reset time the service names
(bounded) and retries; 408/5xx, refused and dropped connections retry with exponential backoff and jitter
(bounded). Only a 200 is billed, but a dropped connection, a 504 or a timeout may hide a generation that
finished and was billed: those are said in the log, and a total timeout is not retried at all.
"""
from __future__ import annotations

import json
import logging
import math
import os
import ssl
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Optional

from ..errors import ParameterError, shown
from ..plan import plan_generation
from .answers import Answers
from .calls import Call, RetryPolicy
from .endpoint import REQUEST_ID, parse_endpoint, resolve_api_version
from .errors import Cancelled, RemoteError, RemoteInterrupted
from .fal import FalRequests
from .fal_params import OPTION_DEFAULTS, check_options, fal_body
from .keys import clean_key, resolve_api_key
from .providers import FAL, check_model, get_provider
from .queue import PollPolicy, QueueRequests
from .results import RemoteImage, RemoteResult, batch_seed
from .sync import SyncRequests
from .transport import DEFAULT_MAX_BODY_BYTES, HttpTransport

log = logging.getLogger(__name__)

_BODY_FIELDS = ("prompt", "negative_prompt", "cfg", "shift", "steps", "width", "height", "sampler", "scheduler",
                "output_format", "output_quality")


def positive_seconds(value, name: str = "timeout") -> float:
    """``value`` as a finite number of seconds above 0, else a ParameterError naming ``name``."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ParameterError(f"{name}={value!r} is not allowed; give a finite number of seconds above 0 "
                             "(e.g. 180)")
    return seconds


MAX_FETCH = 10  # request ids a `RemoteClient.fetch` call takes (as many as one generate call makes)
MAX_CONCURRENCY = 32  # requests at a time (one call makes at most 10; the batch backend keeps as many in flight)


def check_concurrency(value, name: str = "max_concurrency") -> int:
    """``value`` as requests at a time, an integer 1..MAX_CONCURRENCY, else a ParameterError naming ``name``."""
    if type(value) is not int or not 1 <= value <= MAX_CONCURRENCY:
        raise ParameterError(f"{name}={shown(value)} is out of range; give requests at a time, 1 to {MAX_CONCURRENCY} "
                             "(the free tier allows 5 requests a minute)")
    return value
_REQUEST_ID = REQUEST_ID


def check_request_ids(values, name: str = "request_ids") -> list[str]:
    """``values`` (one id or several) as a list of 1..MAX_FETCH distinct request ids of the form the service gives
    (letters, digits, ``-``, ``_``, ``.``), else a ParameterError naming ``name``."""
    ids = [values] if isinstance(values, str) else list(values) if isinstance(values, (list, tuple)) else None
    if not ids or len(ids) > MAX_FETCH:
        raise ParameterError(f"{name}: give 1 to {MAX_FETCH} request ids, got "
                             f"{len(ids) if ids is not None else shown(values)}")
    for rid in ids:
        if not isinstance(rid, str) or not _REQUEST_ID.fullmatch(rid):
            raise ParameterError(f"{name}: {shown(rid)} is not a request id as the service gives them (letters, "
                                 "digits, '-', '_' and '.', up to 200; e.g. the id printed or stored with an image)")
    if len(set(ids)) != len(ids):
        raise ParameterError(f"{name}: {next(r for r in ids if ids.count(r) > 1)!r} is given twice")
    return ids


class RemoteClient:
    """Talks to a hosted Aura Flow API. Build it with `from_environment`, call `generate`.

    ``provider``: "segmind" (None, the default) or "fal"; ``model``: "aura-flow" (the default) or, on fal,
    "pony-v7". ``url``: the API's address (None: the provider's default). ``api_version`` (Segmind only): "v2" (the
    queue), "v1" (sync), or None/"auto" for ``$SEGMIND_API_VERSION`` else v2. ``names`` maps option names
    (``timeout``, ``api_version``, ``number_of_images``, ``request_ids``, ``provider``, ``model`` and the
    parameters) to how the caller's user spells them, so messages speak the words of the place
    (``{"timeout": "--timeout"}`` on the command line).
    """

    def __init__(self, api_key: str, *, url: str | None = None, api_version: str | None = None,
                 key_source: str = "the given key", connect_timeout: float = 15.0, timeout: float = 180.0,
                 retry: RetryPolicy | None = None, poll: PollPolicy | None = None, max_concurrency: int = 2,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, poll_interval: float = 0.1,
                 ssl_context: ssl.SSLContext | None = None, names: dict | None = None, provider: str | None = None,
                 model: str | None = None):
        names = dict(names or {})
        self.names = names
        self.timeout = positive_seconds(timeout, names.get("timeout", "timeout"))  # per image, all stages
        self.provider = get_provider(provider, names.get("provider", "provider"))
        self.model = check_model(self.provider, model, names.get("model", "model"), names.get("provider", "provider"))
        self.api_version = _api_version(self.provider, api_version, names)
        self.endpoint = parse_endpoint(url or self.provider.default_url, self.provider.url_env)
        key = clean_key(api_key, key_source, self.provider)
        self.key_source = key_source
        self.retry = retry or RetryPolicy()
        self.max_concurrency = check_concurrency(max_concurrency, names.get("concurrency", "max_concurrency"))
        self.poll_interval = float(poll_interval)  # how often should_stop and the deadlines are checked
        fal = self.provider is FAL
        self.transport = HttpTransport(self.endpoint, key, connect_timeout=connect_timeout,
                                       max_body_bytes=max_body_bytes, ssl_context=ssl_context,
                                       key_header="Authorization" if fal else "x-api-key",
                                       key_prefix="Key " if fal else "", url_env=self.provider.url_env)
        self.answers = Answers(self.endpoint, key, key_source, self.provider)
        if fal:
            self.requests = FalRequests(self.transport, self.answers, self.retry, self.timeout, names, poll=poll,
                                        model=self.model)
            self.submit_endpoint = self.requests.submit_ep
        elif self.api_version == "v2":
            self.requests = QueueRequests(self.transport, self.answers, self.retry, self.timeout, names, poll=poll)
            self.submit_endpoint = self.requests.submit_ep
        else:
            self.requests = SyncRequests(self.transport, self.answers, self.retry, self.timeout, names)
            self.submit_endpoint = self.endpoint

    def __repr__(self):  # never show the key
        return (f"RemoteClient({self.provider.name}, {self.submit_endpoint.display!r}, {self.api_version}, key from "
                f"{self.key_source})")

    @classmethod
    def from_environment(cls, key_file=None, **options) -> "RemoteClient":
        """Provider from ``provider`` (default Segmind); key from `resolve_api_key` (the provider's variable, then
        ``key_file``); URL from ``$SEGMIND_API_URL`` / ``$FAL_QUEUE_URL`` or the default, checked as it is read;
        Segmind's API version from ``api_version`` or ``$SEGMIND_API_VERSION`` (default v2)."""
        names = options.get("names") or {}
        options["timeout"] = positive_seconds(options.get("timeout", 180.0), names.get("timeout", "timeout"))
        check_concurrency(options.get("max_concurrency", 2), names.get("concurrency", "max_concurrency"))
        provider = get_provider(options.get("provider"), names.get("provider", "provider"))  # all before the key
        check_model(provider, options.get("model"), names.get("model", "model"), names.get("provider", "provider"))
        _api_version(provider, options.get("api_version"), names)
        url = os.environ.get(provider.url_env, "")
        url = url.strip() if url.strip() else provider.default_url
        parse_endpoint(url, provider.url_env)  # a bad address is refused when read, naming its variable
        key, source = resolve_api_key(key_file, provider)
        return cls(key, url=url, key_source=source, **options)

    def _request_body(self, ctx, seed: int) -> bytes:
        """One request's JSON body; ``ctx``: the call (or, for Segmind, its parameters as a dict)."""
        if self.provider is FAL:
            return json.dumps({**ctx.template, "seed": seed}).encode("utf-8")
        params = ctx.params if isinstance(ctx, Call) else ctx
        body = {name: params[name] for name in _BODY_FIELDS}
        body.update(seed=seed, number_of_images=1)
        return json.dumps(body).encode("utf-8")

    def _one_image(self, ctx: Call, index: int) -> RemoteImage:
        seed = batch_seed(ctx.params["seed"], index)
        return self.requests.one_image(ctx, index, seed, self._request_body(ctx, seed))

    # ------------------------------------------------------------------------------------------- public

    def generate(self, plan, *, should_stop: Callable[[], bool] | None = None,
                 on_progress: Callable[[int, int, str], None] | None = None,
                 on_request: Callable[[int, str], None] | None = None, options: dict | None = None) -> RemoteResult:
        """Generate the plan's ``number_of_images`` images. ``plan``: a remote `GenerationPlan`
        (``plan_generation(params, remote=True)``), or the parameters as a dict, checked here before anything is sent;
        on fal, also against what the model takes (a parameter left at its default is not sent; one set that the
        model cannot honour is a ParameterError). ``options``: fal's ``expand_prompt`` (off unless asked),
        ``noise_source`` and ``enable_safety_checker`` (refused on Segmind when set).

        Returns a `RemoteResult` when at least one image arrived (``result.failures`` lists the others); raises
        `RemoteError` when none did (a single failure is raised as is), `RemoteInterrupted` when ``should_stop()``
        turned true (polled every ``poll_interval`` seconds, also while waiting to retry or poll; it names the
        request ids that may still complete). ``on_progress(done, total, text)`` is called when an image arrives
        and about once a second while waiting; ``on_request(index, request_id)`` when the service names a
        request. Both are called on the calling thread.
        """
        if isinstance(plan, Mapping):
            plan = plan_generation(plan, remote=True)
        elif not plan.remote:
            raise ParameterError("this plan was made for the local engine; plan a remote run with "
                                 "plan_generation(params, remote=True) (the service's sizes and names differ)")
        ctx = self.check(plan, options)
        params, n = plan.params(), ctx.total
        log.info("AuraFlow remote: %d image(s) %dx%d, %d steps, from %s (%s %s)", n, params["width"],
                 params["height"], params["steps"], self.submit_endpoint.display, self.provider.name,
                 self.api_version)
        return self._gather(ctx, self._one_image, should_stop, on_progress, on_request)

    def check(self, plan, options: dict | None = None) -> Call:
        """Check ``plan`` (a remote `GenerationPlan`) and fal ``options`` against the provider and model, sending
        nothing; a ParameterError names the parameter, the provider and the model. Returns the call `generate` makes.
        """
        params = plan.params()
        n = params["number_of_images"]
        fal_options = check_options(options, self.names)
        if self.provider is FAL:
            template, expect = fal_body(params, self.model, fal_options, self.names)
            ctx = Call({**params, **expect}, n)
            ctx.template = template
            return ctx
        for name, value in fal_options.items():
            if value != OPTION_DEFAULTS[name]:
                raise ParameterError(f"{self.names.get(name, name)}={value!r} is a fal option; "
                                     f"{self.names.get('provider', 'provider')}=segmind has none (leave it at "
                                     f"{OPTION_DEFAULTS[name]!r}, or use fal)")
        return Call(params, n)

    def fetch(self, request_ids, *, should_stop: Callable[[], bool] | None = None,
              on_progress: Callable[[int, int, str], None] | None = None) -> RemoteResult:
        """The images of requests submitted before, by their request ids (Segmind's v2 keeps a result for an hour
        after the submit; fal's queue keeps it too, under the client's ``model``): each is polled until it completes
        and its image fetched; nothing is submitted, so nothing is billed again. Returns and raises as `generate`;
        an image's seed is the one the service reports, else None, and its size and format are as sent. Up to
        ``MAX_FETCH`` ids a call."""
        if self.api_version == "v1":
            raise ParameterError(f"{self.names.get('api_version', 'api_version')}={self.api_version!r}: only the v2 "
                                 "API keeps results to fetch by request id; use v2")
        ids = check_request_ids(request_ids, self.names.get("request_ids", "request_ids"))
        params = {"request_ids": ids, "number_of_images": len(ids), "seed": None, "width": None, "height": None,
                  "output_format": None, "output_quality": 80, "prompt": None}
        log.info("AuraFlow remote: fetching %d earlier request(s) from %s", len(ids), self.submit_endpoint.display)
        return self._gather(Call(params, len(ids)), lambda ctx, i: self.requests.fetch_image(ctx, i, ids[i]),
                            should_stop, on_progress, None)

    def _gather(self, ctx: Call, work: Callable[[Call, int], RemoteImage], should_stop, on_progress,
                on_request) -> RemoteResult:
        """Run ``work(ctx, i)`` for every image of ``ctx`` on the pool; keep what arrives, say what failed."""
        n = ctx.total
        result = RemoteResult(ctx.params, api_version=self.api_version, provider=self.provider.name,
                              model=self.model)
        pool = ThreadPoolExecutor(max_workers=min(n, self.max_concurrency), thread_name_prefix="auraflow-remote")
        start = last_note = time.monotonic()
        arrived: dict[int, RemoteImage] = {}
        failed: dict[int, RemoteError] = {}
        announced = 0
        try:
            futures = {pool.submit(work, ctx, i): i for i in range(n)}
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
                    log.info("AuraFlow remote: image %d/%d arrived (seed %s, request id %s, %s s, cost %s, credits "
                             "left %s)", i + 1, n, img.seed, img.request_id or "?",
                             img.headers.get("x-generation-time", "?"), img.headers.get("x-cost", "?"),
                             img.remaining_credits or "?")
                named = list(ctx.named[announced:])
                announced += len(named)
                if on_request is not None:
                    for i, rid in named:
                        on_request(i, rid)
                ctx.check_deadlines()
                now = time.monotonic()
                if should_stop is not None and should_stop():
                    result.images = [arrived[i] for i in sorted(arrived)]
                    result.failures = [failed[i] for i in sorted(failed)]
                    ctx.cancel()  # no worker sends anything more; then the service is asked to drop what is open
                    raise _interrupted(ctx, result, n, self.requests.cancel_open(ctx))
                if on_progress is not None and (done or named or now - last_note >= 1.0):
                    last_note = now
                    on_progress(len(arrived) + len(failed), n, _progress_text(ctx, arrived, failed, now - start))
        except KeyboardInterrupt as exc:  # Ctrl-C: the unfinished requests are dropped where the service allows it
            ctx.cancel()
            result.images = [arrived[i] for i in sorted(arrived)]
            exc.add_note(str(_interrupted(ctx, result, n, self.requests.cancel_open(ctx))))  # the CLI shows it
            raise
        finally:
            ctx.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
        result.images = [arrived[i] for i in sorted(arrived)]
        result.failures = [failed[i] for i in sorted(failed)]
        if not result.images:
            if len(result.failures) == 1:
                err = result.failures[0]
            elif result.failures:
                err = RemoteError(f"no image arrived: {result.failure_summary()}",
                                  status=result.failures[0].status, billed=None)
            else:  # every request was cancelled (a deadline passed) before one answered or failed
                err = RemoteError(f"no image arrived: the {n} request(s) were cancelled before any answered",
                                  billed=None)
            err.result = result
            raise err
        return result


def _progress_text(ctx: Call, arrived: dict, failed: dict, waited: float) -> str:
    n = ctx.total
    text = f"AuraFlow remote: {len(arrived) + len(failed)}/{n} done, waiting {waited:.0f} s"
    jobs = ctx.open_jobs()
    shown = "; ".join(f"image {j.index + 1} {j.state.lower()} (request id {j.request_id})" for j in jobs[:4])
    return text + (f"; {shown}" if shown else "") + (f"; +{len(jobs) - 4} more" if len(jobs) > 4 else "")


def _interrupted(ctx: Call, result: RemoteResult, n: int, cancelled: str = "") -> RemoteInterrupted:
    jobs = ctx.open_jobs()
    text = f"remote generation interrupted with {len(result.images)} of {n} image(s) received; "
    if jobs:
        text += (f"request id(s) {', '.join(j.request_id for j in jobs)} were submitted and may still complete and "
                 f"be billed; their results stay for an hour at {', '.join(j.response_url for j in jobs)}")
    else:
        text += "requests already sent may still be billed"
    if cancelled:
        text += f"; {cancelled}"
    return RemoteInterrupted(text, result, [j.request_id for j in jobs])


def _api_version(provider, choice, names: dict) -> str:
    """Segmind's API version; fal has one queue API ("queue"), and an api_version given for it is refused."""
    if provider is not FAL:
        return resolve_api_version(choice, names.get("api_version", "api_version"))
    if choice is not None and str(choice).strip().lower() not in ("", "auto"):
        raise ParameterError(f"{names.get('api_version', 'api_version')}={choice!r} applies to the segmind provider "
                             "only; fal has one queue API (leave it at auto)")
    return "queue"


def _lower_credits(old: Optional[str], new: Optional[str]) -> Optional[str]:
    """Concurrent answers arrive in any order: the lowest balance reported is the latest."""
    if new is None or old is None:
        return new if old is None else old
    try:
        return new if float(new) < float(old) else old
    except ValueError:
        return new
