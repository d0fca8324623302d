"""API-format workflows: read one from a file (bounded), check its shape, and apply ``--set NODE.INPUT=VALUE``."""
from __future__ import annotations

import copy
import json
import logging
import stat
from pathlib import Path

from ..errors import ParameterError, shown

log = logging.getLogger(__name__)

MAX_WORKFLOW_BYTES = 64 * 1024 * 1024  # the bundled ones are a few kB; ComfyUI's own upload limit is 100 MB
_NODES_LISTED = 20  # in a message naming the nodes of a workflow


def load_workflow(path) -> dict:
    """Read an API-format workflow (``{"id": {"class_type", "inputs"}}``), or ``{"prompt": {...}}`` around one."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read for ever, a device never end
            raise ParameterError(f"{path}: not a regular file (a folder, a pipe or a device); give the workflow's "
                                 ".json file")
        size = info.st_size
        if size > MAX_WORKFLOW_BYTES:
            raise ParameterError(f"{path}: {size:,} bytes is too large for a workflow (at most {MAX_WORKFLOW_BYTES:,}); "
                                 "is it the right file?")
        data = json.loads(path.read_text(encoding="utf-8"))
    except ParameterError:
        raise
    except FileNotFoundError:
        raise ParameterError(f"{path}: no such workflow file") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
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
    _check_links(data, where)
    return data


def _links(node: dict):
    """(input name, source node id) of every link into ``node`` (ComfyUI's form: ``["<node id>", <output index>]``)."""
    for name, value in node.get("inputs", {}).items():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and type(value[1]) is int:
            yield name, value[0]


def _check_links(data: dict, where: str) -> None:
    """Every link names a node of the workflow, and no node depends on itself (ComfyUI would refuse or never finish
    either); found before anything is queued, in one pass over the links (no recursion)."""
    for node_id, node in data.items():
        for name, source in _links(node):
            if source not in data:
                raise ParameterError(f"{where}: node {shown(node_id)} input {shown(name)} links to node "
                                     f"{shown(source)}, which is not in the workflow")
    state: dict = {}  # node id -> 1 while on the path being walked, 2 when done
    for start in data:
        if state.get(start):
            continue
        stack = [(start, iter([s for _, s in _links(data[start])]))]
        state[start] = 1
        while stack:
            node_id, sources = stack[-1]
            source = next(sources, None)
            if source is None:
                state[node_id] = 2
                stack.pop()
            elif state.get(source) == 1:
                raise ParameterError(f"{where}: node {shown(source)} depends on itself through its inputs (a cycle: "
                                     f"{' -> '.join(shown(n) for n, _ in stack[-8:])} -> {shown(source)}); a workflow "
                                     "must run from its loaders to its outputs")
            elif not state.get(source):
                state[source] = 1
                stack.append((source, iter([s for _, s in _links(data[source])])))


def parse_value(text: str):
    """``--set`` values: JSON when they parse (5, 1.5, true, null, "x", [..]), else the text as a string."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # nested deeper than JSON can be read, a number over 4300 digits
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
