"""The ``ray`` batch backend: the jobs of a batch on a Ray cluster (or a Ray started in this process).

Each worker is a Ray actor holding one loaded pipeline: the local backend (`aura_flow.batch.local.LocalBackend`)
inside it generates and encodes a job's images, so they are byte-identical to ``--backend local``'s. The driver (this
process) pulls jobs from the stream into a bounded window, hands each worker at most ``in_flight`` jobs at a time
(one running, one queued, so a worker never waits for the driver), and records every result through the sink: only
the driver writes the manifest.

Why Ray core actors and not Ray Data ``map_batches`` (the documented Stable Diffusion example): the manifest must
get exactly one line per job, written by the driver as each job finishes, and a rerun must skip what is done. With
actors the driver holds, per job, one object reference it waits on: it knows which job finished, which is in
flight (said on Ctrl-C), and which to send again when a worker died, and it can keep a worker on one LoRA set (the
window is grouped by LoRA set: a worker takes the next job of its current set, and only switches when the window
holds none). Ray Data would want the job list as a dataset (materialised or a custom datasource), hands results back
in blocks of its own choosing, and re-executes tasks in ways the caller does not see; grouping by LoRA set and a
clean stop would be fought against, not configured. The fault tolerance is Ray's either way: each actor is created
with ``max_restarts`` and ``max_task_retries``, so Ray restarts a dead worker (it loads the model again) and retries
its tasks; when it gives up (``RayActorError``) the driver sends the job to another worker (at most
``MAX_ATTEMPTS`` times). A job is recorded once: the driver calls ``sink.done`` once per job, and the sink drops a
second ``done`` for a job already done.

Images: by default (a folder every node sees) each worker writes its job's files into the output folder itself,
under the names the sink gives (`aura_flow.batch.runner.image_names`), and the driver records them with
``sink.done(job, files=...)``. A retried job (its worker died after writing, or the driver died before recording)
finds its own earlier files: a name already holding exactly these bytes is taken over rather than written again
(the bytes carry the job's full parameters, so only this job's image can match), any other file is never touched
and a free name is used. ``collect=True`` (``--collect``, an output folder the workers cannot see): the workers
return the encoded bytes and the driver's sink writes them.

``import ray`` happens only here, only when this backend is chosen; without Ray the command says how to install it.
"""
from __future__ import annotations

import collections
import logging
import os
import platform
import threading
import time
from pathlib import Path

from ..errors import LoadError, ParameterError
from . import ray_cluster
from .ray_files import write_files

log = logging.getLogger(__name__)

INSTALL = ('the ray backend needs Ray, which is not installed; install it with: pip install "comfyui-auraflow[ray]" '
           '(from a checkout: pip install ".[ray]")')
CLIENT = 'ray_address={}: Ray Client (ray://) needs grpcio, which is not installed; pip install "ray[client]"'
SHARED_STORAGE = ("the model files must be on storage every node can read (a shared filesystem), at the same path "
                  "on every node")
MAX_RESTARTS = 3  # Ray restarts a dead worker this often (it loads the model again)
MAX_TASK_RETRIES = 3  # and retries a task of a dead worker this often on the restarted one
MAX_ATTEMPTS = 3  # the driver sends a job whose worker Ray gave up on to another worker this often, then fails it
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
LOCAL_OBJECT_STORE = 256 * 2**20  # bytes of /dev/shm for a Ray started in this process (images are small)


def import_ray():
    """The ``ray`` module, or a ParameterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ParameterError(INSTALL) from None
    return ray


def _as_local_threads(env: dict) -> None:
    """torch's thread count as a process started with ``env``'s thread variables would have it (torch's own default
    where they are unset: this node's cores, not the CPU share Ray gave the actor)."""
    import sys

    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if "torch" in sys.modules:  # too late for the variables: the count torch would take from them
        sys.modules["torch"].set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))


