"""``python -m aura_flow queue WORKFLOW.json --server URL``: run an API-format workflow on a running ComfyUI and
download the images it made (aura_flow/headless/ does the work).

Exit codes: 0 done, 1 ComfyUI rejected or failed the prompt, 2 bad arguments or workflow file, 3 ComfyUI could
not be reached or the prompt did not finish within ``--timeout``, 130 interrupted (the prompt is then removed
from ComfyUI's queue or interrupted).
"""
from __future__ import annotations

import sys

from ..headless import DEFAULT_SERVER, DEFAULT_TIMEOUT, QueueError, ServerUnavailable, load_workflow, run_workflow


def register(subparsers) -> None:
    from .flags import HelpFormatter

    p = subparsers.add_parser("queue", help="run an API-format workflow on a running ComfyUI and download images",
                              formatter_class=HelpFormatter,
                              description="Queue an API-format workflow on a running ComfyUI, wait for it and "
                                          "download the images it made; prints the paths written.",
                              epilog="exit codes: 0 done; 1 ComfyUI rejected or failed the prompt (its error text "
                                     "on stderr); 2 bad arguments or workflow file; 3 ComfyUI unreachable or "
                                     "--timeout passed; 130 interrupted (the prompt is cancelled)")
    p.add_argument("workflow", help="API-format workflow JSON (the editor's Export (API), or example_workflows/api/*.json)")
    p.add_argument("--server", default=DEFAULT_SERVER, help="ComfyUI address")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="change an input before queueing; NODE is a node id, title or class_type; VALUE is JSON "
                        "when it parses, else text (repeatable): --set 3.seed=5 --set KSampler.steps=20")
    p.add_argument("--out", default="out", help="folder for the downloaded images")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds to wait for the prompt to finish, 0 for no limit")
    p.set_defaults(func=run, parser=p)


def run(args) -> int:
    from ..images import check_output_folder

    prompt = load_workflow(args.workflow)
    check_output_folder(args.out)  # before the prompt is queued: a folder that cannot be written loses nothing
    try:
        paths = run_workflow(prompt, args.server, sets=args.sets, out_dir=args.out, timeout=args.timeout)
    except QueueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except ServerUnavailable as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 3
    for path in paths:
        sys.stdout.write(f"{path}\n")
    return 0
