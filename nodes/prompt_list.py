"""AuraFlow Prompt List: a job list (typed in the node, or a file of ComfyUI's input folder) as list outputs, so
the graph downstream runs once per job, the way ComfyUI runs a node fed lists.

The lines are read by the batch command's reader (`aura_flow.batch.jobs.read_jobs`): the same formats, keys,
``seeds`` / ``grid`` expansion, checks and messages, said with this node's input names. Which format:

- ``format`` auto, for the ``text`` widget: CSV when the first line is a header naming only job keys, ``prompt``
  among them (``prompt,seed,steps``); else JSONL when the first line that is not blank or a ``#`` comment starts
  with ``{``; else plain text, one prompt a line. For a ``file``: by its extension, as the batch command
  (``.jsonl`` JSONL, ``.csv`` CSV, ``.txt`` text). ``text`` / ``jsonl`` / ``csv`` force one.
- The widgets below ``grid`` give every key a line leaves out. ``seed``: lines without their own seed all take
  the widget's (as one KSampler's seed shared by several prompts, so they compare fairly); its control after
  generate draws a new one for the next queue (``fixed`` redraws the same images). ``seeds`` N runs each job with
  seed, seed+1, ...
- Only keys the node has an output for change anything: a line's ``loras``, or a ``number_of_images``,
  ``output_format`` or ``output_quality`` other than the defaults, is an error naming the line (set those on the
  nodes that take them); ``name`` is accepted and unused (AuraFlow Save Image names the files).
- At most `MAX_JOBS` jobs and `MAX_TEXT_BYTES` of text or file: a longer run belongs to
  ``python -m aura_flow batch``, which resumes.
"""
from __future__ import annotations

import hashlib
import io
import os
import re

from ..aura_flow import params as P
from ..aura_flow.errors import ParameterError, shown
from .comfyui import folders
from .widgets import generation_inputs

MAX_JOBS = 1000
MAX_TEXT_BYTES = 8 << 20
FILE_EXTENSIONS = (".txt", ".jsonl", ".csv")
NO_FILE = "(use text)"
FORMATS = ("auto", "text", "jsonl", "csv")
LIST_KEYS = ("prompt", "negative_prompt", "seed", "steps", "cfg", "width", "height", "sampler", "scheduler", "shift")
DEFAULT_WIDGETS = ("negative_prompt", "seed", "steps", "cfg", "shift", "width", "height", "sampler", "scheduler")
# keys of a job line that this node has no output for: a value other than the default would be lost
NO_OUTPUT = {"number_of_images": "the batch size of AuraFlow Generate (number_of_images)",
             "output_format": "AuraFlow Generate's output_format or AuraFlow Save Image's format",
             "output_quality": "AuraFlow Generate's output_quality or AuraFlow Save Image's quality"}
BATCH = "python -m aura_flow batch"
# the batch command's words (its flags) -> this node's inputs
_CLI_WORDS = ((re.compile(r"; NODE\.INPUT keys need --backend comfyui"), ""),
              (re.compile(r"e\.g\. --grid "), "e.g. "),
              (re.compile(r"in one --grid\b"), "on one grid line"),
              (re.compile(r"--grid\b"), "grid"))


def in_node_words(message: str) -> str:
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return message


def _types_now() -> tuple:
    """The output types, the sampler and scheduler ones as the very lists AuraFlow Generate's and AuraFlow Sampler's
    combos hold (ComfyUI connects an output typed as a list of names to a combo input with the same list)."""
    gen = generation_inputs(remote=False)["required"]  # registers ComfyUI's own sampler names first
    return ("STRING", "STRING", "INT", "INT", "FLOAT", "INT", "INT", list(gen["sampler"][0]),
            list(gen["scheduler"][0]), "FLOAT", "INT")


class _LiveTypes(type):
    """``RETURN_TYPES`` read on the class (as ComfyUI reads it) is computed then: the sampler list grows when ComfyUI
    or another pack registers samplers after this pack loads."""

    @property
    def RETURN_TYPES(cls):
        return _types_now()


def detect_format(text: str) -> str:
    """The ``auto`` format of typed text (see the module docstring)."""
    import csv

    from ..aura_flow.batch.jobs import KNOWN_KEYS  # the batch reader loads when the node first runs

    lines = io.StringIO(text)
    first = lines.readline().lstrip("\ufeff")
    try:
        header = [c.strip() for c in next(csv.reader([first]), [])] if first.strip() else []
    except csv.Error:  # not CSV; the reader says what is wrong if csv is forced
        header = []
    if "prompt" in header and all(c in KNOWN_KEYS for c in header):
        return "csv"
    line = first
    while line:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return "jsonl" if stripped.startswith("{") else "text"
        line = lines.readline()
    return "text"