class Worker:
    """The body of a worker actor: one `LocalBackend` whose model loads once (made a Ray actor by `RayBackend`).

    threads_env: for a CPU worker, the driver's ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (None where unset), put in
    place of the ones Ray sets (its CPU share) before torch loads, so torch runs as many threads as the local backend
    on this node: a CPU's float sums depend on the thread count, and the images must be the same bytes. None: a GPU
    worker, left as Ray sets it."""

    def __init__(self, options: dict, threads_env, nice: int = 0):
        self.name = f"{platform.node()}:{os.getpid()}"
        self.error, self.local = None, None
        try:  # Ray starts workers at niceness 15: on a busy machine they would get a fraction of the local speed
            if os.getpriority(os.PRIO_PROCESS, 0) > nice:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
        except (OSError, AttributeError):  # not allowed here (or not POSIX): the cluster's setting stays
            pass
        try:
            if threads_env is not None:
                _as_local_threads(threads_env)
            from .local import LocalBackend

            self.local = LocalBackend(**options)
            self.local.check()
            self.name = f"{platform.node()}:{os.getpid()}/{self.local.pipe.device}"
        except Exception as exc:  # noqa: BLE001 - whatever stops the load is said to the driver, not a restart loop
            self.error = f"worker {self.name} cannot load the model: {exc}; {SHARED_STORAGE}"

    def ready(self):
        """(name, error or None, torch's CPU threads, the folder its aura_flow was imported from): the driver waits
        on this before any job is sent."""
        import torch

        import aura_flow

        return self.name, self.error, torch.get_num_threads(), str(Path(aura_flow.__file__).parent)

    def run(self, job, folder) -> dict:
        """One job: ``{"worker", "seconds"}`` and ``"files"`` (written into ``folder``) or, when ``folder`` is None,
        ``"images"`` (bytes); or ``"error"`` (the engine refused or failed it: that job fails, the worker goes
        on)."""
        from ..errors import NumericError

        t0 = time.perf_counter()
        out = {"worker": self.name}
        try:
            images = self.local.run_one(job, threading.Event())
            if folder is None:
                out["images"] = images
            else:
                out["files"] = write_files(folder, job, images)
        except (ParameterError, LoadError, NumericError, OSError) as exc:
            out["error"] = str(exc)
        out["seconds"] = time.perf_counter() - t0
        return out


class _Window:
    """Jobs pulled from the stream, at most ``size`` at a time, grouped by LoRA set (in order of arrival)."""

    def __init__(self, jobs, size: int):
        self.it, self.size = iter(jobs), max(1, size)
        self.groups: collections.OrderedDict = collections.OrderedDict()
        self.count, self.exhausted = 0, False

    def _fill(self) -> None:
        while self.count < self.size and not self.exhausted:
            try:
                job = next(self.it)
            except StopIteration:
                self.exhausted = True
                return
            self.groups.setdefault(job.loras, collections.deque()).append(job)
            self.count += 1

    def take(self, loras):
        """The next job of the set ``loras``, else of the oldest set waiting; None when the stream is done."""
        self._fill()
        group = self.groups.get(loras)
        if not group:
            if not self.groups:
                return None
            loras, group = next(iter(self.groups.items()))
        job = group.popleft()
        if not group:
            del self.groups[loras]
        self.count -= 1
        return job

    def empty(self) -> bool:
        self._fill()
        return not self.groups

    def put_back(self, job) -> None:
        self.groups.setdefault(job.loras, collections.deque()).appendleft(job)
        self.groups.move_to_end(job.loras, last=False)
        self.count += 1


class _Slot:
    """The driver's view of one worker actor."""

    def __init__(self, handle, name: str):
        self.handle, self.name, self.loras, self.alive, self.threads, self.code = handle, name, None, True, None, ""
        self.running: dict = {}  # object ref -> (job, attempt)
        self.done = self.images = 0
        self.t0 = None  # when its first job was sent

    def rate(self) -> str:
        seconds = time.perf_counter() - (self.t0 or time.perf_counter())
        return f"{self.done} ({self.images * 60.0 / max(seconds, 1e-9):.1f} img/min)"


