"""LoRAs on a loaded pipeline: checked lists, prepared once per file version, switched on the shared transformer.

- `check_loras(items)`: ``[(path, strength), ...]`` checked before any heavy work: every strength in range, every
  file there and readable (only its header is read). Returns `LoraEntry` tuples.
- `LoraState`: one per transformer. Caches a `PreparedLora` per file version ((resolved path, mtime, size)), so
  switching LoRAs or strengths never reads a file again, and holds which list is active on the layers now.
  ``scope(entries)`` makes a list active for the body of a run, under a lock; the outermost scope decides, so a
  run that calls other parts of the pipeline keeps its own LoRAs.
- `LoraModelView`: what ``pipeline.with_loras(...)`` returns: a light model that shares the pipeline's modules and
  has its own LoRA list, activated on the shared layers just before each of its runs. The pipeline itself (and
  any other view) keeps its own list, so a graph can sample the base model and LoRA variants side by side.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from ..errors import LoadError, NumericError, ParameterError, shown
from ..params import LORA_STRENGTH
from ..provenance import file_hash, file_key

log = logging.getLogger(__name__)


class LoraEntry(NamedTuple):
    """One LoRA of a model's list: its file (resolved) and strength."""
    path: str
    strength: float


def check_strength(value, label: str) -> float:
    rng = LORA_STRENGTH
    try:
        strength = float(value)
    except (TypeError, ValueError):
        strength = math.nan
    if isinstance(value, bool) or not math.isfinite(strength) or not rng.lo <= strength <= rng.hi:
        raise ParameterError(f"loras: strength {value!r} of {label} is not a number in {rng.lo:g}..{rng.hi:g}; "
                             f"use 1 for the LoRA as trained, 0 to turn it off, a negative value to subtract it")
    return strength


def check_loras(items) -> tuple[LoraEntry, ...]:
    """``items`` (``(path, strength)`` pairs, `LoraEntry`s) checked: strengths in range and finite, files present and
    readable as LoRAs (their headers only). Raises ParameterError / LoadError naming the file and the fix."""
    from ..lora import LoraFile
    from ..lora.apply import warn_repeated

    if items is None:
        return ()
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise ParameterError(f"loras must be a list of (path, strength) pairs, got {type(items).__name__}")
    out = []
    for item in items:
        try:
            path, strength = item
        except (TypeError, ValueError):
            raise ParameterError(f"loras: each item is (path, strength), got {item!r}") from None
        strength = check_strength(strength, Path(str(path)).name)
        try:
            file = LoraFile(path)  # LoadError when missing, not safetensors, or unreadable
        except OSError as exc:  # a name over the file system's limit, a link loop: no file can be there
            raise LoadError(f"{shown(str(path))}: not a path to a LoRA file ({exc.strerror or exc}); check the "
                            "path") from None
        out.append(LoraEntry(str(file.path.resolve()), strength))
    warn_repeated([e.path for e in out], [Path(e.path).name for e in out])
    return tuple(out)


MAX_PREPARED = 8  # prepared LoRA files kept (more only while a longer list is active): tens-hundreds of MiB each


