"""The ``comfyui`` batch backend: a job list spread over several running ComfyUI servers (one per GPU or machine).

- The workflow (API format, default the bundled ``auraflow_generate`` twin) is read once; each job fills it
  (`comfyui_workflow.WorkflowPlan`), and every job is checked against it before any is sent (`check_job`).
- A pull scheduler: a thread per slot, ``per_server`` slots per server, each taking the next job when its last one
  is finished, so at most ``per_server`` jobs are in flight on a server and the next job goes to whichever server
  frees first. Jobs are pulled from the iterator one at a time.
- Each job's ComfyUI ``prompt_id`` is a uuid5 of its key and attempt number. Before a job is submitted, the servers
  are asked for that id (``GET /history/<id>``, and the queues as they were when the run began): a job an earlier
  run (or an answer lost on the way) already finished is collected, one still queued is waited for, one that failed
  or was interrupted is run again under the next attempt's id. A lost connection on submit or poll is retried on the
  same server, asking for the id first, so a prompt that arrived is never queued twice.
- A server that stops answering (or makes no progress for ``timeout`` s) is marked down: its unfinished jobs go
  back to the queue for the other servers, and it is tried again with exponential backoff; when it answers again,
  the jobs taken away from it are deleted from its queue first (best effort). When every server has been down for
  ``wait_down`` s the run ends with `ServerUnavailable`; the jobs not done stay unfinished in the manifest.
- A job ComfyUI rejects (400 with node_errors) or fails (execution_error) fails alone, with ComfyUI's error text.
- Images are downloaded as each job finishes and handed to the sink as bytes (it names them after the job).
- ``stop``: nothing new is submitted, the queued prompts are deleted from their servers (a running one is left to
  finish: a rerun collects it from ``/history``), and `run` returns.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from ..errors import LoadError, ParameterError, shown
from ..headless import QueueError, ServerUnavailable, check_timeout, output_items
from ..headless.answers import _dict, format_execution_error
from ..headless.client import DEFAULT_TIMEOUT
from .comfyui_servers import Pool, Server, delete
from .comfyui_workflow import WorkflowPlan

log = logging.getLogger(__name__)

DEFAULT_WORKFLOW = Path(__file__).resolve().parents[2] / "example_workflows" / "api" / "auraflow_generate.json"
DEFAULT_PER_SERVER = 2
MAX_PER_SERVER = 64
MAX_ATTEMPTS = 50  # prompt ids tried per job (a failed or interrupted earlier attempt moves to the next id)
MAX_LOSSES = 3  # a prompt that vanished from a server's queue (restart, deleted by hand) is sent again this often
MAX_REQUEUES = 5  # a job whose servers stopped answering this often fails (does it crash ComfyUI?)
_NAMESPACE = uuid.UUID("6f1d3c2e-4b0a-5c7e-9a41-a7f10aa5b0c9")


def prompt_id(job, attempt: int = 0) -> str:
    """The ComfyUI prompt id of ``job``'s ``attempt``: the same in every run and process."""
    return str(uuid.uuid5(_NAMESPACE, f"{job.key}/{attempt}"))


class _Requeue(Exception):
    """The job's server stopped answering: the job goes back to the queue."""


class _Stopped(Exception):
    pass


class Ticket:
    """A job on its way: its attempt, and the server that may hold its prompt."""

    def __init__(self, job):
        self.job, self.attempt, self.looked, self.losses, self.requeues = job, 0, False, 0, 0
        self.server, self.held = None, None  # the server that may hold its prompt, under that prompt id

    @property
    def prompt_id(self) -> str:
        return prompt_id(self.job, self.attempt)


