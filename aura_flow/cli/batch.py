"""``python -m aura_flow batch JOBS --out DIR``: every job of a job file (JSONL, CSV or text), exactly once, resumable.

The generation flags give the defaults for keys a line leaves out. Everything is checked before a model loads; the
manifest ``DIR/manifest.jsonl`` records each job, so the same command run again resumes.
Exit codes: 0 all done, 1 some failed, 2 bad flags or a bad job file, 3 no ComfyUI server answers (comfyui) or no
Ray cluster (ray: before the run, or it died during it), 130 interrupted.

Backends: each has an entry in `BACKEND_FLAGS`: a function adding its flags to the parser (in its own group) and
the flags' dests that become its options (``aura_flow.batch.runner.BACKENDS[name]``'s ``make(**options)``).
"""
from __future__ import annotations

import sys

from ..batch.jobs import MAX_SEEDS
from ..errors import ParameterError
from ..headless import ServerUnavailable
from . import batch_ray
from .batch_comfyui import COMFYUI_DESTS, comfyui_flags
from .batch_hosted import HOSTED_DESTS, hosted_flags
from .flags import (HelpFormatter, add_generation_flags, add_local_flags, add_model_flags, add_speed_flag,
                    check_output_folder, generation_params, in_flag_words, parse_lora_flag)


def _local_flags(p) -> None:
    g = p.add_argument_group("--backend local", "the in-process engine (the model loads once)")
    add_model_flags(g)
    add_speed_flag(g)


# backend name -> (add its flags, the dests handed to its make(**options))
BACKEND_FLAGS = {
    "local": (_local_flags, batch_ray.MODEL_DESTS),
    "comfyui": (comfyui_flags, COMFYUI_DESTS),
    "ray": (batch_ray.add_flags, batch_ray.DESTS),
    "hosted": (hosted_flags, HOSTED_DESTS),
}


def register(sub):
    p = sub.add_parser("batch", help="many images from a job file (JSONL, CSV, text), resumable",
                       description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("jobs", metavar="JOBS", help="job file: .jsonl (one JSON object a line), .csv (a header row of "
                                                "key names) or text (one prompt a line)")
    p.add_argument("--backend", default="local", choices=tuple(BACKEND_FLAGS), help="where the jobs run")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help=f"run every job with N seeds, 1 to {MAX_SEEDS} (its own, then +1, +2 ...)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run the cartesian product of the values (repeatable: X/Y sweeps)")
    p.add_argument("--retry-failed", action="store_true", help="run the jobs that failed before again")
    p.add_argument("--dry-run", action="store_true", help="list what would run, and run nothing")
    add_local_flags(p)
    add_generation_flags(p)
    for action in p._actions:
        if action.dest == "out":
            action.required, action.default = True, None
            action.help = "folder for the images and manifest.jsonl; existing files are never replaced"
    for add, _ in BACKEND_FLAGS.values():
        add(p)
    p.set_defaults(func=run_batch, parser=p)


def _defaults(args) -> dict:
    """The generation flags as the defaults of every job; ``--lora`` flags as its ``loras``."""
    from ..params import validate_generation

    params = generation_params(args)
    validate_generation({**params, "seed": params["seed"] or 0})  # a bad flag is said as a flag, not as line 1
    defaults = dict(params)
    if args.loras:
        defaults["loras"] = [list(parse_lora_flag(v)) for v in args.loras]
    return defaults


def _options(args) -> dict:
    _, dests = BACKEND_FLAGS[args.backend]
    for name, (_, others) in BACKEND_FLAGS.items():
        for dest in set(others) - set(dests):
            if getattr(args, dest) != args.parser.get_default(dest):
                flag = "--" + dest.replace("_", "-")
                raise ParameterError(f"{flag} is a flag of --backend {name}, not of --backend {args.backend}")
    return {dest: getattr(args, dest) for dest in dests}


def run_batch(args) -> int:
    from ..batch.jobs import JobFileError, parse_grid
    from ..batch.runner import run

    check_output_folder(args.out)
    defaults = _defaults(args)
    try:
        grid = parse_grid(args.grid)
    except ParameterError as exc:  # its words are --grid's own (KEY=V1,V2), not flags to reword
        sys.stderr.write(f"error: {exc}\n")
        return 2
    options = _options(args)
    try:
        summary = run(args.jobs, args.out, backend=args.backend, defaults=defaults, seeds=args.seeds, grid=grid,
                      retry_failed=args.retry_failed, dry_run=args.dry_run, stream=sys.stdout, **options)
    except JobFileError as exc:  # in the job file's words (file, line, key), not the flags'
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except ServerUnavailable as exc:  # comfyui: no server answers, ray: no cluster (the jobs not done stay to resume)
        sys.stderr.write(f"error: {in_flag_words(str(exc), args.parser) if args.backend == 'ray' else exc}\n")
        return 3
    if args.dry_run:
        sys.stderr.write(f"would run {summary.to_run} of {summary.total} jobs; skipped {summary.skipped}\n")
        return 0
    for line in summary.lines():
        sys.stderr.write(line + "\n")
    return summary.exit_code
