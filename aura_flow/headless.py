"""Headless runs: queue an API-format workflow on a running ComfyUI, follow it to the end and download the images it
made (``python -m aura_flow queue``, aura_flow/cli/queue.py, is its command line).

Standard library only. It talks to ComfyUI's HTTP API: ``POST /prompt`` (with a client id), polling of
``GET /history/<prompt_id>`` until the prompt has finished, and ``GET /view`` for each output image. A prompt that
ComfyUI rejects (HTTP 400 with ``error`` and ``node_errors``) or that fails while running (an ``execution_error``
in the history's status messages) raises `QueueError` with ComfyUI's own error text; a server that cannot be
reached, answers something else or does not finish in time raises `ServerUnavailable`.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .errors import ParameterError

log = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8188"
DEFAULT_TIMEOUT = 3600.0
OUTPUT_KEYS = ("images", "gifs", "videos", "audio")  # history output lists whose entries name files for /view


class QueueError(RuntimeError):
    """ComfyUI rejected or failed the prompt; the message is ComfyUI's error text, formatted for a terminal."""


class ServerUnavailable(RuntimeError):
    """ComfyUI could not be reached, answered something that is not its API, or did not finish in time."""


# ---------------------------------------------------------------------------------------------------- workflow
def load_workflow(path) -> dict:
    """Read an API-format workflow (``{"id": {"class_type", "inputs"}}``), or ``{"prompt": {...}}`` around one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParameterError(f"{path}: no such workflow file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParameterError(f"{path}: not a JSON workflow ({exc})") from None
    return check_workflow(data, str(path))


def check_workflow(data, where: str = "workflow") -> dict:
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ParameterError(f"{where}: this is the editor format (nodes and links); queue needs the API format. "
                             "Use its API twin (example_workflows/api/<name>.json for the bundled ones), or export it from "
                             "the editor with Export (API).")
    if not isinstance(data, dict) or not data:
        raise ParameterError(f"{where}: expected an API-format workflow, a JSON object of "
                             '{"<node id>": {"class_type": ..., "inputs": {...}}}')
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise ParameterError(f"{where}: node {node_id!r} has no class_type; is this an API-format workflow?")
        if not isinstance(node.get("inputs", {}), dict):
            raise ParameterError(f"{where}: node {node_id} ({node['class_type']}): inputs must be a JSON object")
    return data


def parse_value(text: str):
    """``--set`` values: JSON when they parse (5, 1.5, true, null, "x", [..]), else the text as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _describe(node_id: str, node: dict) -> str:
    title = node.get("_meta", {}).get("title")
    cls = node["class_type"]
    return f"{node_id} ({cls}{', ' + repr(title) if title and title != cls else ''})"


def find_node(prompt: dict, key: str) -> str:
    """The id of the node that ``key`` names: a node id, else a unique ``_meta.title``, else a unique class_type."""
    if key in prompt:
        return key
    for what, match in (("title", lambda n: n.get("_meta", {}).get("title") == key),
                        ("class_type", lambda n: n["class_type"] == key)):
        ids = [node_id for node_id, node in prompt.items() if match(node)]
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            raise ParameterError(f"--set {key}: {len(ids)} nodes have the {what} {key!r} "
                                 f"({', '.join(ids)}); use one of those node ids instead")
    nodes = "; ".join(_describe(i, n) for i, n in prompt.items())
    raise ParameterError(f"--set {key}: no node has that id, title or class_type. Nodes: {nodes}")


def apply_sets(prompt: dict, sets) -> dict:
    """A copy of ``prompt`` with each ``NODE.INPUT=VALUE`` applied; NODE is an id, a title or a class_type."""
    prompt = copy.deepcopy(prompt)
    for item in sets or ():
        target, eq, text = item.partition("=")
        key, dot, name = target.rpartition(".")
        if not eq or not dot or not key or not name:
            raise ParameterError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. --set 3.seed=5 or "
                                 "--set KSampler.steps=20")
        node_id = find_node(prompt, key)
        inputs = prompt[node_id].setdefault("inputs", {})
        if name not in inputs:
            known = ", ".join(sorted(inputs)) or "none"
            raise ParameterError(f"--set {item!r}: node {_describe(node_id, prompt[node_id])} has no input "
                                 f"{name!r}; its inputs: {known}")
        value = parse_value(text)
        if isinstance(inputs[name], list) and not isinstance(value, list):
            log.info("--set %s: replaces the link into node %s input %s with a value", item, node_id, name)
        inputs[name] = value
    return prompt


