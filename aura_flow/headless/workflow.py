"""API-format workflows: read one from a file (bounded), check its shape, and apply ``--set NODE.INPUT=VALUE``."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from ..errors import ParameterError, shown

log = logging.getLogger(__name__)

MAX_WORKFLOW_BYTES = 64 * 1024 * 1024  # the bundled ones are a few kB; ComfyUI's own upload limit is 100 MB
_NODES_LISTED = 20  # in a message naming the nodes of a workflow


def load_workflow(path) -> dict:
    """Read an API-format workflow (``{"id": {"class_type", "inputs"}}``), or ``{"prompt": {...}}`` around one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_WORKFLOW_BYTES:
            raise ParameterError(f"{path}: {size:,} bytes is too large for a workflow (at most {MAX_WORKFLOW_BYTES:,}); "
                                 "is it the right file?")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParameterError(f"{path}: no such workflow file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ParameterError(f"{path}: not a JSON workflow ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    return check_workflow(data, str(path))


def check_workflow(data, where: str = "workflow") -> dict:
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ParameterError(f"{where}: this is the editor format (nodes and links); queue needs the API format. "
                             "Use its API twin (example_workflows/api/<name>.json for the bundled ones), or export it "
                             "from the editor with Export (API).")
    if not isinstance(data, dict) or not data:
        raise ParameterError(f"{where}: expected an API-format workflow, a JSON object of "
                             '{"<node id>": {"class_type": ..., "inputs": {...}}}')
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise ParameterError(f"{where}: node {shown(node_id)} has no class_type; is this an API-format workflow?")
        if not isinstance(node.get("inputs", {}), dict):
            raise ParameterError(f"{where}: node {shown(node_id)} ({shown(node['class_type'])}): inputs must be a JSON "
                                 "object")
    return data


def parse_value(text: str):
    """``--set`` values: JSON when they parse (5, 1.5, true, null, "x", [..]), else the text as a string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than JSON can be read
        return text


def _title(node: dict):
    meta = node.get("_meta")
    return meta.get("title") if isinstance(meta, dict) else None


def _describe(node_id: str, node: dict) -> str:
    title = _title(node)
    cls = node["class_type"]
    return f"{node_id} ({cls}{', ' + repr(title) if title and title != cls else ''})"


def find_node(prompt: dict, key: str) -> str:
    """The id of the node that ``key`` names: a node id, else a unique ``_meta.title``, else a unique class_type."""
    if key in prompt:
        return key
    for what, match in (("title", lambda n: _title(n) == key), ("class_type", lambda n: n["class_type"] == key)):
        ids = [node_id for node_id, node in prompt.items() if match(node)]
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            raise ParameterError(f"--set {key}: {len(ids)} nodes have the {what} {key!r} "
                                 f"({', '.join(ids[:_NODES_LISTED])}); use one of those node ids instead")
    nodes = "; ".join(_describe(i, n) for i, n in list(prompt.items())[:_NODES_LISTED])
    more = f"; and {len(prompt) - _NODES_LISTED} more" if len(prompt) > _NODES_LISTED else ""
    raise ParameterError(f"--set {key}: no node has that id, title or class_type. Nodes: {nodes}{more}")


def apply_sets(prompt: dict, sets) -> dict:
    """A copy of ``prompt`` with each ``NODE.INPUT=VALUE`` applied; NODE is an id, a title or a class_type."""
    prompt = copy.deepcopy(prompt)
    for item in sets or ():
        target, eq, text = item.partition("=")
        key, dot, name = target.rpartition(".")
        if not eq or not dot or not key or not name:
            raise ParameterError(f"--set {shown(item)}: expected NODE.INPUT=VALUE, e.g. --set 3.seed=5 or "
                                 "--set KSampler.steps=20")
        node_id = find_node(prompt, key)
        inputs = prompt[node_id].setdefault("inputs", {})
        if name not in inputs:
            known = ", ".join(sorted(inputs)) or "none"
            raise ParameterError(f"--set {shown(item)}: node {_describe(node_id, prompt[node_id])} has no input "
                                 f"{name!r}; its inputs: {known}")
        value = parse_value(text)
        if isinstance(inputs[name], list) and not isinstance(value, list):
            log.info("--set %s: replaces the link into node %s input %s with a value", item, node_id, name)
        inputs[name] = value
    return prompt
