"""A job file read streaming into checked `Job`s: JSONL, CSV or plain text, with ``--seeds`` / ``--grid`` expansion.

- `read_jobs(path, defaults=..., seeds=..., grid=..., remote=..., accepts_sets=..., check_lora_files=...)`: a
  generator of `Job`; the file is read one line at a time (a million lines cost no memory beyond one small entry
  per line that has no seed, see below), every job checked with the checks of ``generate`` / ``remote``.
- `parse_grid(["steps=10,20", ...])`: ``--grid`` flags into ``[(key, [values]), ...]``.
- `JobFileError`: a `ParameterError` whose message names the file, the line and the key
  (``jobs.jsonl line 5: steps=500 is out of range; allowed: 1..100``).

Formats, by extension: ``.jsonl`` / ``.json``: one JSON object a line; ``.csv``: a header row of key names, one job
a row (``loras`` as a JSON string, an empty cell leaves the key out); anything else: plain text, one prompt a line.
Blank lines and lines starting with ``#`` are skipped in JSONL and text. Keys: the generation parameters
(`GENERATION_KEYS`), ``loras`` (``[[path, strength], ...]``, paths as the command line takes them), ``name`` (the
files' name stem) and, for a backend that accepts them (comfyui), ``NODE.INPUT`` workflow inputs. Text keys
(prompt, negative_prompt, sampler, scheduler, output_format, name) are taken as text in CSV cells and grid values;
other values are parsed as JSON when they parse, else kept as text (and refused by the check that follows).

Seeds: a job keeps its line's seed (or the defaults'). A line without one gets a seed that is fixed and the same on
every rerun: the first 8 bytes of sha256 over the line's parameters without the seed (canonical JSON, LoRAs and
workflow inputs included, before ``--grid``, so every cell of a grid shares it) and the count of identical lines
before it in the file (so duplicate lines draw different images), modulo 2**53. ``--seeds N`` runs each job with
that seed, then +1, +2 ... (modulo 2**64). Every seed is written into the manifest.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import stat
import unicodedata
from pathlib import Path

from ..errors import LoadError, ParameterError, shown
from ..params import MAX_SEED, check_seed, validate_generation
from ..prompts import check_prompt
from .model import GENERATION_KEYS, Job

MAX_LINE_BYTES = 1 << 20  # one line of a job file
MAX_SEEDS = 10000  # --seeds
MAX_GRID = 10000  # jobs one line's --grid makes
MAX_JOBS = 10_000_000  # jobs in one file, after expansion
MAX_NAME = 120  # characters of a ``name``
MAX_NAME_BYTES = 200  # its bytes in UTF-8: the file name adds up to ~45 (index, seed, counter, extension) of 255
_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10))})
MAX_LORAS = 16  # LoRAs of one job
TEXT_KEYS = frozenset({"prompt", "negative_prompt", "sampler", "scheduler", "output_format", "name"})
KNOWN_KEYS = GENERATION_KEYS + ("loras", "name")
_PROMPTS = ("prompt", "negative_prompt")
_PER_LINE = frozenset(_PROMPTS + ("seed",))
SEED_SPACE = 2**53  # derived seeds: exact in a JavaScript number, as the random ones of check_seed


class JobFileError(ParameterError):
    """A job file's line is bad; the message names the file, the line and the key."""


def job_format(path) -> str:
    suffix = Path(path).suffix.lower()
    return "jsonl" if suffix in (".jsonl", ".json") else "csv" if suffix == ".csv" else "text"


def _lines(path, label):
    """(line number, text) of the file (or binary stream), one line at a time, each at most MAX_LINE_BYTES, decoded
    as UTF-8."""
    try:
        if not hasattr(path, "readline") and os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode) \
                and not os.path.isdir(path):  # a FIFO would block, a device never end; both are read twice
            raise JobFileError(f"{label}: not a regular file (a pipe or a device); the jobs are read twice (checked, "
                               "then run), so write them into a file and give that")
        fh = path if hasattr(path, "readline") else open(path, "rb")
    except OSError as exc:
        raise JobFileError(f"{label}: cannot read the job file ({exc.strerror or exc})") from None
    with fh:
        n = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise JobFileError(f"{label} line {n}: longer than {MAX_LINE_BYTES:,} bytes; split it or shorten it")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise JobFileError(f"{label} line {n}: not UTF-8 text (byte {exc.start + 1}); save the file as "
                                   "UTF-8") from None
            if n == 1:
                text = text.lstrip("\ufeff")
            yield n, text.rstrip("\r\n")


