"""The batch vocabulary every backend shares: a `Job` (one checked set of generation parameters), the `Sink` a
backend reports each job's fate to, and the `Backend` face the runner drives.

Torch-free and standard library only: the ComfyUI, hosted and Ray backends import it without the engine.

- A `Job` is made by `aura_flow.batch.jobs` from one line of a job file (and its ``--seeds`` / ``--grid``
  expansion): its parameters are already checked, its seed already fixed. ``key`` names it in the manifest: the same
  parameters give the same key on every run, so a rerun knows what is done.
- A backend pulls jobs from an iterator (the file is read streaming), runs them wherever it runs them, and for each
  calls the sink: `Sink.started` when it is handed to a worker or server, `Sink.submitted` when a hosted service named
  a request id for it (before its images arrive), then exactly one of `Sink.done` (with the image bytes, or with
  the files a worker already wrote into the output folder) or `Sink.failed`. The sink writes the files (never over
  another file) and the manifest line; it is thread-safe.
- ``stop`` is a `threading.Event`: set on Ctrl-C; a backend submits nothing new once it is set, and returns after
  cancelling or abandoning what is in flight (its jobs stay unfinished in the manifest, so a rerun does them).
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

# the generation parameters of a job, as the hosted API and the CLI's flags name them (aura_flow.params.DEFAULTS)
GENERATION_KEYS = ("prompt", "negative_prompt", "cfg", "seed", "shift", "steps", "width", "height", "sampler",
                   "scheduler", "number_of_images", "output_format", "output_quality")


@dataclass(frozen=True)
class Job:
    """One generation of a batch.

    line: the job file's line it came from (1-based, counted as an editor does; for CSV the header is line 1).
    index: its place among the jobs its line expands into (``--seeds``, ``--grid``), 0 when it does not expand.
    params: the checked generation parameters (every key of `GENERATION_KEYS`, the seed fixed).
    loras: ``((path, strength), ...)`` as the line gives them, checked.
    name: the line's ``name``, or None: it only names the files.
    sets: ``(("NODE.INPUT", value), ...)``: workflow inputs for the ComfyUI backend (``queue --set`` keys).
    expands: whether its line made more than one job (then ``index`` is part of the file names).
    """

    line: int
    index: int
    params: Mapping
    loras: tuple = ()
    name: str | None = None
    sets: tuple = ()
    expands: bool = False
    key: str = field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "key", job_key(self.params, self.loras, self.sets))

    @property
    def seed(self) -> int:
        return self.params["seed"]

    @property
    def stem(self) -> str:
        """The start of every file name of this job: the line's name (or ``line00042``), the expansion index when
        the line made several jobs, and the seed."""
        base = self.name or f"line{self.line:05d}"
        return f"{base}_{self.index:03d}_{self.seed}" if self.expands else f"{base}_{self.seed}"

    def file_names(self, ext: str) -> list[str]:
        """The names this job's images are written under (a name already taken gets ``_1``, ``_2``...)."""
        return [f"{self.stem}_{i:02d}.{ext}" for i in range(self.params["number_of_images"])]


def job_key(params: Mapping, loras=(), sets=()) -> str:
    """A stable name for a job's full parameters: the same parameters give the same key in every run and process."""
    canon = json.dumps({"params": {k: params[k] for k in sorted(params)},
                        "loras": [[str(p), float(s)] for p, s in loras],
                        "sets": [[k, v] for k, v in sets]}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:24]


class Sink(Protocol):
    """Where a backend reports; the runner's implementation writes files and the manifest (thread-safe).

    where: a small dict saying where the job ran, written into its manifest line: ``{"server": URL}``,
    ``{"request_id": ID}``, ``{"worker": NAME}`` or ``{}``.
    ``folder``: the output folder (a `pathlib.Path`), where a backend whose workers write the images themselves puts
    them (under `runner.image_names`) before reporting ``done(job, files=...)``.
    """

    folder: object

    def started(self, job: Job, where: Mapping) -> None:
        """The job was handed to a worker or server (progress only; nothing is written)."""

    def submitted(self, job: Job, where: Mapping) -> None:
        """A service accepted the job and named it (``where["request_id"]``): a ``submitted`` manifest line, fsynced,
        so a rerun after a crash fetches this request instead of paying for it again."""

    def resume_ids(self, job: Job) -> list[str]:
        """Request ids an earlier run submitted for this job and never finished (hosted backend: fetch these)."""

    def done(self, job: Job, images: list[bytes] | None = None, *, files: list[str] | None = None,
             where: Mapping, seconds: float, extra: Mapping | None = None) -> list[str]:
        """The job finished: ``images`` (encoded image bytes, written here under the job's names) or ``files``
        (paths relative to the output folder that a worker already wrote). A ``done`` line; the relative paths."""

    def failed(self, job: Job, error: str, *, where: Mapping, seconds: float) -> None:
        """The job failed (ComfyUI rejected it, the service failed it, the engine raised): a ``failed`` line."""

    def postfix(self, values: Mapping) -> None:
        """Extra progress shown beside the bar, e.g. ``{"a:8188": 3, "b:8188": 2}`` (per-server counts)."""


class Backend(Protocol):
    """What the runner drives. ``name`` goes into every manifest line as ``backend``.

    Optional, read by the runner with ``getattr``: class attributes ``remote`` (jobs checked with the hosted API's
    ranges; default False), ``accepts_sets`` (``NODE.INPUT`` keys allowed; False), ``checks_lora_files`` (each LoRA
    file's header read while checking; True), and ``check_job(job)``, called for every job before any runs (a
    ParameterError there names the job's line)."""

    name: str

    def check(self) -> None:
        """Cheap checks of the backend's own options and reachability, after every job was checked and before any
        runs (a missing Ray, an unreadable model file, no server answering): ParameterError / LoadError."""

    def run(self, jobs: Iterable[Job], sink: Sink, stop: threading.Event) -> None:
        """Run every job of ``jobs`` (pulled lazily), reporting each through ``sink``; return when all are reported
        or ``stop`` is set."""

    def close(self) -> None:
        """Release what ``check``/``run`` took (models, pools, Ray)."""


__all__ = ["GENERATION_KEYS", "Job", "job_key", "Sink", "Backend"]