# ------------------------------------------------------------------------------------------------------ client
def format_validation_error(body: dict) -> str:
    """ComfyUI's 400 answer to POST /prompt (``error`` and ``node_errors``) as lines of text."""
    error = body.get("error")
    if isinstance(error, dict):
        head = error.get("message") or error.get("type") or "invalid prompt"
        details = error.get("details")
        # prompt_outputs_failed_validation repeats the node errors in details; they are listed per node below
        if details and not body.get("node_errors"):
            head = f"{head}: {details}"
    else:
        head = str(error or "invalid prompt")
    lines = [f"ComfyUI rejected the prompt: {head}"]
    for node_id, info in (body.get("node_errors") or {}).items():
        cls = info.get("class_type", "?")
        for err in info.get("errors", []):
            msg = err.get("message", "error")
            det = err.get("details")
            lines.append(f"  node {node_id} ({cls}): {msg}{': ' + str(det) if det else ''}")
    return "\n".join(lines)


def format_execution_error(messages) -> str:
    """The ``execution_error`` / ``execution_interrupted`` status message of a finished history entry as text."""
    for event, data in messages or ():
        if event == "execution_error":
            where = f"node {data.get('node_id')} ({data.get('node_type')})"
            # ComfyUI names custom-node modules by their path: "/x/custom_nodes/Pack.mod.LoadError" -> "LoadError"
            etype = str(data.get("exception_type") or "error").rsplit(".", 1)[-1]
            text = f"ComfyUI failed the prompt in {where}: {etype}: {data.get('exception_message', '').strip()}"
            tb = data.get("traceback")
            if tb:
                log.debug("ComfyUI traceback:\n%s", "".join(tb) if isinstance(tb, list) else tb)
            return text
        if event == "execution_interrupted":
            return f"the prompt was interrupted in node {data.get('node_id')} ({data.get('node_type')})"
    return "ComfyUI reports the prompt failed but sent no execution_error message; see the ComfyUI console"


