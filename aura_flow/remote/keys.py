"""The providers' API keys: read from the environment (``SEGMIND_API_KEY``, ``FAL_KEY``) or a key file, written to
the key file for the editor's dialog. Every provider follows the same rules; ``provider`` picks the names.

The key lives only in the request header; no function here puts it in a message. The key file is read with a
size limit (never a FIFO or device that would block or never end) and written atomically through a new private
temporary file (exclusive create, no link followed), so concurrent writers never tear it and a planted link never
receives the key.
"""
from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

from .errors import MissingKeyError
from .providers import SEGMIND, get_provider

API_KEY_ENV = SEGMIND.key_env
KEY_FILE_ENV = SEGMIND.key_file_env
KEY_FILE_NAME = SEGMIND.key_file_name
KEY_FILE_SUBDIR = "auraflow"  # <ComfyUI user dir>/auraflow/<provider's key file>, ~/.config/auraflow/...
# Segmind keys are SG_ and 16 hex digits, fal's a UUID, ':' and 32 hex digits; anything much longer is not a key
# (a wrong file, a pasted document).
MAX_KEY_LENGTH = 256
MAX_KEY_FILE_BYTES = 4096  # the key, a newline and some blank space


def default_key_file(provider=None) -> Path:
    """The key file used outside ComfyUI: ``$AURAFLOW_SEGMIND_KEY_FILE`` (``$AURAFLOW_FAL_KEY_FILE``) or
    ``$XDG_CONFIG_HOME/auraflow/segmind_api_key`` (``fal_key``), by default under ``~/.config``."""
    p = get_provider(provider)
    given = os.environ.get(p.key_file_env)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / KEY_FILE_SUBDIR / p.key_file_name


def comfyui_key_file(user_dir, provider=None) -> Path:
    """The key file inside ComfyUI: ``<ComfyUI user dir>/auraflow/segmind_api_key`` (``fal_key``).

    It sits beside the per-user folders (``user/default``), so ComfyUI's /userdata routes do not serve it.
    """
    return Path(user_dir) / KEY_FILE_SUBDIR / get_provider(provider).key_file_name


def clean_key(raw: str, source: str, provider=None) -> str:
    p = get_provider(provider)
    key = raw.strip().lstrip("\ufeff").strip()  # a key file saved by Notepad starts with a byte order mark
    if not key:
        raise MissingKeyError(f"the API key in {source} is empty; set {p.key_env} or write the key into the key file")
    if len(key) > MAX_KEY_LENGTH:
        raise MissingKeyError(f"the API key in {source} is {len(key):,} characters long; a key has at most "
                              f"{MAX_KEY_LENGTH} ({p.label} keys are {p.key_hint}): write the key alone")
    # Printable ASCII without spaces: anything else would make http.client raise with the value in its message.
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise MissingKeyError(f"the API key in {source} contains spaces, control or non-ASCII characters; "
                              f"write the key alone ({p.label} keys are {p.key_hint})")
    return key


def resolve_api_key(key_file=None, provider=None) -> tuple[str, str]:
    """Return ``(key, source)``: the provider's variable (``$SEGMIND_API_KEY``, ``$FAL_KEY``) first, then the key
    file (``key_file`` or `default_key_file`).

    ``source`` names where the key came from, for messages; the key itself is never part of one.
    """
    p = get_provider(provider)
    env = os.environ.get(p.key_env, "")
    if env.strip():
        return clean_key(env, f"the {p.key_env} environment variable", p), f"the {p.key_env} environment variable"
    path = Path(key_file) if key_file else default_key_file(p)
    text = read_key_file(path, p)
    if not text.strip():
        elsewhere = "" if path == default_key_file(p) else (
            f" (outside ComfyUI: {default_key_file(p)}, or the path in {p.key_file_env})")
        raise MissingKeyError(
            f"no {p.label} API key: set the {p.key_env} environment variable, or write the key alone into the key "
            f"file {path}{elsewhere}. Get a key at {p.key_page}")
    return clean_key(text, f"the key file {path}", p), f"the key file {path}"


def read_key_file(path: Path, provider=None) -> str:
    """The key file's text ("" when there is none); at most `MAX_KEY_FILE_BYTES`, and only from a regular file."""
    env = get_provider(provider).key_env
    try:  # non-blocking: a FIFO planted at the path would otherwise block the open forever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise MissingKeyError(f"cannot read the API key file {path}: {exc.__class__.__name__}; "
                              f"fix its permissions or set {env}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MissingKeyError(f"the API key file {path} is not a regular file; write the key alone into a file "
                                  f"there, or set {env}")
        data = fh.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise MissingKeyError(f"the API key file {path} is over {MAX_KEY_FILE_BYTES:,} bytes, so it holds more than a "
                              f"key; write the key alone into it, or set {env}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MissingKeyError(f"the API key file {path} is not text; write the key alone into it, or set "
                              f"{env}") from None


def save_api_key(key: str, path, provider=None) -> Path:
    """Write ``key`` to ``path`` readable by the owner only; an empty key deletes the file.

    The key goes into a new temporary file of a unique name beside ``path`` (exclusive create, never through a
    link, mode 0600 from the start), flushed to disk, then renamed over ``path``: a reader sees the old key or the
    new one, concurrent writers never tear the file, and a link planted at either name never receives the key (the
    rename replaces a link at ``path`` itself, not its target)."""
    path = Path(path)
    if not key.strip():
        path.unlink(missing_ok=True)
        return path
    key = clean_key(key, "the given key", provider)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