class LoraState:
    """The LoRA side of one transformer: prepared files (cached per file version) and the active list.

    The cache keeps the `MAX_PREPARED` files used last (and every active one): a user trying one LoRA after
    another in one process would otherwise keep every file's factors in memory for good (issue 20)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.lock = threading.RLock()
        # resolved path -> (file key, PreparedLora), the one used last at the end
        self._prepared: collections.OrderedDict[str, tuple[tuple, object]] = collections.OrderedDict()
        self.active: tuple[LoraEntry, ...] = ()
        self.report = None  # the ApplyReport of the active list
        self._applied: list = []  # (PreparedLora, strength) now on the layers: a changed file is applied again
        self._pinned: frozenset = frozenset()  # the paths of the list being activated: all of it stays prepared
        self._depth = 0

    def prepared(self, entry: LoraEntry):
        """The `PreparedLora` of ``entry``'s file as it is on disk now (read again only when it changed)."""
        from ..lora import prepare_lora

        try:
            key = file_key(entry.path)
        except OSError:
            raise LoadError(f"{entry.path}: LoRA file not found (moved or deleted since it was chosen).") from None
        with self.lock:
            hit = self._prepared.get(entry.path)
            if hit is not None and hit[0] == key:
                self._prepared.move_to_end(entry.path)
                return hit[1]
            prepared = prepare_lora(entry.path, self.transformer)
            prepared.report = replace(prepared.report, hash=file_hash(entry.path))
            self._prepared[entry.path] = (key, prepared)
            self._prepared.move_to_end(entry.path)
            self._evict(entry.path)
            return prepared

    def _evict(self, new: str) -> None:
        """Forget the files used longest ago beyond `MAX_PREPARED`, never ``new`` (just prepared) nor one now on the
        layers (its object decides whether the active list changed); a view that names a forgotten file prepares
        it again when it runs."""
        active = {id(p) for p, _ in self._applied}
        extra = len(self._prepared) - MAX_PREPARED
        old = [path for path, (_, prepared) in self._prepared.items()
               if id(prepared) not in active and path not in self._pinned and path != new]
        for path in old[:max(extra, 0)]:
            del self._prepared[path]

    def __len__(self) -> int:
        """Prepared files held now."""
        return len(self._prepared)

    def activate(self, entries) -> object:
        """Make exactly ``entries`` active on the transformer's layers; the `ApplyReport`."""
        from ..lora import apply_loras

        entries = tuple(entries)
        with self.lock:
            self._pinned = frozenset(e.path for e in entries)
            try:
                prepared = [(self.prepared(e), e.strength) for e in entries]
            finally:
                self._pinned = frozenset()
            same = len(prepared) == len(self._applied) and all(
                p is q and s == t for (p, s), (q, t) in zip(prepared, self._applied))
            if not same or self.report is None:
                self.report = apply_loras(self.transformer, prepared, warn_repeats=False)  # check_loras warned
                self.active, self._applied = entries, prepared
            return self.report

    def metadata(self, entries) -> list[dict]:
        """The image-metadata records of ``entries`` (name, strength, format, matched layers, hash)."""
        with self.lock:
            return [replace(self.prepared(e).report, strength=e.strength).metadata() for e in entries]

    def explain(self, exc, dtype, latent):
        """A `NumericError` naming the active LoRA that made a run's latent non-finite (`aura_flow.lora.blame`), or
        None to keep ``exc``: no LoRA active, or the run's input was not finite already. With LoRAs active that do
        not overflow, ``exc``'s message gains a line naming them."""
        import torch

        from ..lora.blame import blame_message, find_overflows

        samples = latent.get("samples") if isinstance(latent, dict) else latent
        with self.lock:
            applied = [(p, s) for p, s in self._applied if s != 0.0]
            if not applied or not isinstance(samples, torch.Tensor) or not bool(torch.isfinite(samples).all()):
                return None
            try:
                found = find_overflows(applied, self.transformer, dtype)
            except (RuntimeError, MemoryError) as err:  # out of memory on the failure path: keep the run's error
                log.warning("could not check the active LoRAs after the NaN run: %s", err)
                return None
        if found:
            return NumericError(blame_message(found))
        names = ", ".join(f"{p.file.name}@{s:g}" for p, s in applied)
        exc.args = (f"{exc.args[0]}. LoRAs were active ({names}); none changes a weight out of bounds, but if this "
                    "persists, lower their strengths or run without them",) + exc.args[1:]
        return None

    @contextlib.contextmanager
    def scope(self, entries):
        """The body runs with ``entries`` active (unless an outer scope of this thread already chose), holding the
        lock so no other run switches them meanwhile."""
        with self.lock:
            if self._depth == 0:
                self.activate(entries)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1


class LoraModelView:
    """A pipeline with its own LoRA list: every attribute is the pipeline's (modules, ``device``, ``encode_prompt``,
    ``decode``...), but ``sample``, ``generate`` and ``velocity`` run with this view's LoRAs active. Never changes
    the pipeline or another view; ``with_loras`` gives a new view."""

    def __init__(self, base, loras: tuple[LoraEntry, ...]):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "loras", tuple(loras))

    def __getattr__(self, name):  # only for what the view itself lacks
        if name == "_base" or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)  # copy/pickle probing a half-built view: no endless lookup of _base
        return getattr(self._base, name)

    def __repr__(self):
        names = ", ".join(f"{Path(e.path).name}@{e.strength:g}" for e in self.loras) or "no LoRAs"
        return f"<AuraFlow model view ({names}) of {self._base!r}>"

    @property
    def base(self):
        """The pipeline whose modules this view shares."""
        return self._base

    def lora_scope(self, loras=None):
        return self._base.lora_scope(self.loras if loras is None else loras)

    def with_loras(self, loras) -> "LoraModelView":
        return self._base.with_loras(loras)

    def lora_metadata(self) -> list[dict]:
        return self._base.lora_metadata(self.loras)

    def run_record(self, plan, loras=None) -> dict:
        return self._base.run_record(plan, self.loras if loras is None else loras)

    def velocity(self, *args, **kwargs):
        with self.lora_scope():
            return self._base.velocity(*args, **kwargs)

    def sample(self, *args, **kwargs):
        with self.lora_scope():
            return self._base.sample(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.lora_scope():
            return self._base.generate(*args, **kwargs)


__all__ = ["LoraEntry", "LoraState", "LoraModelView", "check_loras", "check_strength"]