def _skipped(text: str) -> bool:
    stripped = text.strip()
    return not stripped or stripped.startswith("#")


def _value(key: str, text: str):
    """A CSV cell or grid value: text for the text keys, else JSON when it parses, else the text itself."""
    if key in TEXT_KEYS:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def raw_lines(path, label=None, fmt=None):
    """(line number, {key: value}) of every job line of the file, as written (nothing checked but the format).
    ``path`` may be a binary stream (``io.BytesIO``), then give ``label`` and ``fmt`` (jsonl, csv or text)."""
    label = label or os.fspath(path)
    fmt = fmt or job_format(path)
    if fmt == "jsonl":
        for n, text in _lines(path, label):
            if _skipped(text):
                continue
            try:
                obj = json.loads(text, object_pairs_hook=_no_repeated_keys)
            except JobFileError as exc:
                raise JobFileError(f"{label} line {n}: {exc}") from None
            except (ValueError, RecursionError) as exc:  # also a number over 4300 digits, nesting too deep
                where = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else \
                    "nested too deep" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
                raise JobFileError(f"{label} line {n}: not valid JSON ({where}); write one JSON object a line") \
                    from None
            if not isinstance(obj, dict):
                raise JobFileError(f"{label} line {n}: a JSON {type(obj).__name__}, not an object; write one object "
                                   'a line, e.g. {"prompt": "a fox"}')
            yield n, obj
    elif fmt == "text":
        for n, text in _lines(path, label):
            if not _skipped(text):
                yield n, {"prompt": text}
    else:
        header = None
        for n, text in _lines(path, label):
            try:
                cells = next(csv.reader(io.StringIO(text)), [])
            except csv.Error as exc:
                raise JobFileError(f"{label} line {n}: bad CSV ({exc})") from None
            if header is None:
                header = [c.strip() for c in cells]
                if not any(header):
                    raise JobFileError(f"{label} line {n}: the first line must name the columns, e.g. prompt,seed")
                twice = sorted({c for c in header if header.count(c) > 1})
                if twice:
                    raise JobFileError(f"{label} line {n}: the column {shown(twice[0])} is named twice; name each "
                                       "column once")
                continue
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                raise JobFileError(f"{label} line {n}: {len(cells)} cells but the header names {len(header)} "
                                   "columns; quote cells that hold commas")
            yield n, {k: _value(k, v) for k, v in zip(header, cells) if v != ""}


def _no_repeated_keys(pairs):
    """A JSON object's pairs as a dict; a key given twice (which would silently keep the last) is refused."""
    obj = {}
    for key, value in pairs:  # linear: a 1 MiB line may hold ~100,000 keys
        if key in obj:
            raise JobFileError(f"the key {shown(key)} is given twice in one object; give each key once")
        obj[key] = value
    return obj


def _said(text) -> str:
    """A flag's value in a message: as typed when short, else cut (`shown`)."""
    text = str(text)
    return text if len(text) <= 60 and text.isprintable() else shown(text)


def parse_grid(values) -> list:
    """``--grid KEY=V1,V2,...`` flags into ``[(KEY, [v1, v2, ...]), ...]`` (values parsed as in CSV cells)."""
    out = []
    for text in values or ():
        key, sep, rest = str(text).partition("=")
        key = key.strip()
        if not sep or not key or not rest:
            raise ParameterError(f"--grid {_said(text)}: write KEY=V1,V2,..., e.g. --grid steps=10,20,30")
        if any(k == key for k, _ in out):
            raise ParameterError(f"--grid {_said(text)}: {_said(key)} is given twice; list all its values in one --grid")
        out.append((key, [_value(key, v) for v in next(csv.reader([rest]))]))
    return out


def grid_size(grid) -> int:
    size = 1
    for key, values in grid:
        if not values:
            raise ParameterError(f"--grid {key}: no values; write {key}=V1,V2,...")
        size *= len(values)
        if size > MAX_GRID:
            raise ParameterError(f"--grid makes over {MAX_GRID:,} jobs a line; use fewer values")
    return size


