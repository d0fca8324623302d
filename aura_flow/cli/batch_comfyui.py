"""The ``--backend comfyui`` flags of the ``batch`` command (aura_flow/cli/batch.py registers them)."""
from __future__ import annotations

from ..headless import DEFAULT_TIMEOUT

COMFYUI_DESTS = ("server", "workflow", "per_server", "timeout")


def comfyui_flags(p) -> None:
    from ..batch.comfyui import DEFAULT_PER_SERVER, DEFAULT_WORKFLOW

    g = p.add_argument_group("--backend comfyui", "running ComfyUI servers, one per GPU or machine; the jobs go to "
                                                  "whichever server frees first")
    g.add_argument("--server", action="append", default=None, metavar="URL",
                   help="a ComfyUI address, e.g. 127.0.0.1:8188 (repeat it for every server)")
    g.add_argument("--workflow", default=None, metavar="FILE",
                   help="API-format workflow the jobs fill (as queue --set does; NODE.INPUT keys too); default the "
                        f"bundled {DEFAULT_WORKFLOW.parent.name}/{DEFAULT_WORKFLOW.name}")
    g.add_argument("--per-server", type=int, default=DEFAULT_PER_SERVER, metavar="K",
                   help="jobs in flight on each server (2 keeps a GPU busy between jobs)")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="seconds a job may take on its server before the server counts as stuck and its jobs go "
                        "to the others (0: no limit)")