class ComfyUIBackend:
    """`aura_flow.batch.model.Backend` over ComfyUI servers. ``servers``: addresses (``host:port`` or URLs);
    ``workflow``: a path or an API-format dict; ``timeout``: seconds a job may take on its server before the server
    counts as stuck (0: no limit); ``wait_down``: seconds every server may be down before the run gives up."""

    name = "comfyui"
    accepts_sets = True  # jobs may carry NODE.INPUT keys
    checks_lora_files = False  # LoRA names are the servers' (models/loras), not files here

    def __init__(self, servers, workflow=None, *, per_server: int = DEFAULT_PER_SERVER,
                 timeout: float = DEFAULT_TIMEOUT, wait_down: float = 600.0, request_timeout: float = 30.0,
                 poll: float = 0.5, check_every: float = 5.0, backoff: float = 1.0, backoff_max: float = 60.0):
        self.server_args, self.workflow = list(servers or ()), workflow or DEFAULT_WORKFLOW
        self.per_server, self.timeout, self.wait_down = per_server, timeout, wait_down
        self.request_timeout, self.poll, self.check_every = request_timeout, poll, check_every
        self.backoff, self.backoff_max = backoff, backoff_max
        self.pool: Pool | None = None
        self.plan: WorkflowPlan | None = None
        self.sink, self.abort = None, None

    # ------------------------------------------------------------------------------------------- checks
    def check(self) -> None:
        """The options, the workflow, and which servers answer (at least one must): before any job is sent."""
        pool = Pool(self.server_args, request_timeout=self.request_timeout, backoff=self.backoff,
                    backoff_max=self.backoff_max, wait_down=self.wait_down, on_change=self._progress)
        k = self.per_server
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_PER_SERVER:
            raise ParameterError(f"--per-server {shown(k)}: give the jobs in flight per server, 1 to "
                                 f"{MAX_PER_SERVER} (2 keeps a GPU busy between jobs)")
        self.timeout = check_timeout(self.timeout)
        self.plan = WorkflowPlan(self.workflow)
        pool.check()
        self.pool = pool

    def check_job(self, job) -> None:
        """ParameterError naming the key when the job's LoRAs or NODE.INPUT keys do not fit the workflow (the runner
        adds the file and line)."""
        if self.plan is None:
            try:
                self.plan = WorkflowPlan(self.workflow)
            except ParameterError as exc:  # the --workflow file's fault, not the job line's: said as the flag
                raise LoadError(f"--workflow {exc}") from None
        self.plan.check_job(job)

    def status(self) -> dict:
        """Per server (``host:port``): ``"in flight/done"``, or ``"down"`` (the progress bar's postfix)."""
        return self.pool.status() if self.pool else {}

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------------------------------- the run
    def run(self, jobs, sink, stop: threading.Event) -> None:
        if self.pool is None:
            self.check()
        self.sink, self.stop = sink, stop
        self.feed, self.again, self.active, self.exhausted = iter(jobs), deque(), 0, False
        self.cond = threading.Condition()
        self.abort: BaseException | None = None
        self.pool.read_queues()  # prompts still queued from an earlier run are waited for, not sent again
        threads = [threading.Thread(target=self._slot, args=(s,), name=f"comfyui-{s.label}-{i}", daemon=True)
                   for s in self.pool.servers for i in range(self.per_server)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            stop.set()
            for t in threads:
                t.join()
            raise
        if self.abort is not None:
            raise self.abort

    def _take(self):
        with self.cond:
            while True:
                if self.stop.is_set() or self.abort is not None:
                    return None
                if self.again:
                    self.active += 1
                    return self.again.popleft()
                if not self.exhausted:
                    try:
                        job = next(self.feed)
                    except StopIteration:
                        self.exhausted = True
                        self.cond.notify_all()
                        continue
                    self.active += 1
                    return Ticket(job)
                if self.active == 0:
                    return None
                self.cond.wait(0.5)

    def _release(self, ticket, again: bool) -> None:
        with self.cond:
            self.active -= 1
            if again:
                self.again.append(ticket)
            self.cond.notify_all()

    def _going_on(self) -> bool:
        with self.cond:
            finished = self.exhausted and not self.again and self.active == 0
        return not (finished or self.stop.is_set() or self.abort is not None)

    def _slot(self, server: Server) -> None:
        try:
            while not self.stop.is_set() and self.abort is None:
                if not server.up:
                    if not self.pool.wait_up(server, self._going_on, self.stop.wait):
                        return
                    continue
                ticket = self._take()
                if ticket is None:
                    return
                if not server.up:
                    self._release(ticket, True)
                    continue
                again = False
                try:
                    self._work(server, ticket)
                except _Requeue:
                    ticket.requeues += 1
                    again = ticket.requeues <= MAX_REQUEUES
                    if not again:
                        self.sink.failed(ticket.job, f"the job's server stopped answering {ticket.requeues} times "
                                         f"(last {server.url}); does the job crash ComfyUI? See its console",
                                         where={"server": server.url}, seconds=0.0)
                except _Stopped:
                    pass
                finally:
                    self._release(ticket, again)
        except BaseException as exc:  # a sink that cannot write, a bug: the run ends, what is not done stays so
            log.debug("slot of %s failed", server.url, exc_info=True)
            with self.cond:
                self.abort = self.abort or exc
                self.cond.notify_all()

    def _progress(self) -> None:
        postfix = getattr(self.sink, "postfix", None)
        if postfix is not None:
            postfix(self.status())

    def _work(self, server: Server, ticket: Ticket) -> None:
        job, t0 = ticket.job, time.monotonic()
        self.sink.started(job, {"server": server.url})
        with server.lock:
            server.inflight += 1
        self._progress()
        try:
            self._run_job(server, ticket, t0)
        except (QueueError, ParameterError) as exc:
            self.sink.failed(job, str(exc), where={"server": server.url, "prompt_id": ticket.prompt_id},
                             seconds=time.monotonic() - t0)
        finally:
            with server.lock:
                server.inflight -= 1
            self._progress()

    def _run_job(self, server: Server, ticket: Ticket, t0: float) -> None:
        job = ticket.job
        holder = self._lookup(server, ticket)
        if holder is None:
            holder = server
            self._submit(server, ticket)
        entry = self._wait(holder, ticket)
        where = {"server": holder.url, "prompt_id": ticket.prompt_id}
        status = _dict(entry.get("status"))
        if status.get("status_str") == "error":
            self.sink.failed(job, format_execution_error(status.get("messages")), where=where,
                             seconds=time.monotonic() - t0)
            return
        images = self._download(holder, entry)
        if not images:
            self.sink.failed(job, "ComfyUI finished the prompt but it saved no image (does the workflow end in "
                                  "a Save Image node?)", where=where, seconds=time.monotonic() - t0)
            return
        self.sink.done(job, images=images, where=where, seconds=time.monotonic() - t0)
        with holder.lock:
            holder.done += 1

    def _lookup(self, server: Server, ticket: Ticket):
        """The server that holds the job's current prompt id (finished or queued), or None: submit it."""
        while ticket.attempt < MAX_ATTEMPTS:
            first = not ticket.looked
            ticket.looked = True
            places = [ticket.server] if ticket.server else []
            places += [s for s in self.pool.servers if s.up] if first else [server]
            retry = False
            for s in dict.fromkeys(places):
                if not s.up:
                    continue
                try:
                    entry = self._call(s, lambda: s.client.history(ticket.prompt_id))
                    if entry is not None:
                        if _dict(entry.get("status")).get("status_str") == "error":
                            ticket.attempt, retry = ticket.attempt + 1, True  # failed or interrupted: run it anew
                            break
                        return s
                    if (ticket.prompt_id in s.queued_at_start or s is ticket.server) and \
                            self._call(s, lambda: s.client.queue_state(ticket.prompt_id)):
                        return s
                except _Requeue:
                    if s is server:
                        raise
            if not retry:
                return None
        raise QueueError(f"ComfyUI failed this job {MAX_ATTEMPTS} times")

    def _submit(self, server: Server, ticket: Ticket) -> None:
        """POST /prompt under the job's id; after a lost answer, ask whether it arrived before sending it again.
        QueueError when ComfyUI rejects it."""
        prompt, pid, last = self.plan.fill(ticket.job), ticket.prompt_id, None
        for i in range(4):
            if self.stop.is_set():
                raise _Stopped
            try:
                if i and (server.client.history(pid) is not None or server.client.queue_state(pid)):
                    break
                server.client.submit(prompt, pid)
                break
            except ServerUnavailable as exc:
                last = exc
                if not server.up:
                    break
                self.stop.wait(min(self.backoff * 0.25 * 2 ** i, 2.0))
        else:
            self.pool.down(server, str(last))
        if not server.up:
            ticket.server, ticket.held = server, pid
            raise _Requeue
        old = ticket.server
        if old is not None and old is not server and not old.up:  # it may still sit in the dead server's queue
            with old.lock:
                old.orphans.add(ticket.held)
        ticket.server, ticket.held = server, pid

    def _call(self, server: Server, fn):
        """``fn()`` (a request to ``server``), tried again a few times after a lost connection; _Requeue once the
        server counts as down."""
        for i in range(4):
            if self.stop.is_set():
                raise _Stopped
            if not server.up:
                raise _Requeue
            try:
                return fn()
            except ServerUnavailable as exc:
                last = exc
                self.stop.wait(min(self.backoff * 0.25 * 2 ** i, 2.0))
        self.pool.down(server, str(last))
        raise _Requeue

    def _wait(self, server: Server, ticket: Ticket) -> dict:
        """Poll the job's prompt on ``server`` until it has finished; its history entry."""
        pid, start = ticket.prompt_id, time.monotonic()
        next_check = start + self.check_every
        while True:
            if self.stop.is_set():
                delete(server, [pid])  # a queued prompt goes; a running one finishes and a rerun collects it
                raise _Stopped
            try:
                entry = self._call(server, lambda: server.client.history(pid))
                if entry is None and time.monotonic() >= next_check:
                    state = self._call(server, lambda: server.client.queue_state(pid))
                    entry = self._call(server, lambda: server.client.history(pid))
                    if entry is None and state is None:
                        ticket.losses += 1
                        if ticket.losses > MAX_LOSSES:
                            raise QueueError(f"prompt {pid} vanished from {server.url} {ticket.losses} times")
                        log.warning("prompt %s vanished from %s (restarted?); sending it again", pid, server.url)
                        raise _Requeue
                    next_check = time.monotonic() + self.check_every
            except _Requeue:
                ticket.server, ticket.held = server, pid
                raise
            if entry is not None:
                return entry
            now = time.monotonic()
            if self.timeout and now - start > self.timeout:
                server.client.cancel(pid)
                self.pool.down(server, f"job {pid} made no progress for {self.timeout:g} s")
                ticket.server, ticket.held = server, pid
                raise _Requeue
            self.stop.wait(min(self.poll, max(0.02, (now - start) / 4)))

    def _download(self, server: Server, entry: dict) -> list[bytes]:
        items = [item for _, item in output_items(entry.get("outputs") or {})]
        saved = [item for item in items if (item.get("type") or "output") == "output"]
        return [self._call(server, lambda item=item: server.client.fetch(item)) for item in saved or items]


def make(server=(), workflow=None, per_server: int = DEFAULT_PER_SERVER, timeout: float = DEFAULT_TIMEOUT,
         **options) -> ComfyUIBackend:
    """The backend from the ``batch`` command's flags (``--server``, ``--workflow``, ``--per-server``,
    ``--timeout``); nothing is contacted before ``check``."""
    return ComfyUIBackend(options.pop("servers", server), workflow, per_server=per_server, timeout=timeout,
                          **options)


__all__ = ["ComfyUIBackend", "make", "prompt_id", "DEFAULT_WORKFLOW", "DEFAULT_PER_SERVER"]