def check_name(value) -> str:
    """A ``name``: the start of file names in any file system (the seed, index and extension follow it)."""
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(f"name={shown(value)} is not a file name; give text such as \"fox_01\"")
    # separators, ':' (a drive, an NTFS stream), '*?"<>|' (refused on Windows), control and invisible formatting
    # characters (a right-to-left override disguises a name), lone surrogates (not encodable)
    bad = [c for c in value if c in '/\\:*?"<>|' or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]
    if bad or value in (".", "..") or len(value) > MAX_NAME or len(value.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        raise ParameterError(f"name={shown(value)} cannot name a file; use at most {MAX_NAME} characters "
                             f"({MAX_NAME_BYTES} bytes in UTF-8) without / \\ : * ? \" < > |, control or formatting "
                             "characters")
    if value.split(".")[0].strip().upper() in _RESERVED or value[-1] in ". ":
        raise ParameterError(f"name={shown(value)} cannot name a file on Windows (a reserved device name, or a name "
                             "ending in '.' or a space); e.g. add a letter: \"my_" + value.strip(". ") + '"')
    return value


def check_lora_list(value) -> tuple:
    """``[[path, strength], ...]`` -> ``((path, strength), ...)``, strengths checked (not the files)."""
    from ..pipeline.loras import check_strength

    if not isinstance(value, (list, tuple)) or len(value) > MAX_LORAS:
        raise ParameterError(f"loras={shown(value)} is not a list of [path, strength] pairs (at most {MAX_LORAS})")
    out = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str) or not item[0]:
            raise ParameterError(f"loras: each item is [path, strength], got {shown(item)}")
        out.append((item[0], check_strength(item[1], Path(item[0]).name)))
    return tuple(out)


class _Checker:
    """The checks of one read: keys, parameters (with the schedule checked once per setting), LoRA files once per
    path."""

    def __init__(self, *, remote, accepts_sets, check_lora_files):
        self.remote, self.accepts_sets, self.check_lora_files = remote, accepts_sets, check_lora_files
        self.schedules: dict = {}
        self.checked: dict = {}  # the parameters but prompts and seed -> their checked values
        self.lora_files: dict = {}

    def split(self, obj: dict):
        params, extra, sets = {}, {}, []
        for key, value in obj.items():
            if key in GENERATION_KEYS:
                params[key] = value
            elif key in ("loras", "name"):
                extra[key] = value
            elif "." in key and self.accepts_sets and all(key.partition(".")[::2]):
                sets.append((key, value))
            else:
                sets_note = "" if self.accepts_sets else "; NODE.INPUT keys need --backend comfyui"
                raise ParameterError(f"{key}: unknown key; known: {', '.join(KNOWN_KEYS)}{sets_note}")
        return params, extra, tuple(sorted(sets))

    def params(self, params: dict) -> dict:
        """validate_generation(params) (and the schedule's checks); what does not change from line to line (all
        but the prompts and the seed) is checked once per distinct setting."""
        rest = tuple(sorted((k, v) for k, v in params.items() if k not in _PER_LINE))
        try:
            hit = self.checked.get(rest)
        except TypeError:  # an unhashable (bad) value: the full check says what is wrong
            hit, rest = None, None
        if hit is not None:
            return {**hit, "seed": check_seed(params.get("seed")),
                    **{k: check_prompt(k, params.get(k, ""), weights=not self.remote) for k in _PROMPTS}}
        out = validate_generation(params, remote=self.remote)
        if rest is not None:
            if len(self.checked) > 4096:
                self.checked.clear()
            self.checked[rest] = out
        if not self.remote:
            setting = (out["steps"], out["scheduler"], out["shift"], out["sampler"])
            if setting not in self.schedules:
                from ..plan import plan_generation

                if len(self.schedules) > 4096:
                    self.schedules.clear()
                plan_generation(out, speed=None)  # the schedule's own checks, once per setting
                self.schedules[setting] = True
        return out

    def loras(self, value) -> tuple:
        loras = check_lora_list(value)
        if self.check_lora_files:
            from ..pipeline.loras import check_loras

            for path, strength in loras:
                if path not in self.lora_files:
                    try:
                        check_loras([(path, strength)])
                        self.lora_files[path] = None
                    except (ParameterError, LoadError) as exc:
                        self.lora_files[path] = f"loras: {exc}"
                if self.lora_files[path]:
                    raise ParameterError(self.lora_files[path])
        return loras


