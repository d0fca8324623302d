"""ComfyUI's answers, read defensively: its error texts formatted for a terminal, the files a finished prompt names,
and where each may be written. A server that answers something else (wrong types, hostile file names, huge lists)
gets `ServerUnavailable` or a warning, never a traceback, and never a file outside the output folder."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

OUTPUT_KEYS = ("images", "gifs", "videos", "audio")  # history output lists whose entries name files for /view
MAX_OUTPUT_FILES = 10000  # per prompt; a SaveImage of a 4096 batch names 4096
MAX_NAME_BYTES = 255  # a file or folder name on the usual file systems
_TEXT_LIMIT = 2000  # characters of one ComfyUI error text shown


class QueueError(RuntimeError):
    """ComfyUI rejected or failed the prompt; the message is ComfyUI's error text, formatted for a terminal."""


class ServerUnavailable(RuntimeError):
    """ComfyUI could not be reached, answered something that is not its API, or did not finish in time."""


def _text(value) -> str:
    text = str(value).strip()
    return text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + "…"


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def format_validation_error(body: dict) -> str:
    """ComfyUI's 400 answer to POST /prompt (``error`` and ``node_errors``) as lines of text."""
    error = body.get("error")
    node_errors = _dict(body.get("node_errors"))
    if isinstance(error, dict):
        head = error.get("message") or error.get("type") or "invalid prompt"
        details = error.get("details")
        # prompt_outputs_failed_validation repeats the node errors in details; they are listed per node below
        if details and not node_errors:
            head = f"{head}: {details}"
    else:
        head = error or "invalid prompt"
    lines = [f"ComfyUI rejected the prompt: {_text(head)}"]
    for node_id, info in list(node_errors.items())[:50]:
        info = _dict(info)
        cls = info.get("class_type", "?")
        for err in _list(info.get("errors"))[:20]:
            err = _dict(err)
            det = err.get("details")
            lines.append(f"  node {_text(node_id)} ({_text(cls)}): {_text(err.get('message', 'error'))}"
                         f"{': ' + _text(det) if det else ''}")
    return "\n".join(lines)


def format_execution_error(messages) -> str:
    """The ``execution_error`` / ``execution_interrupted`` status message of a finished history entry as text."""
    for message in _list(messages):
        if not isinstance(message, (list, tuple)) or len(message) != 2:
            continue
        event, data = message[0], _dict(message[1])
        if event == "execution_error":
            where = f"node {_text(data.get('node_id'))} ({_text(data.get('node_type'))})"
            # ComfyUI names custom-node modules by their path: "/x/custom_nodes/Pack.mod.LoadError" -> "LoadError"
            etype = str(data.get("exception_type") or "error").rsplit(".", 1)[-1]
            text = f"ComfyUI failed the prompt in {where}: {_text(etype)}: {_text(data.get('exception_message', ''))}"
            tb = data.get("traceback")
            if tb:
                log.debug("ComfyUI traceback:\n%s", "".join(map(str, tb)) if isinstance(tb, list) else tb)
            return text
        if event == "execution_interrupted":
            return (f"the prompt was interrupted in node {_text(data.get('node_id'))} "
                    f"({_text(data.get('node_type'))})")
    return "ComfyUI reports the prompt failed but sent no execution_error message; see the ComfyUI console"


def output_items(outputs) -> list[tuple[str, dict]]:
    """(node id, file entry) for every file a finished prompt's outputs name, in node order; entries that are not
    ``{"filename": str, "subfolder": str, "type": str}`` are skipped with a warning."""
    if not isinstance(outputs, dict):
        raise ServerUnavailable(f"the history's outputs are a {type(outputs).__name__}, not ComfyUI's JSON object; "
                                "is the server ComfyUI?")
    items, skipped = [], 0
    for node_id, out in outputs.items():
        for key in OUTPUT_KEYS:
            for item in _list(_dict(out).get(key)):
                if isinstance(item, dict) and isinstance(item.get("filename"), str) and item["filename"] and \
                        isinstance(item.get("subfolder", ""), str) and isinstance(item.get("type", "output"), str):
                    items.append((str(node_id), item))
                else:
                    skipped += 1
                if len(items) > MAX_OUTPUT_FILES:
                    raise ServerUnavailable(f"the prompt's outputs name over {MAX_OUTPUT_FILES} files; not downloaded")
    if skipped:
        log.warning("skipped %d output entries that name no file in ComfyUI's format", skipped)
    return items


def destination(out_dir, item: dict) -> tuple[Path, str] | None:
    """(folder, file name) under ``out_dir`` for a history file entry: the subfolder's plain parts and the file
    name's last part, never a way out of ``out_dir`` (no '..', no absolute path, no link leading out); None, with a
    warning, when no usable name is left."""
    name = item["filename"].replace("\\", "/").rsplit("/", 1)[-1]
    parts = [p for p in (item.get("subfolder") or "").replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if name in ("", ".", "..") or "\0" in name or any("\0" in p for p in parts) or \
            len(os.fsencode(name)) > MAX_NAME_BYTES or any(len(os.fsencode(p)) > MAX_NAME_BYTES for p in parts):
        log.warning("skipped an output with an unusable file name %r", item["filename"][:80])
        return None
    root = Path(out_dir)
    folder = root.joinpath(*parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath((real_root, os.path.realpath(folder))) != real_root:
        log.warning("skipped %s: its subfolder %r leads outside %s through a link", name, item.get("subfolder"), root)
        return None
    return folder, name


def free_names(name: str):
    """``name``, then ``stem_1.ext``, ``stem_2.ext``...: the candidates `aura_flow.images.write_first_free` tries. A
    long stem is shortened (on a character) where the number would make the name over `MAX_NAME_BYTES`."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, dot, ext = name, "", ""
    yield name
    for n in range(1, 100000):
        tail = f"_{n}{dot}{ext}"
        room = MAX_NAME_BYTES - len(os.fsencode(tail))
        while stem and len(os.fsencode(stem)) > room:
            stem = stem[:-1]
        yield f"{stem}{tail}"
