"""Headless runs: queue an API-format workflow on a running ComfyUI, follow it to the end and download the images it
made (``python -m aura_flow queue``, aura_flow/cli/queue.py, is its command line).

Standard library only. It talks to ComfyUI's HTTP API (`client`): ``POST /prompt`` (with a client id), polling of
``GET /history/<prompt_id>`` until the prompt has finished, and ``GET /view`` for each output image. A prompt that
ComfyUI rejects (HTTP 400 with ``error`` and ``node_errors``) or that fails while running (an ``execution_error``
in the history's status messages) raises `QueueError` with ComfyUI's own error text; a server that cannot be
reached, answers something else or does not finish in time raises `ServerUnavailable`. Workflows are read and
edited in `workflow`; ComfyUI's answers are read defensively in `answers`: files land only inside the output
folder, never over another file (two outputs of one name give ``name.png`` and ``name_1.png``).
"""
from __future__ import annotations

import logging
import math
import urllib.parse
from pathlib import Path

from ..errors import ParameterError, shown
from ..images import check_output_folder
from .answers import OUTPUT_KEYS, QueueError, ServerUnavailable, format_execution_error, format_validation_error
from .answers import output_items
from .client import DEFAULT_SERVER, DEFAULT_TIMEOUT, ComfyClient
from .workflow import apply_sets, check_workflow, find_node, load_workflow, parse_value

log = logging.getLogger(__name__)


def check_server(server) -> str:
    """ComfyUI's address as ``http(s)://host:port``; a scheme given must be http or https."""
    if not isinstance(server, str) or not server.strip() or any(c.isspace() or ord(c) < 32 for c in server.strip()):
        raise ParameterError(f"server={shown(server)}: give ComfyUI's address, such as {DEFAULT_SERVER}")
    server = server.strip()
    if "://" not in server:
        server = "http://" + server
    try:  # an address urllib or the socket layer cannot take (a bad [IPv6], port, host name or character)
        parts = urllib.parse.urlsplit(server)
        _port = parts.port
        (parts.hostname or "").encode("idna")
        server.replace(parts.hostname or "", "").encode("ascii")
    except ValueError:  # UnicodeError is one
        raise ParameterError(f"server={shown(server)}: not an address that can be reached; give ComfyUI's address, "
                             f"such as {DEFAULT_SERVER}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ParameterError(f"server={shown(server)}: give ComfyUI's http:// or https:// address, such as "
                             f"{DEFAULT_SERVER}")
    return server


def check_timeout(timeout) -> float:
    """Seconds to wait for the prompt: a finite number >= 0, 0 for no limit."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or \
            timeout < 0:
        raise ParameterError(f"timeout={shown(timeout)}: give the seconds to wait for the prompt, a finite number of "
                             "0 or more (0 waits without limit)")
    return float(timeout)


def run_workflow(prompt: dict, server: str = DEFAULT_SERVER, *, sets=(), out_dir="out",
                 timeout: float = DEFAULT_TIMEOUT, poll: float = 0.5, check_every: float = 5.0) -> list[Path]:
    """Queue ``prompt`` on the ComfyUI at ``server``, wait for it and download its images into ``out_dir``.

    Everything is checked before the prompt is queued (the workflow, the edits, the address, the timeout)."""
    prompt = check_workflow(apply_sets(check_workflow(prompt), sets))  # a --set may add a link
    client = ComfyClient(check_server(server))
    timeout = check_timeout(timeout)
    check_output_folder(out_dir, "out_dir")
    prompt_id = client.submit(prompt)
    log.info("queued prompt %s on %s", prompt_id, client.server)
    try:
        outputs = client.wait(prompt_id, timeout=timeout, poll=poll, check_every=check_every)
    except KeyboardInterrupt:
        client.cancel(prompt_id)
        raise
    paths = [path for path in (client.download(item, out_dir) for _, item in output_items(outputs)) if path]
    if not paths:
        log.warning("prompt %s finished without output files (does the workflow end in a Save Image node?)",
                    prompt_id)
    return paths


__all__ = ["run_workflow", "ComfyClient", "QueueError", "ServerUnavailable", "load_workflow", "check_workflow",
           "apply_sets", "find_node", "parse_value", "output_items", "format_validation_error",
           "format_execution_error", "check_server", "check_timeout", "DEFAULT_SERVER", "DEFAULT_TIMEOUT",
           "OUTPUT_KEYS"]
