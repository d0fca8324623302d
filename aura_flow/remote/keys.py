"""The Segmind API key: read from ``SEGMIND_API_KEY`` or a key file, written to the key file for the editor's dialog.

The key lives only in the request header; no function here puts it in a message.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingKeyError

API_KEY_ENV = "SEGMIND_API_KEY"
KEY_FILE_ENV = "AURAFLOW_SEGMIND_KEY_FILE"
KEY_FILE_NAME = "segmind_api_key"
KEY_FILE_SUBDIR = "auraflow"  # <ComfyUI user dir>/auraflow/segmind_api_key, ~/.config/auraflow/segmind_api_key


def default_key_file() -> Path:
    """The key file used outside ComfyUI: ``$AURAFLOW_SEGMIND_KEY_FILE`` or
    ``$XDG_CONFIG_HOME/auraflow/segmind_api_key`` (``~/.config/auraflow/segmind_api_key``)."""
    given = os.environ.get(KEY_FILE_ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / KEY_FILE_SUBDIR / KEY_FILE_NAME


def comfyui_key_file(user_dir) -> Path:
    """The key file inside ComfyUI: ``<ComfyUI user dir>/auraflow/segmind_api_key`` (``ComfyUI/user/...``).

    It sits beside the per-user folders (``user/default``), so ComfyUI's /userdata routes do not serve it.
    """
    return Path(user_dir) / KEY_FILE_SUBDIR / KEY_FILE_NAME


def clean_key(raw: str, source: str) -> str:
    key = raw.strip()
    if not key:
        raise MissingKeyError(f"the API key in {source} is empty; set {API_KEY_ENV} or write the key into the key file")
    # Printable ASCII without spaces: anything else would make http.client raise with the value in its message.
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise MissingKeyError(f"the API key in {source} contains spaces, control or non-ASCII characters; "
                              "write the key alone (Segmind keys look like SG_ followed by 16 hex digits)")
    return key


def resolve_api_key(key_file=None) -> tuple[str, str]:
    """Return ``(key, source)``: ``$SEGMIND_API_KEY`` first, then the key file (``key_file`` or `default_key_file`).

    ``source`` names where the key came from, for messages; the key itself is never part of one.
    """
    env = os.environ.get(API_KEY_ENV, "")
    if env.strip():
        return clean_key(env, f"the {API_KEY_ENV} environment variable"), f"the {API_KEY_ENV} environment variable"
    path = Path(key_file) if key_file else default_key_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise MissingKeyError(f"cannot read the API key file {path}: {exc.__class__.__name__}; "
                              f"fix its permissions or set {API_KEY_ENV}") from None
    if not text.strip():
        elsewhere = "" if path == default_key_file() else (
            f" (outside ComfyUI: {default_key_file()}, or the path in {KEY_FILE_ENV})")
        raise MissingKeyError(
            f"no Segmind API key: set the {API_KEY_ENV} environment variable, or write the key alone into the key "
            f"file {path}{elsewhere}. Get a key at https://cloud.segmind.com/console/api-keys")
    return clean_key(text, f"the key file {path}"), f"the key file {path}"


def save_api_key(key: str, path) -> Path:
    """Write ``key`` to ``path`` readable by the owner only (atomic replace); an empty key deletes the file."""
    path = Path(path)
    if not key.strip():
        path.unlink(missing_ok=True)
        return path
    key = clean_key(key, "the given key")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when a stale .tmp with wider permissions was there
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    os.replace(tmp, path)
    return path
