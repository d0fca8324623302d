"""The ``hosted`` batch backend: a hosted queue (Segmind's v2, or fal's with ``provider="fal"`` and ``model``
``aura-flow`` or ``pony-v7``), ``concurrency`` requests at a time.

A job of ``number_of_images`` N is N requests of one image each, seeds ``seed, seed+1, ...``, exactly as
`aura_flow.remote.RemoteClient` splits it (so image i is the same as ``remote``'s image i). ``concurrency`` counts
requests in flight over all jobs. Each request id goes into the manifest as a ``submitted`` line (with the image it
makes) as soon as the service names it, before its image arrives; the ``done`` line names every image's request id
(``request_ids``, in the order of ``files``; ``request_id`` the first).

Resume: a job that an earlier run submitted and never finished (a crash, Ctrl-C, a refused key) has its request
ids in the manifest; the rerun FETCHES those (the service keeps a result for an hour after the submit), and only
the images that cannot be had that way (the service no longer knows the id, or it failed) are submitted anew, said
in the log. Segmind's v1 names no id before its image arrives, so it is refused here. On fal, a value the model
cannot honour is refused per line before anything is sent (as ``remote --provider fal`` refuses it).

A request the service fails fails its job alone. A refused key or an empty account (HTTP 401, 402, 403, 406) stops
the whole run: nothing more is sent, the requests in flight stay with the service (their ids are in the manifest)
and a ParameterError says so; the same command resumes. ``stop`` (Ctrl-C): no new submit; the requests in flight
are left to finish service-side and a rerun fetches them. The key is read as the ``remote`` command reads it
(``SEGMIND_API_KEY`` / ``FAL_KEY`` or the key file) and is never logged nor written. On fal, ``stop`` asks fal to
cancel the requests not yet started (the client does); a rerun fetches what finished and submits the rest.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from ..errors import ParameterError

log = logging.getLogger(__name__)

FATAL_STATUSES = (401, 402, 403, 406)  # the key or the account: every other request would fail alike


@dataclass
class _Outcome:
    index: int
    data: bytes | None = None
    request_id: str | None = None
    fetched: bool = False
    error: str | None = None
    fatal: bool = False
    stopped: bool = False


@dataclass
class _Running:
    """A job whose images are on their way."""

    job: object
    t0: float
    left: int
    done: dict = field(default_factory=dict)  # index -> _Outcome with data
    errors: dict = field(default_factory=dict)  # index -> _Outcome with error
    unfinished: bool = False  # an image was stopped or the run halted: no line, a rerun resumes it


class HostedBackend:
    """Jobs through a hosted queue. ``concurrency``: requests in flight at a time; ``key_file``, ``timeout`` (seconds
    per image, queue included), ``api_version`` (Segmind: v2 only), ``provider``, ``model``: as ``remote`` takes them.
    ``poll``/``retry``: the client's `PollPolicy`/`RetryPolicy` (tests shrink them)."""

    name = "hosted"
    remote = True  # jobs are checked with the hosted API's ranges
    accepts_sets = False
    checks_lora_files = False

    def __init__(self, *, concurrency: int = 2, key_file=None, timeout=None, api_version=None, provider=None,
                 model=None, poll=None, retry=None):
        from ..remote import SEGMIND, check_model, get_provider, positive_seconds, resolve_api_version
        from ..remote.client import check_concurrency

        self.concurrency = check_concurrency(concurrency, "concurrency")
        self.timeout = positive_seconds(180.0 if timeout is None else timeout, "timeout")
        self.provider = get_provider(provider)
        self.model = check_model(self.provider, model)
        if self.provider is not SEGMIND:
            if api_version not in (None, "", "auto"):
                raise ParameterError(f"api_version={api_version!r} applies to the segmind provider only; fal has one "
                                     "queue API (leave it out)")
        elif resolve_api_version(api_version) != "v2":
            raise ParameterError("api_version=v1 cannot run a batch: the sync API names no request id before the "
                                 "image arrives, so a crash would lose what was billed and a rerun would pay again; "
                                 "use v2 (the default; unset SEGMIND_API_VERSION)")
        self.key_file, self.poll, self.retry = key_file, poll, retry
        self.client = None
        self._fatal: str | None = None
        self._abandoned = False  # run() left early (an exception, a second Ctrl-C): the workers stop too

    def check_job(self, job) -> None:
        if job.loras:
            raise ParameterError(f"loras: the hosted API takes no LoRAs ({len(job.loras)} given); run this job "
                                 "with --backend local or comfyui, or leave loras out")
        if job.sets:
            raise ParameterError(f"{job.sets[0][0]}: NODE.INPUT keys fill a ComfyUI workflow; the hosted API takes "
                                 "only the generation keys (use --backend comfyui)")
        if self.provider.name == "fal":  # what the model cannot honour, in the line's words
            from ..remote.fal_params import check_options, fal_body

            fal_body(dict(job.params), self.model, check_options({}))

    def check(self) -> None:
        """Read the key (environment or key file) and make the client; nothing is sent."""
        from ..remote import MissingKeyError, RemoteClient

        if self.client is not None:
            return
        options = {"poll": self.poll} if self.poll is not None else {}
        if self.retry is not None:
            options["retry"] = self.retry
        try:
            self.client = RemoteClient.from_environment(
                key_file=self.key_file, timeout=self.timeout, max_concurrency=1, provider=self.provider.name,
                model=self.model, api_version="v2" if self.provider.name == "segmind" else None, **options)
        except MissingKeyError as exc:
            raise ParameterError(str(exc)) from None

    # ------------------------------------------------------------------------------------------- one image

    def _halted(self, stop) -> bool:
        return stop.is_set() or self._fatal is not None or self._abandoned

    def _failure(self, i: int, exc, rid=None) -> _Outcome:
        if exc.status in FATAL_STATUSES:
            self._fatal = self._fatal or str(exc)
            return _Outcome(i, fatal=True, request_id=rid)
        return _Outcome(i, error=str(exc), request_id=rid or exc.request_id)

    def _fetch(self, job, i: int, rid: str, stop) -> _Outcome | None:
        """Image ``i`` by the request id an earlier run recorded; None when the service cannot give it."""
        from ..remote import RemoteError, RemoteInterrupted

        try:
            result = self.client.fetch([rid], should_stop=lambda: self._halted(stop))
        except RemoteInterrupted:
            return _Outcome(i, stopped=True, request_id=rid)
        except RemoteError as exc:
            if exc.status == 404 or exc.billed is False or _failed_there(exc, rid):  # expired, failed, cancelled
                log.warning("line %d: image %d: request id %s cannot be fetched (%s); it is submitted anew",
                            job.line, i + 1, rid, exc)
                return None
            return self._failure(i, exc, rid)
        log.info("line %d: image %d fetched by request id %s (submitted by an earlier run; not submitted again)",
                 job.line, i + 1, rid)
        return _Outcome(i, data=result.images[0].data, request_id=rid, fetched=True)

    def _image(self, job, i: int, ids: list, sink, stop, named: dict) -> _Outcome:
        """Image ``i`` of ``job``: fetched by ``ids`` (an earlier run's requests), else submitted."""
        from ..plan import plan_generation
        from ..remote import RemoteError, RemoteInterrupted, batch_seed

        for rid in ids:
            if self._halted(stop):
                return _Outcome(i, stopped=True)
            named[(job.key, i)] = rid
            got = self._fetch(job, i, rid, stop)
            if got is not None:
                return got
        if self._halted(stop):
            return _Outcome(i, stopped=True)
        plan = plan_generation({**job.params, "number_of_images": 1, "seed": batch_seed(job.seed, i)}, remote=True)
        rids = []

        def on_request(_index, rid):  # before the image arrives: a crash from here on costs a fetch, not a submit
            rids.append(rid)
            named[(job.key, i)] = rid
            sink.submitted(job, {"request_id": rid, "image": i, **self._where})

        try:
            result = self.client.generate(plan, should_stop=lambda: self._halted(stop), on_request=on_request)
        except RemoteInterrupted:
            return _Outcome(i, stopped=True, request_id=rids[0] if rids else None)
        except RemoteError as exc:
            return self._failure(i, exc, rids[0] if rids else None)
        im = result.images[0]
        return _Outcome(i, data=im.data, request_id=im.request_id or (rids[0] if rids else None))

    # ------------------------------------------------------------------------------------------- the run

    def run(self, jobs, sink, stop) -> None:
        self.check()
        jobs = iter(jobs)
        resume = getattr(sink, "resume_images", None)
        queue: deque = deque()  # (running, image index, request ids to fetch first)
        futures: dict = {}  # future -> running
        named: dict = {}  # (job key, image) -> request id, while in flight
        exhausted = self._abandoned = False
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="auraflow-hosted")
        try:
            while True:
                while len(futures) < self.concurrency and not self._halted(stop):
                    if not queue:
                        job = None if exhausted else next(jobs, None)
                        if job is None:
                            exhausted = True
                            break
                        queue.extend(self._units(job, sink, resume))
                        sink.started(job, {})
                    running, i, ids = queue.popleft()
                    fut = pool.submit(self._image, running.job, i, ids, sink, stop, named)
                    futures[fut] = running
                if not futures:
                    break
                finished, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in finished:
                    running = futures.pop(fut)
                    outcome = fut.result()
                    if outcome.data is not None or outcome.error is not None:
                        named.pop((running.job.key, outcome.index), None)
                    self._note(running, outcome, sink)
        finally:
            self._abandoned = True
            pool.shutdown(wait=False, cancel_futures=True)
        if named:
            left = ("fal was asked to cancel those not yet started" if self.provider.name == "fal" else
                    "they are left to finish at the service")
            log.warning("stopped: %d request(s) were in flight, %s; their request ids (%s) are in the manifest, and "
                        "running the same command again within the hour fetches what finished instead of paying "
                        "again", len(named), left, ", ".join(sorted(named.values())))
        if self._fatal is not None:
            raise ParameterError(f"the hosted API refused the run: {self._fatal}. Nothing more was sent; the "
                                 "manifest records every request id named so far. Fix the key or the account and run "
                                 "the same command again: it resumes, fetching what was already submitted")

    def _units(self, job, sink, resume) -> list:
        """The job's images to get: by the ids of an earlier run's requests where the manifest has them."""
        n = job.params["number_of_images"]
        pending = resume(job) if resume is not None else [(rid, None) for rid in sink.resume_ids(job)]
        by_image: dict = {i: [] for i in range(n)}
        for rid, image in pending:  # an id without its image takes the first image not yet covered
            if image is None or image not in by_image:
                image = next((i for i in range(n) if not by_image[i]), None)
            if image is not None:
                by_image[image].append(rid)
        fetched = sum(1 for ids in by_image.values() if ids)
        if fetched:
            log.info("line %d: %d of %d image(s) were submitted by an earlier run: fetched by request id, not "
                     "submitted again", job.line, fetched, n)
        running = _Running(job, time.perf_counter(), n)
        return [(running, i, by_image[i]) for i in range(n)]

    def _note(self, running: _Running, outcome: _Outcome, sink) -> None:
        running.left -= 1
        if outcome.data is not None:
            running.done[outcome.index] = outcome
        elif outcome.error is not None:
            log.warning("line %d: image %d: %s", running.job.line, outcome.index + 1, outcome.error)
            running.errors[outcome.index] = outcome
        else:
            running.unfinished = True
        if running.left or running.unfinished:
            return
        job, seconds = running.job, time.perf_counter() - running.t0
        every = {**running.done, **running.errors}
        ids = [every[i].request_id for i in sorted(every)]
        where = {"request_id": next((r for r in ids if r), None), **self._where}
        if running.errors:
            got = [o.request_id for _, o in sorted(running.done.items())]
            kept = (f"; the images that arrived (request ids {', '.join(got)}) can be fetched within the hour with "
                    "`python -m aura_flow fetch`" if got else "")
            sink.failed(job, "; ".join(f"image {i + 1}: {o.error}" for i, o in sorted(running.errors.items())) + kept,
                        where={**where, "request_ids": ids}, seconds=seconds)
            return
        images = [running.done[i] for i in sorted(running.done)]
        extra = {"request_ids": [o.request_id for o in images]}
        if any(o.fetched for o in images):
            extra["fetched"] = [o.request_id for o in images if o.fetched]
        sink.done(job, [o.data for o in images], where=where, seconds=seconds, extra=extra)

    @property
    def _where(self) -> dict:
        return {"provider": self.provider.name, "model": self.model}

    target = _where  # what the runner compares with the folder's manifest (one folder per provider and model)

    def close(self) -> None:
        self.client = None


def _failed_there(exc, rid: str) -> bool:
    """The service itself reports the request FAILED (or, on fal, cancelled): no image will come from it."""
    from ..remote import RemoteTimeout

    return not isinstance(exc, RemoteTimeout) and f"request id {rid} FAILED" in str(exc)


def make(**options) -> HostedBackend:
    return HostedBackend(**options)


__all__ = ["HostedBackend", "make", "FATAL_STATUSES"]