class RayBackend:
    """Jobs on Ray worker actors. ``address``: "local" (Ray started in this process on this machine, unless this
    process already runs Ray), "auto" (``RAY_ADDRESS``, else the cluster this machine belongs to), ``HOST:PORT`` (a
    node's GCS) or ``ray://HOST:PORT`` (Ray Client); a cluster joined gets this process's aura_flow package. ``workers``:
    how many (default: one per GPU-set where Ray sees GPUs, else one per node). ``gpus_per_worker``: GPUs each
    (default 1 where the cluster has GPUs, else 0: CPU workers, each running torch on every core of its node as the
    local backend does, so that the bytes are the same: two on one node share its cores). ``collect``: return the
    images to the driver instead of writing them from the workers. The model options (``checkpoint``,
    ``tokenizer``, ``text_encoder``, ``vae``, ``dtype``, ``device``, ``speed``, ``noise_device``) are the local
    backend's; the files must be readable on every node."""

    name = "ray"
    remote = False
    accepts_sets = False
    checks_lora_files = True

    def __init__(self, checkpoint=None, *, ray_address="local", workers=None, gpus_per_worker=None, collect=False,
                 in_flight: int = 2, window: int = 256, init_options=None, **model):
        from .local import LocalBackend

        if not checkpoint:
            raise ParameterError("checkpoint is required for the ray backend; give checkpoint=PATH (a diffusers "
                                 "folder or .safetensors, on storage every node can read)")
        LocalBackend(checkpoint, **model)  # the model options checked here; nothing loads
        self.options = {"checkpoint": str(checkpoint), **model}
        for key in ("checkpoint", "tokenizer", "text_encoder", "vae"):  # a worker's cwd is not ours
            value = self.options.get(key)
            if value and not Path(value).expanduser().is_absolute() and Path(value).exists():
                self.options[key] = str(Path(value).resolve())
        address = str(ray_address or "local")
        if address == "auto" and os.environ.get("RAY_ADDRESS", "").startswith("ray://"):  # Ray Client's settings
            address = os.environ["RAY_ADDRESS"]
        if address not in ("local", "auto") and not address.startswith("ray://") and ":" not in address:
            raise ParameterError(f"ray_address={address!r} is not a Ray address; give local, auto, HOST:PORT "
                                 "(a node's GCS port, 6379 by default) or ray://HOST:PORT (Ray Client, 10001)")
        for flag, value, lo in (("workers", workers, 1), ("gpus_per_worker", gpus_per_worker, 0),
                                ("in_flight", in_flight, 1), ("window", window, 1)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not lo <= value <= 100000):
                raise ParameterError(f"{flag}={value!r} is out of range; allowed: {lo} to 100000")
        if workers is not None and int(workers) != workers:
            raise ParameterError(f"workers={workers!r} is not a whole number; give a count of workers")
        self.address, self.workers, self.gpus = address, workers, gpus_per_worker
        self.collect, self.in_flight, self.window = bool(collect), int(in_flight), int(window)
        self.init_options = dict(init_options or {})
        self.ray = self.watch = None
        self._owns_ray = self._gone = False
        self.slots: list[_Slot] = []
        self._folder = None

    # -------------------------------------------------------------- setting up
    def check(self) -> None:
        """Ray importable, reachable, the worker count feasible (the model files on this machine when Ray runs
        here); then the workers started, each loading the model: a LoadError when one cannot."""
        if self.slots:
            return
        ray = self.ray = import_ray()
        if self.address == "local" and not Path(self.options["checkpoint"]).expanduser().exists():
            raise LoadError(f"checkpoint={self.options['checkpoint']}: no such file or folder")
        if not ray.is_initialized():
            self._init(ray)
        self._size()
        self._start()

    def _init(self, ray) -> None:
        """Ray started here ("local"), or the cluster joined: its address probed first (Ray would wait forever),
        this process's aura_flow sent to its workers (`aura_flow.batch.ray_cluster`)."""
        opts = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
                "configure_logging": False, **self.init_options}
        hostport = ray_cluster.target(self.address)
        ray_cluster.check_reachable(self.address, hostport)
        if self.address == "local":
            opts.setdefault("num_cpus", os.cpu_count() or 1)
            opts.setdefault("object_store_memory", LOCAL_OBJECT_STORE)
        elif self.address.startswith("ray://"):  # Ray Client: the cluster's settings are the server's
            try:
                import grpc  # noqa: F401 - Ray Client's transport, in ray[client]
            except ImportError:
                raise ParameterError(CLIENT.format(self.address)) from None
            opts = {"address": self.address, "runtime_env": ray_cluster.code_env(), **self.init_options}
        else:
            opts.update(address=self.address, runtime_env=opts.get("runtime_env") or ray_cluster.code_env())
            for key in ("num_cpus", "object_store_memory", "include_dashboard"):  # a cluster's own settings
                opts.pop(key, None)
        try:
            ray.init(**opts)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ray_cluster.ClusterUnavailable(f"ray_address={self.address}: no Ray cluster to join ({exc}); "
                                                 "start one with `ray start --head` on a node, or use "
                                                 "ray_address=local") from None
        self._owns_ray = True
        self.watch = ray_cluster.Watch(self.address, hostport)

    def _size(self) -> None:
        """Worker count, GPUs and CPUs each, from the cluster's resources; an impossible request is an error."""
        ray = self.ray
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total_gpus = sum(r.get("GPU", 0) for r in nodes)
        gpus = self.gpus if self.gpus is not None else (1 if total_gpus else 0)
        if gpus:
            workers = self.workers or max(1, int(total_gpus // gpus))
            if workers * gpus > total_gpus:
                raise ParameterError(f"workers={workers} with gpus_per_worker={gpus:g} need {workers * gpus:g} GPUs;"
                                     f" the Ray cluster has {total_gpus:g}")
            self.cpus = 1
        else:
            workers = self.workers or max(1, len(nodes))
            node_cpus = min((int(r.get("CPU", 0)) for r in nodes), default=0)
            total = sum(int(r.get("CPU", 0)) for r in nodes)
            self.cpus = max(1, min(node_cpus, total // workers))
            if workers > total:
                raise ParameterError(f"workers={workers} CPU workers need {workers} CPUs; the Ray cluster has "
                                     f"{total} (and no GPUs)")
        self.n_workers, self.gpu_each = int(workers), gpus

    def _start(self) -> None:
        """Start the workers and wait until each has loaded the model (a LoadError naming the first that could
        not)."""
        ray = self.ray
        actor = ray.remote(Worker).options(num_cpus=self.cpus, num_gpus=self.gpu_each, max_restarts=MAX_RESTARTS,
                                           max_task_retries=MAX_TASK_RETRIES)
        threads_env = None if self.gpu_each else {k: os.environ.get(k) for k in THREAD_VARS}
        nice = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
        handles = [actor.remote(self.options, threads_env, nice) for _ in range(self.n_workers)]
        self.slots = [_Slot(h, f"worker{i}") for i, h in enumerate(handles)]
        log.info("ray: starting %d workers (%g CPUs, %g GPUs each); each loads the model", len(handles), self.cpus,
                 self.gpu_each)
        try:
            answers = ray.get([h.ready.remote() for h in handles])
        except ray.exceptions.RayActorError as exc:
            raise LoadError(f"a Ray worker died while loading the model ({exc}); {SHARED_STORAGE}") from None
        for slot, (name, error, threads, code) in zip(self.slots, answers):
            if error:
                raise LoadError(error)
            slot.name, slot.threads, slot.code = name, threads, code
        log.info("ray: %d workers ready (%s); their aura_flow: %s", len(self.slots),
                 ", ".join(f"{s.name} with {s.threads} CPU threads" for s in self.slots),
                 ", ".join(sorted({s.code for s in self.slots})))

    # -------------------------------------------------------------- running
    def run(self, jobs, sink, stop) -> None:
        self.check()
        folder = None if self.collect else getattr(sink, "folder", None)
        self._folder = None if folder is None else str(Path(folder).resolve())  # a worker's cwd is not ours
        ray = self.ray
        window = _Window(jobs, self.window)
        attempts: dict = {}  # job key -> driver sends so far (only for jobs whose worker Ray gave up on)
        running: dict = {}  # object ref -> slot
        while not stop.is_set():
            self._submit(window, sink, running)
            if not running:
                if window.empty():
                    return
                raise LoadError("every Ray worker died and Ray gave up restarting them; see the Ray logs "
                                "(ray_address=local: /tmp/ray/session_latest/logs), then run again to resume")
            try:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            except ConnectionError:  # Ray Client: the connection to the cluster is lost
                self._check_cluster(len(running), lost=True)
            for ref in ready:
                self._finish(ref, running.pop(ref), window, sink, attempts, len(running) + 1)
            if not ready and self.watch is not None and self.watch.due():
                self._check_cluster(len(running))
        # stopped: what is in flight is abandoned (close() ends the workers); a rerun does those jobs

    def _submit(self, window, sink, running) -> None:
        for slot in self.slots:
            while slot.alive and len(slot.running) < self.in_flight:
                job = window.take(slot.loras)
                if job is None:
                    return
                slot.loras = job.loras
                slot.t0 = slot.t0 or time.perf_counter()
                ref = slot.handle.run.remote(job, self._folder)
                slot.running[ref] = job
                running[ref] = slot
                sink.started(job, {"worker": slot.name})

    def _check_cluster(self, in_flight: int, lost: bool = False) -> None:
        """A `ClusterUnavailable` when the cluster joined no longer answers, or ``lost`` (nothing in flight is
        recorded)."""
        if self.watch is not None and (lost or self.watch.gone()):
            self._gone = True
            raise self.watch.error(sum(s.done for s in self.slots), in_flight)
        if lost:
            raise LoadError("the connection to Ray was lost; run the same command again to resume")

    def _finish(self, ref, slot, window, sink, attempts, in_flight) -> None:
        ray = self.ray
        job = slot.running.pop(ref)
        try:
            out = ray.get(ref)
        except (ray.exceptions.RayActorError, ConnectionError) as exc:  # Ray's restarts or retries are used up
            # or the whole cluster is gone: that is not the job's failure
            self._check_cluster(in_flight, lost=isinstance(exc, ConnectionError))
            if isinstance(exc, ray.exceptions.ActorDiedError):
                slot.alive = False
            n = attempts[job.key] = attempts.get(job.key, 0) + 1
            if n >= MAX_ATTEMPTS:
                sink.failed(job, f"its Ray worker died {n} times ({type(exc).__name__})",
                            where={"worker": slot.name}, seconds=0.0)
            else:
                log.warning("ray: worker %s died running line %d; the job goes to another worker", slot.name,
                            job.line)
                window.put_back(job)
            return
        except ray.exceptions.RayTaskError as exc:  # a bug, not a refusal: this job fails, the run goes on
            sink.failed(job, str(exc.cause if getattr(exc, "cause", None) else exc), where={"worker": slot.name},
                        seconds=0.0)
            return
        where = {"worker": out["worker"]}
        if "error" in out:
            log.warning("line %d: %s", job.line, out["error"])
            sink.failed(job, out["error"], where=where, seconds=out["seconds"])
            return
        slot.done += 1
        slot.images += len(out.get("images") or out.get("files") or ())
        postfix = getattr(sink, "postfix", None)
        if postfix is not None:  # per worker: jobs done, images per minute (shown with the sink's next line)
            postfix({s.name: s.rate() for s in self.slots})
        if "images" in out:
            sink.done(job, out["images"], where=where, seconds=out["seconds"])
        else:
            sink.done(job, files=out["files"], where=where, seconds=out["seconds"])

    def close(self) -> None:
        """End the workers (their models with them), and Ray when this backend started it."""
        ray, slots, self.slots = self.ray, self.slots, []
        if ray is None:
            return
        for slot in slots:
            if slot.done:
                log.info("ray: %s: %s", slot.name, slot.rate())
            try:
                if not self._gone:  # a cluster gone has no workers left to end
                    ray.kill(slot.handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def make(**options) -> RayBackend:
    return RayBackend(**options)


__all__ = ["RayBackend", "Worker", "make", "import_ray", "write_files", "INSTALL"]
