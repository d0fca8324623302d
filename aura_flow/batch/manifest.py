"""``DIR/manifest.jsonl``: the append-only record of a batch, one JSON line per finished job attempt.

A line: ``job`` (`Job.key`), ``line``, ``index``, ``name``, ``status`` (``done`` | ``failed`` | ``submitted``),
``files`` (paths relative to DIR), ``sha256`` (one per file), ``seed``, ``backend``, where it ran (``server`` /
``request_id`` / ``worker``), ``seconds``, ``error``, ``time``; a ``submitted`` line may name the ``image`` of the job
its request makes. Each line is written with one ``write()`` on a file
opened ``O_APPEND``, then flushed and fsynced, so lines of concurrent writers never interleave and a crash tears at
most the last line. Reading skips a torn last line (no newline and no valid JSON; the next append first ends it
with a newline) and warns about a bad line in the middle.

`Manifest.open(folder)` reads the file into a compact index (job key -> latest status, and the request ids
submitted and not finished): memory in proportion to the jobs recorded, nothing more.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

from ..errors import ParameterError
from ..remote.endpoint import REQUEST_ID

log = logging.getLogger(__name__)

FILE_NAME = "manifest.jsonl"
DONE, FAILED, SUBMITTED = "done", "failed", "submitted"
_CODES = {DONE: 1, FAILED: 2, SUBMITTED: 3}
_NAMES = {v: k for k, v in _CODES.items()}
MAX_ERROR = 2000  # characters of an error kept in a line
MAX_IDS = 64  # request ids kept per job
MAX_TARGETS = 8  # distinct (provider, model) pairs kept: enough to name a mix-up
MAX_LINE = 1 << 20  # bytes of one line read back: ours are well under 64 KiB; a longer one was not written by us


def read_records(path):
    """Yield ``(line number, record)`` of a manifest file; a torn last line is skipped silently, a bad line in the
    middle with a warning. Also returns (as the generator's value) whether the file ends without a newline."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO would block the read, a link leads elsewhere
            raise ParameterError(f"{path}: not a regular file (a folder, a link, a pipe or a device), so the record "
                                 "of this folder's jobs cannot be read nor extended; move it away or give another "
                                 "output folder")
        fh = open(path, "rb")
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ParameterError(f"{path}: cannot be read ({exc.strerror or exc}); fix its permissions or give another "
                             "output folder") from None
    with fh:
        n = 0
        pending = None  # a bad line, reported once a later line shows it is not the last
        for raw in _bounded_lines(fh):
            n += 1
            if pending is not None:
                log.warning("%s line %d: not a manifest record (%s); skipped", path, *pending)
                pending = None
            torn = not raw.endswith(b"\n")
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict) or not isinstance(record.get("job"), str) \
                        or record.get("status") not in _CODES:
                    raise ValueError("no job key or status")
            except ValueError as exc:
                if not torn:
                    pending = (n, str(exc)[:80])
                continue
            yield n, record
        if pending is not None:
            log.warning("%s line %d: not a manifest record (%s); skipped", path, *pending)
        return bool(n) and torn


def target_of(record) -> tuple:
    """Where a line's images come from: ``(provider, model)`` for a hosted service, ``(None, None)`` for the user's
    own model (the local, comfyui and ray backends). A job's key names its parameters only, so images of one target
    must not count as done for another."""
    provider, model = record.get("provider"), record.get("model")
    if not isinstance(provider, str):
        return None, None
    return provider[:64], model[:64] if isinstance(model, str) else None


def _bounded_lines(fh):
    """The file's lines as bytes, each at most MAX_LINE (a longer one is skipped to its end and given as b"{}\n",
    which is no record): a manifest edited or damaged by hand never makes one huge read."""
    while True:
        raw = fh.readline(MAX_LINE + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = fh.readline(MAX_LINE)
            raw = b"{}\n" if raw else b"{}"
        yield raw


def _rid(entry) -> str:
    return entry[0] if isinstance(entry, tuple) else entry


class Manifest:
    """The manifest of one output folder: its index in memory and appends to its file (thread-safe)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self._index: dict[str, object] = {}  # key -> status code, or (SUBMITTED code, request id, ...)
        self._lock = threading.Lock()
        self._fd = None
        self._needs_newline = False
        self.records = 0
        self.targets: set = set()  # (provider, model) of the lines read; (None, None) for the user's own model

    @classmethod
    def open(cls, folder) -> "Manifest":
        """Read the folder's manifest (if any) into the index; the file itself is opened at the first append."""
        m = cls(folder)
        gen = read_records(m.path)
        while True:
            try:
                _, record = next(gen)
            except StopIteration as stop:
                m._needs_newline = bool(stop.value)
                break
            m._note(record)
        return m

    def _note(self, record) -> None:
        key, status = record["job"], record["status"]
        self.records += 1
        if len(self.targets) < MAX_TARGETS:
            self.targets.add(target_of(record))
        old = self._index.get(key)
        if old == _CODES[DONE]:
            return  # done is final: its files exist
        if status == SUBMITTED:
            rid, image = record.get("request_id"), record.get("image")
            ids = old[1:] if isinstance(old, tuple) else ()
            if isinstance(rid, str) and REQUEST_ID.fullmatch(rid) and rid not in map(_rid, ids) \
                    and len(ids) < MAX_IDS:  # an id edited into the file ('..', 'a/b') is never asked for
                # with the image of the job the request makes, when the line says it (hosted: one per image)
                ids += ((rid, image) if type(image) is int else rid,)
            self._index[key] = (_CODES[SUBMITTED],) + ids
        else:
            self._index[key] = _CODES[status]

    def status(self, key: str) -> str | None:
        """``done``, ``failed``, ``submitted`` or None (never recorded)."""
        v = self._index.get(key)
        return None if v is None else _NAMES[v[0] if isinstance(v, tuple) else v]

    def pending_ids(self, key: str) -> list[str]:
        """Request ids submitted for the job and never finished."""
        v = self._index.get(key)
        return [_rid(e) for e in v[1:]] if isinstance(v, tuple) else []

    def pending_images(self, key: str) -> list[tuple[str, int | None]]:
        """(request id, the job's image it makes, or None when its line did not say) of `pending_ids`."""
        v = self._index.get(key)
        return [e if isinstance(e, tuple) else (e, None) for e in v[1:]] if isinstance(v, tuple) else []

    def __len__(self):
        return len(self._index)

    def counts(self) -> dict:
        out = {DONE: 0, FAILED: 0, SUBMITTED: 0}
        for v in self._index.values():
            out[_NAMES[v[0] if isinstance(v, tuple) else v]] += 1
        return out

    def append(self, record: dict) -> dict:
        """Write ``record`` (``job`` and ``status`` required; ``time`` added) as one line, flushed and fsynced."""
        record = {**record, "time": record.get("time") or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if record.get("error"):
            record["error"] = str(record["error"])[:MAX_ERROR]
        data = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                   | getattr(os, "O_NOFOLLOW", 0), 0o666)
            if self._needs_newline:
                data = b"\n" + data  # the torn line ends here; this record starts on its own line
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes); the disk may be full")
            os.fsync(self._fd)
            self._needs_newline = False
            self._note(record)
        return record

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


__all__ = ["Manifest", "read_records", "target_of", "FILE_NAME", "DONE", "FAILED", "SUBMITTED"]
