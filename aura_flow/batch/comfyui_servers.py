"""The ComfyUI servers of a batch and their health (`aura_flow.batch.comfyui` schedules jobs over them).

A `Server` is up until a request to it fails past its retries or a job on it makes no progress (`Pool.down`); then
it is probed (``GET /prompt``) with exponential backoff (`Pool.wait_up`). When it answers again, the prompts taken
away from it while it was down (``orphans``) are deleted from its queue first (best effort), so they do not run
there as well. When every server has been down for ``wait_down`` seconds, `Pool.wait_up` raises
`ServerUnavailable`."""
from __future__ import annotations

import logging
import threading
import time
import urllib.parse

from ..errors import ParameterError, shown
from ..headless import ComfyClient, ServerUnavailable, check_server

log = logging.getLogger(__name__)


class Server:
    """One ComfyUI server and what the scheduler knows of it."""

    def __init__(self, url: str, request_timeout: float):
        self.url = url
        self.client = ComfyClient(url, request_timeout)
        self.label = urllib.parse.urlsplit(url).netloc or url
        self.up, self.fails, self.retry_at, self.probing = True, 0, 0.0, False
        self.inflight = self.done = 0
        self.queued_at_start: set[str] = set()  # prompt ids in its queue when the run began
        self.orphans: set[str] = set()  # prompt ids sent elsewhere while it was down: deleted from it on return
        self.lock = threading.Lock()


class Pool:
    """The servers and their health. ``on_change``: called (no arguments) when a server goes down or comes back."""

    def __init__(self, addresses, *, request_timeout: float, backoff: float, backoff_max: float, wait_down: float,
                 on_change=None):
        if not addresses:
            raise ParameterError("--server: give at least one ComfyUI address, e.g. --server 127.0.0.1:8188 "
                                 "(repeat it for more servers)")
        urls = []
        for arg in addresses:
            url = check_server(arg).rstrip("/")
            if url in urls:
                raise ParameterError(f"--server {shown(arg)}: given twice")
            urls.append(url)
        self.servers = [Server(url, request_timeout) for url in urls]
        self.backoff, self.backoff_max, self.wait_down = backoff, backoff_max, wait_down
        self.all_down_since = None
        self.on_change = on_change or (lambda: None)

    def check(self) -> None:
        """Every server asked once (``GET /prompt``): ServerUnavailable when none answers; the others start down."""
        silent = []
        for server in self.servers:
            try:
                server.client.json("GET", "/prompt")
            except ServerUnavailable as exc:
                silent.append((server, exc))
        if len(silent) == len(self.servers):
            raise ServerUnavailable(f"no ComfyUI server answers ({silent[0][1]})")
        for server, exc in silent:
            log.warning("%s; the batch starts without it and tries it again later", exc)
            self.down(server, "not answering at the start")

    def read_queues(self) -> None:
        """Note the prompt ids each server holds now (an earlier run's, still queued or running)."""
        for server in self.servers:
            try:
                _, data = server.client.json("GET", "/queue")
            except ServerUnavailable:
                continue
            server.queued_at_start = {item[1] for key in ("queue_running", "queue_pending")
                                      for item in data.get(key) or () if isinstance(item, list) and len(item) > 1
                                      and isinstance(item[1], str)}

    def status(self) -> dict:
        """Per server (``host:port``): ``"in flight/done"``, or ``"down"``."""
        return {s.label: (f"{s.inflight}/{s.done}" if s.up else "down") for s in self.servers}

    def _delay(self, server: Server) -> float:
        return min(self.backoff * 2 ** (server.fails - 1), self.backoff_max)

    def down(self, server: Server, reason: str) -> None:
        with server.lock:
            if not server.up:
                return
            server.up, server.fails = False, server.fails + 1
            delay = self._delay(server)
            server.retry_at = time.monotonic() + delay
        log.warning("ComfyUI %s stopped answering (%s); its jobs go to the other servers, it is tried again in "
                    "%.1f s", server.url, reason, delay)
        if all(not s.up for s in self.servers) and self.all_down_since is None:
            self.all_down_since = time.monotonic()
        self.on_change()

    def wait_up(self, server: Server, going_on, sleep) -> bool:
        """Until ``server`` answers again (probing it with backoff): True; False once ``going_on()`` is false.
        ``sleep(seconds)`` waits (and may end early). ServerUnavailable when all servers were down too long."""
        while going_on():
            now, probe = time.monotonic(), False
            with server.lock:
                if server.up:
                    return True
                if server.retry_at <= now and not server.probing:
                    server.probing = probe = True
            if probe:
                self._probe(server)
                continue
            since = self.all_down_since
            if since is not None and now - since > self.wait_down:
                raise ServerUnavailable(
                    f"no ComfyUI server answered for {self.wait_down:g} s ({', '.join(s.url for s in self.servers)})"
                    "; the jobs not done stay unfinished in the manifest: run the same command again to resume")
            sleep(min(max(server.retry_at - now, 0.02), 0.5))
        return False

    def _probe(self, server: Server) -> None:
        try:
            server.client.json("GET", "/prompt")
            ok = True
        except ServerUnavailable:
            ok = False
        if ok:
            delete(server, sorted(server.orphans))
        with server.lock:
            server.probing = False
            if ok:
                server.up, server.orphans = True, set()
            else:
                server.fails += 1
                server.retry_at = time.monotonic() + self._delay(server)
        if ok:
            self.all_down_since = None
            log.warning("ComfyUI %s answers again; it takes jobs again", server.url)
            self.on_change()


def delete(server: Server, ids) -> None:
    """Remove prompts from ``server``'s queue, best effort (a running one is not touched)."""
    if ids:
        try:
            server.client.request("POST", "/queue", {"delete": list(ids)})
        except ServerUnavailable:
            pass


__all__ = ["Server", "Pool", "delete"]