class ComfyClient:
    """A minimal client of ComfyUI's HTTP API."""

    def __init__(self, server: str = DEFAULT_SERVER, request_timeout: float = 30.0):
        if "://" not in server:
            server = "http://" + server
        self.server = server.rstrip("/")
        self.request_timeout = request_timeout
        self.client_id = uuid.uuid4().hex

    def request(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        """(status, body bytes) for any HTTP answer; ServerUnavailable when there is none."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnavailable(f"cannot reach ComfyUI at {self.server} ({reason}). Start it (python main.py "
                                    "--listen 127.0.0.1 --port 8188) or pass its address with --server") from None

    def json(self, method: str, path: str, body=None):
        status, raw = self.request(method, path, body)
        try:
            data = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            data = None
        if status >= 400 and not (status == 400 and isinstance(data, dict) and "error" in data):
            snippet = raw[:300].decode("utf-8", "replace")
            raise ServerUnavailable(f"{method} {self.server}{path}: HTTP {status}: {snippet}")
        if data is None:
            raise ServerUnavailable(f"{method} {self.server}{path}: answer is not JSON; is {self.server} ComfyUI?")
        return status, data

    def submit(self, prompt: dict) -> str:
        """POST /prompt; the prompt id, or QueueError with ComfyUI's validation errors."""
        status, data = self.json("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status == 400:
            raise QueueError(format_validation_error(data))
        if "prompt_id" not in data:
            raise ServerUnavailable(f"POST {self.server}/prompt answered without a prompt_id: {data}")
        return data["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The finished prompt's history entry, or None while it is queued or running."""
        _, data = self.json("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        # ComfyUI writes the history entry only when the prompt has finished (PromptQueue.task_done)
        return data.get(prompt_id) or None

    def queue_state(self, prompt_id: str) -> str | None:
        """"running", "queued (N ahead)" or None when ComfyUI's queue does not hold the prompt (GET /queue)."""
        _, data = self.json("GET", "/queue")
        running = data.get("queue_running") or []
        pending = data.get("queue_pending") or []
        if any(len(item) > 1 and item[1] == prompt_id for item in running):
            return "running"
        mine = [item for item in pending if len(item) > 1 and item[1] == prompt_id]
        if not mine:
            return None
        ahead = len(running) + sum(1 for item in pending if item[0] < mine[0][0])
        return f"queued ({ahead} ahead)"

    def wait(self, prompt_id: str, timeout: float = DEFAULT_TIMEOUT, poll: float = 0.5,
             check_every: float = 5.0) -> dict:
        """Poll /history until the prompt is finished; its outputs, or QueueError when it failed or vanished.

        Every ``check_every`` seconds /queue tells whether it is still queued or running (logged when that
        changes); a prompt in neither place nor in the history was deleted or lost with a server restart.
        """
        start = time.monotonic()
        next_check, state = start + check_every, None
        while True:
            entry = self.history(prompt_id)
            if entry is None and time.monotonic() >= next_check:
                new_state = self.queue_state(prompt_id)
                entry = self.history(prompt_id)  # it may have finished between the two requests
                if entry is None and new_state is None:
                    raise QueueError(f"prompt {prompt_id} is no longer in ComfyUI's queue nor in its history: it was "
                                     "deleted from the queue, or the server restarted. Queue it again.")
                if new_state != state:
                    log.info("prompt %s: %s (%.0f s)", prompt_id, new_state, time.monotonic() - start)
                next_check, state = time.monotonic() + check_every, new_state
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    raise QueueError(format_execution_error(status.get("messages")))
                return entry.get("outputs") or {}
            now = time.monotonic()
            if timeout and now - start > timeout:
                raise ServerUnavailable(f"prompt {prompt_id} did not finish within {timeout:g} s; it is still in "
                                        f"ComfyUI's queue at {self.server} (raise --timeout to wait longer)")
            time.sleep(min(poll, max(0.05, (now - start) / 4)))

    def cancel(self, prompt_id: str) -> None:
        """Remove the prompt from the queue, or interrupt it when it is running."""
        try:
            self.request("POST", "/queue", {"delete": [prompt_id]})
            self.request("POST", "/interrupt", {"prompt_id": prompt_id})
        except ServerUnavailable:
            pass

    def download(self, item: dict, out_dir) -> Path:
        """GET /view for one output entry ``{"filename", "subfolder", "type"}``; the path written."""
        filename = item["filename"]
        subfolder = item.get("subfolder") or ""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder,
                                        "type": item.get("type") or "output"})
        status, raw = self.request("GET", f"/view?{query}")
        if status != 200:
            raise ServerUnavailable(f"GET {self.server}/view?{query}: HTTP {status}")
        parts = [p for p in subfolder.replace("\\", "/").split("/") if p not in ("", ".", "..")]
        dest = Path(out_dir, *parts, os.path.basename(filename))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(raw)
        return dest


def output_items(outputs: dict):
    """(node id, file entry) for every file a finished prompt's outputs name, in node order."""
    for node_id, out in outputs.items():
        for key in OUTPUT_KEYS:
            for item in out.get(key) or ():
                if isinstance(item, dict) and item.get("filename"):
                    yield node_id, item


def run_workflow(prompt: dict, server: str = DEFAULT_SERVER, *, sets=(), out_dir="out",
                 timeout: float = DEFAULT_TIMEOUT, poll: float = 0.5, check_every: float = 5.0) -> list[Path]:
    """Queue ``prompt`` on the ComfyUI at ``server``, wait for it and download its images into ``out_dir``."""
    prompt = apply_sets(check_workflow(prompt), sets)
    client = ComfyClient(server)
    prompt_id = client.submit(prompt)
    log.info("queued prompt %s on %s", prompt_id, client.server)
    try:
        outputs = client.wait(prompt_id, timeout=timeout, poll=poll, check_every=check_every)
    except KeyboardInterrupt:
        client.cancel(prompt_id)
        raise
    paths = [client.download(item, out_dir) for _, item in output_items(outputs)]
    if not paths:
        log.warning("prompt %s finished without output files (does the workflow end in a Save Image node?)",
                    prompt_id)
    return paths