def _check_choice(name, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(f"{name}={shown(value)} is not one of {', '.join(choices)}")
    return value


class AuraFlowPromptList(metaclass=_LiveTypes):
    @classmethod
    def INPUT_TYPES(cls):
        gen = generation_inputs(remote=False)["required"]

        def default(name):
            kind, opts = gen[name]
            return (kind, {**opts, "tooltip": f"For jobs whose line leaves out {name}: {opts['tooltip']}"})

        files = folders.input_files(FILE_EXTENSIONS)
        return {"required": {
            "text": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": False,
                                "tooltip": "The jobs, one a line: plain prompts, JSONL objects "
                                           "({\"prompt\": \"a fox\", \"seed\": 7, \"steps\": 30}) or CSV with a "
                                           "header row (prompt,seed,...). Blank lines and lines starting with # "
                                           f"are skipped. Used when file is {NO_FILE}."}),
            "file": ([NO_FILE] + files, {"default": NO_FILE,
                                         "tooltip": "A job file (.txt, .jsonl, .csv) from ComfyUI's input folder, "
                                                    f"read instead of text; {NO_FILE}: the text above. Press R to "
                                                    "refresh the list."}),
            "format": (list(FORMATS), {"default": "auto",
                                       "tooltip": "auto: a file by its extension; text by its first line (a CSV "
                                                  "header naming prompt, or a JSON object), else one prompt a "
                                                  "line. text, jsonl, csv: force one."}),
            "seeds": ("INT", {"default": 1, "min": 1, "max": MAX_JOBS,
                              "tooltip": "Runs of every job: 1 = once; N = with seed, seed+1, ... seed+N-1."}),
            "grid": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": False,
                                "tooltip": "Optional X/Y sweep, one KEY=V1,V2,... a line (steps=20,30 then "
                                           "cfg=3.5,5): every job runs with every combination."}),
            **{name: default(name) for name in DEFAULT_WIDGETS},
        }}

    RETURN_TYPES = _types_now()  # what an instance sees; the class's own is computed when read (_LiveTypes)
    RETURN_NAMES = LIST_KEYS + ("count",)
    OUTPUT_IS_LIST = (True,) * len(LIST_KEYS) + (False,)
    OUTPUT_TOOLTIPS = tuple(f"The jobs' {key}s, one per job: the nodes it feeds run once per job." for key in
                            LIST_KEYS) + ("How many jobs the list holds (one number).",)
    FUNCTION = "jobs"
    CATEGORY = "AuraFlow/batch"
    DESCRIPTION = ("Turns a list of prompts (typed, or a .txt/.jsonl/.csv file) into list outputs, so the nodes they "
                   "feed run once per job, with seeds and X/Y grid expansion.")
    SEARCH_ALIASES = ["aura flow", "prompt list", "batch", "prompts from file", "xy grid", "jsonl", "csv"]

    @classmethod
    def IS_CHANGED(cls, file=NO_FILE, **_inputs):
        """A file's content hash, so ComfyUI runs the node again when the file changes (typed text is an input)."""
        if not isinstance(file, str) or file == NO_FILE:
            return ""
        try:
            with open(folders.input_file(file, "file"), "rb") as fh:
                return hashlib.sha256(fh.read(MAX_TEXT_BYTES + 1)).hexdigest()
        except (OSError, ParameterError) as exc:
            return str(exc)  # the run says what is wrong

    def jobs(self, text="", file=NO_FILE, format="auto", seeds=1, grid="", **defaults):
        try:
            return self._jobs(text, file, format, seeds, grid, defaults)
        except ParameterError as exc:
            exc.args = (in_node_words(str(exc)),) + exc.args[1:]
            raise

    def _jobs(self, text, file, fmt, seeds, grid, defaults):
        from ..aura_flow.batch.jobs import parse_grid, read_jobs

        _check_choice("format", fmt, FORMATS)
        if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_JOBS:
            raise ParameterError(f"seeds={shown(seeds)} is out of range; allowed: 1..{MAX_JOBS}")
        if not isinstance(grid, str) or len(grid) > MAX_TEXT_BYTES:
            raise ParameterError(f"grid={shown(grid)} is not text of KEY=V1,V2,... lines")
        cells = parse_grid([line for line in grid.splitlines() if line.strip()])
        runs = seeds
        for key, values in cells:
            runs *= max(len(values), 1)
            if runs > MAX_JOBS:
                raise ParameterError(f"seeds={seeds} and grid make over {MAX_JOBS:,} jobs from each line; this node "
                                     f"runs at most {MAX_JOBS:,}: use fewer, or {BATCH}")
        unknown = sorted(set(defaults) - set(DEFAULT_WIDGETS))
        if unknown:
            raise ParameterError(f"{', '.join(unknown)}: not an input of AuraFlow Prompt List")
        base = {**{k: P.DEFAULTS[k] for k in NO_OUTPUT}, **defaults}
        P.validate_generation({**base, "prompt": ""})  # the widgets themselves, before any line
        source, label, fmt = self._source(text, file, fmt)
        out = {key: [] for key in LIST_KEYS}
        for job in read_jobs(source, defaults=base, seeds=seeds, grid=cells, check_lora_files=False, label=label,
                             fmt=fmt):
            if len(out["prompt"]) == MAX_JOBS:
                raise ParameterError(f"{label} line {job.line}: the list makes over {MAX_JOBS:,} jobs (lines x seeds "
                                     f"x grid values); this node runs at most {MAX_JOBS:,}: split it, or run it "
                                     f"with {BATCH}, which resumes")
            self._only_outputs(job, base, label)
            for key in LIST_KEYS:
                out[key].append(job.params[key])
        if not out["prompt"]:
            raise ParameterError(f"{label}: no jobs; write one prompt a line (blank lines and lines starting with # "
                                 "are skipped)")
        for key, kind in (("seed", int), ("steps", int), ("width", int), ("height", int), ("cfg", float),
                          ("shift", float)):
            out[key] = [kind(v) for v in out[key]]
        return tuple(out[key] for key in LIST_KEYS) + (len(out["prompt"]),)

    @staticmethod
    def _source(text, file, fmt):
        """(binary stream or path, the name said in messages, format) of the chosen text or file."""
        if not isinstance(file, str) or file == NO_FILE:
            if file not in (None, NO_FILE, ""):
                raise ParameterError(f"file={shown(file)} is not a file name; pick one from the list or {NO_FILE}")
            if not isinstance(text, str):
                raise ParameterError(f"text={shown(text)} is not text; write one prompt a line")
            if len(text) > MAX_TEXT_BYTES:
                raise ParameterError(f"text is {len(text):,} characters long; at most {MAX_TEXT_BYTES:,}: put the "
                                     f"jobs in a file and run it with {BATCH}")
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ParameterError(f"text holds a character that is not text at position {exc.start + 1}; "
                                     "type or paste that line again") from None
            return io.BytesIO(data), "text", (detect_format(text) if fmt == "auto" else fmt)
        if not file.lower().endswith(FILE_EXTENSIONS):
            raise ParameterError(f"file={shown(file)}: not a job file; pick a .txt, .jsonl or .csv file")
        path = folders.input_file(file, "file")
        size = os.path.getsize(path)
        if size > MAX_TEXT_BYTES:
            raise ParameterError(f"file={shown(file)} is {size:,} bytes; this node reads at most {MAX_TEXT_BYTES:,}: "
                                 f"run it with {BATCH}, which resumes")
        from ..aura_flow.batch.jobs import job_format

        return path, file, (job_format(path) if fmt == "auto" else fmt)

    @staticmethod
    def _only_outputs(job, base, label):
        """A job whose line sets what no output carries is refused, rather than run without it."""
        where = f"{label} line {job.line}"
        if job.loras:
            raise ParameterError(f"{where}: loras: AuraFlow Prompt List has no LoRA output; apply them with AuraFlow "
                                 f"LoRA Loader, or run the file with {BATCH}")
        for key, place in NO_OUTPUT.items():
            if job.params[key] != base[key]:
                raise ParameterError(f"{where}: {key}={shown(job.params[key])}: AuraFlow Prompt List has no {key} "
                                     f"output; set it as {place}, or leave it out of the line")


__all__ = ["AuraFlowPromptList", "detect_format", "MAX_JOBS", "MAX_TEXT_BYTES", "NO_FILE"]