def _derived_seed(params: dict, loras, sets, count: int) -> int:
    canon = json.dumps({"params": {k: params[k] for k in sorted(params) if k != "seed"},
                        "loras": [[p, s] for p, s in loras], "sets": [[k, v] for k, v in sets]},
                       sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(f"{canon}\n{count}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % SEED_SPACE


def read_jobs(path, *, defaults=None, seeds=None, grid=(), remote: bool = False, accepts_sets: bool = False,
              check_lora_files: bool = True, label=None, fmt=None):
    """Yield every `Job` of the job file at ``path``, checked, in file order (a generator: streaming).

    defaults: values for keys a line leaves out (the generation flags; ``loras`` too). seeds: N seeds per job.
    grid: ``[(key, [values]), ...]`` (`parse_grid`). remote: the hosted API's ranges. accepts_sets: ``NODE.INPUT``
    keys allowed (comfyui). check_lora_files: read each LoRA file's header once (a local run).
    label, fmt: the name said in messages and the format (default: the path and its extension); a binary stream
    (``io.BytesIO(text.encode())``) in place of ``path`` needs both. Raises `JobFileError` naming the file, the line
    and the key.
    """
    label = label or os.fspath(path)
    n_seeds = 1 if seeds is None else seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or not 1 <= n_seeds <= MAX_SEEDS:
        raise ParameterError(f"seeds={shown(seeds)} is out of range; allowed: 1..{MAX_SEEDS}")
    grid = [(k, list(v)) for k, v in grid or ()]
    per_line = grid_size(grid) * n_seeds
    checker = _Checker(remote=remote, accepts_sets=accepts_sets, check_lora_files=check_lora_files)
    defaults = dict(defaults or {})
    for key, _ in grid:  # a grid key must be a key a line may hold
        try:
            checker.split({key: None})
        except ParameterError as exc:
            raise ParameterError(f"--grid {exc}") from None
    base_params, base_extra, base_sets = checker.split(defaults)
    seen: dict = {}  # sha256[:8] of an unseeded line's parameters -> lines like it so far
    total = 0
    for n, obj in raw_lines(path, label, fmt):
        try:
            params, extra, sets = checker.split(obj)
            merged = {**base_params, **params}
            merged_extra = {**base_extra, **extra}
            line_sets = tuple(sorted({**dict(base_sets), **dict(sets)}.items()))
            name = check_name(merged_extra["name"]) if merged_extra.get("name") is not None else None
            loras = checker.loras(merged_extra.get("loras") or [])
            if merged.get("seed") is None:
                probe = checker.params({**merged, "seed": 0})
                h = _derived_seed(probe, loras, line_sets, 0)
                count = seen.get(h, 0)
                seen[h] = count + 1
                line_seed = h if count == 0 else _derived_seed(probe, loras, line_sets, count)
            else:
                line_seed = probe = None
        except ParameterError as exc:
            raise JobFileError(f"{label} line {n}: {exc}") from None
        total += per_line
        if total > MAX_JOBS:
            raise JobFileError(f"{label} line {n}: the file makes over {MAX_JOBS:,} jobs; split it")
        index = 0
        cells = itertools.product(*[[(k, v) for v in values] for k, values in grid]) if grid else [()]
        for cell in cells:
            try:
                c_params, c_extra, c_sets = checker.split(dict(cell))
                p = {**merged, **c_params}
                cell_loras = checker.loras(c_extra["loras"]) if "loras" in c_extra else loras
                cell_name = check_name(c_extra["name"]) if "name" in c_extra else name
                cell_sets = tuple(sorted({**dict(line_sets), **dict(c_sets)}.items())) if c_sets else line_sets
                first = line_seed if p.get("seed") is None else check_seed(p["seed"])
                checked = None
                for i in range(n_seeds):
                    seed = (first + i) % (MAX_SEED + 1)
                    if checked is None and probe is not None and not c_params:
                        checked = {**probe, "seed": seed}  # this line's parameters, checked already
                    checked = checker.params({**p, "seed": seed}) if checked is None else {**checked, "seed": seed}
                    yield Job(line=n, index=index, params=checked, loras=cell_loras, name=cell_name,
                              sets=cell_sets, expands=per_line > 1)
                    index += 1
            except ParameterError as exc:
                where = f" (--grid {', '.join(f'{k}={shown(v)}' for k, v in cell)})" if cell else ""
                raise JobFileError(f"{label} line {n}{where}: {exc}") from None


__all__ = ["JobFileError", "read_jobs", "raw_lines", "parse_grid", "job_format", "check_name", "MAX_SEEDS",
           "MAX_GRID", "MAX_JOBS", "MAX_LINE_BYTES"]
