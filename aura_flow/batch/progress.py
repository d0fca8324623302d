"""Progress of a batch: a tqdm bar on a terminal (jobs done/total, images per minute, ETA, a postfix the backend
sets, e.g. per-server counts), plain log lines otherwise."""
from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("aura_flow.batch")


class Progress:
    """What the runner and the sink tell: ``start(total)``, ``started(job, where)``, ``finished(job, ok, images)``,
    ``postfix(mapping)``, ``close()``. This base class writes a log line per finished job."""

    def __init__(self, every_seconds: float = 0.0):
        self.total = self.done = self.failed = self.images = 0
        self.t0 = time.perf_counter()
        self.every, self.last = every_seconds, 0.0
        self.extra: dict = {}
        self.lock = threading.Lock()

    def start(self, total: int) -> None:
        self.total, self.t0 = total, time.perf_counter()

    def started(self, job, where) -> None:
        pass

    def finished(self, job, ok: bool, images: int = 0) -> None:
        with self.lock:
            self.done += ok
            self.failed += not ok
            self.images += images
            self.show(job, ok)

    def postfix(self, values) -> None:
        with self.lock:
            self.extra = dict(values)

    def rate(self) -> float:
        """Images per minute so far."""
        return self.images * 60.0 / max(time.perf_counter() - self.t0, 1e-9)

    def show(self, job, ok: bool) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and self.done + self.failed < self.total:
            return
        self.last = now
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        log.info("%d/%d done, %d failed, %.1f images/min (line %d %s)%s", self.done, self.total, self.failed,
                 self.rate(), job.line, "done" if ok else "failed", extra)

    def close(self) -> None:
        pass


class BarProgress(Progress):
    """A tqdm bar on ``stream`` (a terminal)."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stderr
        self.bar = None

    def start(self, total: int) -> None:
        from tqdm import tqdm

        super().start(total)
        self.bar = tqdm(total=total, unit="job", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def show(self, job, ok: bool) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        self.bar.set_postfix({"img/min": f"{self.rate():.1f}", "failed": self.failed, **self.extra}, refresh=True)

    def postfix(self, values) -> None:
        super().postfix(values)
        if self.bar is not None:
            with self.lock:
                self.bar.set_postfix({"img/min": f"{self.rate():.1f}", "failed": self.failed, **self.extra})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Silent(Progress):
    def show(self, job, ok: bool) -> None:
        pass


def make_progress(progress, stream=None) -> Progress:
    """None: a bar when ``stream`` (stderr) is a terminal, log lines otherwise; False: nothing; "bar" / "lines";
    or a `Progress` given."""
    stream = stream or sys.stderr
    if isinstance(progress, Progress):
        return progress
    if progress is False:
        return Silent()
    if progress == "bar" or (progress is None and getattr(stream, "isatty", lambda: False)()):
        return BarProgress(stream)
    return Progress(every_seconds=0.0)


__all__ = ["Progress", "BarProgress", "Silent", "make_progress"]
