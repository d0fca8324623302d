"""The batch runner: check everything, then run what is not done yet through a backend, recording each job.

`run(jobs_file, out, backend="local", ...)` -> `Summary`. Flow: the output folder checked; the backend made (its
options checked, nothing loaded); every job of the file read and checked in a first streaming pass (counted: to
run, already done, failed before, duplicates); ``backend.check()``; a second streaming pass hands the jobs to run
to ``backend.run(jobs, sink, stop)``. `ManifestSink` writes each job's images (never over a file) and its manifest
line. Ctrl-C sets ``stop``; the backend returns, the jobs in flight are named, and the manifest resumes.

Backends: `BACKENDS` maps a name to the module that makes it; the module has ``make(**options) -> Backend``. A
backend object may say (class attributes, default False/False/True): ``remote`` (jobs checked with the hosted API's
ranges), ``accepts_sets`` (``NODE.INPUT`` keys allowed) and ``checks_lora_files`` (each LoRA file's header read
while checking); and may have ``check_job(job)``, called for every job in the first pass (a ParameterError there
is reported with the job's file and line: e.g. LoRAs a hosted service cannot take).
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ParameterError
from ..images import check_output_folder, image_extension, write_first_free
from .jobs import JobFileError, read_jobs
from .manifest import DONE, FAILED, SUBMITTED, Manifest, target_of
from .progress import make_progress

log = logging.getLogger("aura_flow.batch")

# backend name -> module with make(**options) -> Backend (imported when chosen)
BACKENDS = {
    "local": "aura_flow.batch.local",
    "comfyui": "aura_flow.batch.comfyui",
    "ray": "aura_flow.batch.ray",
    "hosted": "aura_flow.batch.hosted",
}
MAX_ERRORS = 5  # failures kept in the summary


def make_backend(name: str, **options):
    if name not in BACKENDS:
        raise ParameterError(f"backend={name!r} is not known; valid names: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name]).make(**options)


@dataclass
class Summary:
    total: int = 0  # jobs the file makes
    to_run: int = 0
    done: int = 0
    failed: int = 0
    skipped_done: int = 0
    skipped_failed: int = 0
    duplicates: int = 0
    images: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    errors: list = field(default_factory=list)  # (line, job key, error) of the first failures
    in_flight: list = field(default_factory=list)  # (line, job key) running when interrupted

    @property
    def skipped(self) -> int:
        return self.skipped_done + self.skipped_failed + self.duplicates

    @property
    def images_per_minute(self) -> float:
        return self.images * 60.0 / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 1 if self.failed else 0

    def lines(self) -> list[str]:
        out = [f"done {self.done}, failed {self.failed}, skipped {self.skipped} (already done "
               f"{self.skipped_done}, failed before {self.skipped_failed}, duplicates {self.duplicates}) of "
               f"{self.total} jobs; {self.images} images in {self.seconds:.1f}s, {self.images_per_minute:.1f} "
               "images/min"]
        out += [f"failed: line {line} (job {key}): {err}" for line, key, err in self.errors]
        if self.interrupted:
            out.append("interrupted; in flight: " + (", ".join(f"line {line} (job {key})" for line, key in
                                                              self.in_flight) or "none")
                       + "; run the same command again to resume")
        return out


class ManifestSink:
    """The runner's `Sink`: writes images into the folder and a manifest line per finished job (thread-safe).
    A second ``done`` for a job already done in this folder writes nothing and returns []."""

    def __init__(self, manifest: Manifest, backend_name: str, progress=None, summary: Summary | None = None):
        self.manifest, self.folder, self.backend = manifest, manifest.folder, backend_name
        self.progress = progress or make_progress(False)
        self.summary = summary or Summary()
        self.lock = threading.Lock()
        self.in_flight: dict = {}  # key -> Job

    def _record(self, job, status, where, **more) -> dict:
        record = {"job": job.key, "line": job.line, "index": job.index, "name": job.name, "status": status,
                  "seed": job.seed, "backend": self.backend}
        record.update(more)
        record.update({k: v for k, v in dict(where or {}).items() if v is not None and k not in record})
        return self.manifest.append(record)

    def started(self, job, where) -> None:
        with self.lock:
            self.in_flight[job.key] = job
        self.progress.started(job, where)

    def submitted(self, job, where) -> None:
        self._record(job, SUBMITTED, where)

    def resume_ids(self, job) -> list[str]:
        return self.manifest.pending_ids(job.key)

    def resume_images(self, job) -> list[tuple]:
        """(request id, image index or None) of `resume_ids`: the ``image`` its ``submitted`` line named."""
        return self.manifest.pending_images(job.key)

    def postfix(self, values) -> None:
        self.progress.postfix(values)

    def _write(self, job, data: bytes, i: int) -> str:
        return write_first_free(self.folder, data, image_names(job, i, image_extension(data))).name

    def done(self, job, images=None, *, files=None, where, seconds: float, extra=None) -> list[str]:
        with self.lock:
            if self.manifest.status(job.key) == DONE:
                log.warning("job %s (line %d) reported done twice; the second result is dropped", job.key, job.line)
                self.in_flight.pop(job.key, None)
                return []
            self.in_flight[job.key] = job
        if images is not None:
            paths = [self._write(job, data, i) for i, data in enumerate(images)]
            hashes = [hashlib.sha256(data).hexdigest() for data in images]
        else:
            paths = [Path(f).as_posix() for f in files or ()]
            for p in paths:
                if Path(p).is_absolute() or ".." in Path(p).parts:
                    raise ValueError(f"done(files=...): {p!r} is not a path inside the output folder")
            hashes = [_file_sha256(self.folder / p) for p in paths]
        self._record(job, DONE, where, files=paths, sha256=hashes, seconds=round(float(seconds), 3),
                     **dict(extra or {}))
        with self.lock:
            self.in_flight.pop(job.key, None)
            self.summary.done += 1
            self.summary.images += len(paths)
        self.progress.finished(job, True, len(paths))
        return paths

    def failed(self, job, error: str, *, where, seconds: float) -> None:
        self._record(job, FAILED, where, error=str(error), seconds=round(float(seconds), 3))
        with self.lock:
            self.in_flight.pop(job.key, None)
            self.summary.failed += 1
            if len(self.summary.errors) < MAX_ERRORS:
                self.summary.errors.append((job.line, job.key, str(error)))
        self.progress.finished(job, False)


def image_names(job, i: int, ext: str):
    """The names image ``i`` of ``job`` may be written under, in order (the first free one is taken): the job's
    name, then ``_1``, ``_2``... The sink and the workers of a backend that write into the folder use these."""
    stem = job.file_names(ext)[i].rsplit(".", 1)[0] if i < job.params["number_of_images"] \
        else f"{job.stem}_{i:02d}"
    return (f"{stem}.{ext}" if n == 0 else f"{stem}_{n}.{ext}" for n in range(1000))


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _classified(jobs, manifest: Manifest, retry_failed: bool):
    """(job, what) for every job: "run", "done", "failed" (not retried) or "duplicate" (an earlier line's job)."""
    seen: set = set()  # 8-byte prefixes of the keys met so far, as ints: compact
    for job in jobs:
        short = int(job.key[:16], 16)
        if short in seen:
            yield job, "duplicate"
            continue
        seen.add(short)
        status = manifest.status(job.key)
        yield job, ("done" if status == DONE else "failed" if status == FAILED and not retry_failed else "run")


def run(jobs_file, out, *, backend="local", defaults=None, seeds=None, grid=(), retry_failed: bool = False,
        dry_run: bool = False, progress=None, stream=None, **backend_options) -> Summary:
    """Run every job of ``jobs_file`` not yet done in ``out`` through ``backend`` (a name of `BACKENDS`, made with
    ``backend_options``, or a Backend object); the `Summary`. ``progress``: None (a bar on a terminal, log lines
    otherwise), False, "bar", "lines" or a `Progress`. ``dry_run``: list what would run (to ``stream``, default
    stdout) and run nothing. Raises ParameterError / LoadError (a `JobFileError` names the file, line and key)
    before anything runs."""
    import sys

    folder = check_output_folder(out, "out")
    be = make_backend(backend, **backend_options) if isinstance(backend, str) else backend
    name = getattr(be, "name", str(backend))

    def jobs(first=True):  # the second pass reads no LoRA header again: a file gone since fails its job alone
        return read_jobs(jobs_file, defaults=defaults, seeds=seeds, grid=grid,
                         remote=getattr(be, "remote", False), accepts_sets=getattr(be, "accepts_sets", False),
                         check_lora_files=first and getattr(be, "checks_lora_files", True))

    manifest = Manifest.open(folder)
    try:
        _check_target(manifest, be)
    except ParameterError:
        manifest.close()
        raise
    summary = Summary()
    stream = stream or sys.stdout
    check_job = getattr(be, "check_job", None)
    for job, what in _classified(jobs(), manifest, retry_failed):  # pass 1: everything checked, counted
        summary.total += 1
        if check_job is not None:
            try:
                check_job(job)
            except ParameterError as exc:
                raise JobFileError(f"{os.fspath(jobs_file)} line {job.line}: {exc}") from None
        if what == "run":
            summary.to_run += 1
        else:
            counter = {"done": "skipped_done", "failed": "skipped_failed", "duplicate": "duplicates"}[what]
            setattr(summary, counter, getattr(summary, counter) + 1)
    if summary.skipped_done:
        log.info("skipped %d jobs already done", summary.skipped_done)
    if summary.skipped_failed:
        log.info("skipped %d jobs that failed before (--retry-failed runs them again)", summary.skipped_failed)
    if dry_run:  # after every job was checked
        for job, what in _classified(jobs(), manifest, retry_failed):
            if what == "run":
                stream.write(f"line {job.line}#{job.index}\t{job.name or '-'}\t{job.key}\tseed {job.seed}\t"
                             f"{job.params['prompt'][:60]!r}\n")
    if dry_run or not summary.to_run:
        manifest.close()
        return summary
    progress = make_progress(progress)
    sink = ManifestSink(manifest, name, progress, summary)
    stop = threading.Event()
    t0 = time.perf_counter()
    try:
        be.check()
        progress.start(summary.to_run)

        def to_run():
            for job, what in _classified(jobs(first=False), manifest, retry_failed):
                if stop.is_set():
                    return
                if what == "run" and manifest.status(job.key) != DONE:
                    yield job

        _drive(be, to_run(), sink, stop, summary)
    finally:
        summary.seconds = time.perf_counter() - t0
        progress.close()
        be.close()
        manifest.close()
    return summary


def _describe(target) -> str:
    provider, model = target
    return "your own model (the local, comfyui or ray backend)" if provider is None else \
        f"provider {provider}" + (f", model {model}" if model else "")


def _check_target(manifest: Manifest, be) -> None:
    """Refuse a folder whose manifest holds jobs made elsewhere (another provider or model, or the user's own model
    against a hosted one): a job's key names its parameters, not where it ran, so they would be skipped as done."""
    want = target_of(dict(getattr(be, "target", None) or {}))
    other = sorted((t for t in manifest.targets if t != want), key=str)
    if other:
        raise ParameterError(f"out {manifest.folder}: its {manifest.path.name} holds jobs made by "
                             f"{'; '.join(map(_describe, other))}, and this run asks {_describe(want)}; their images "
                             "would count as done for this run's jobs. Give another output folder (one per provider "
                             "and model)")


def _drive(be, jobs, sink: ManifestSink, stop: threading.Event, summary: Summary) -> None:
    """``be.run`` here; the first Ctrl-C (SIGINT, in the main thread) sets ``stop`` and the backend returns after
    its jobs in flight are abandoned; a second one raises KeyboardInterrupt (each manifest line is whole anyway)."""

    def interrupted():
        summary.interrupted = True
        stop.set()

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        interrupted()
        log.warning("interrupted: the jobs in flight are abandoned (Ctrl-C again to stop at once)")

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        be.run(jobs, sink, stop)
    except KeyboardInterrupt:
        interrupted()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        if summary.interrupted:  # started, and neither done nor failed
            with sink.lock:
                summary.in_flight = [(j.line, j.key) for j in sink.in_flight.values()]


__all__ = ["run", "Summary", "ManifestSink", "BACKENDS", "make_backend"]
