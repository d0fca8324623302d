"""What an image needs to be made again: which files (by name and a short hash, never a full path), the dtype, the
speed mode, where the start noise was drawn, the LoRAs, and this pack's version. Torch-free.

`file_hash` is quick on any file size: sha256 over the file's size, its first and its last MiB (what changes when
a model is retrained, converted or truncated), 10 hex digits. A folder (a diffusers checkpoint) hashes the names,
sizes and hashes of its weight and config files. Hashes are cached per (resolved path, mtime, size), so a file is
read once per change, however many images name it (the last `MAX_CACHED` versions are kept).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read from each end of a file
HASH_DIGITS = 10
_FOLDER_FILES = (".safetensors", ".gguf", ".json", ".model")
_CACHE: dict[tuple, str] = {}
MAX_CACHED = 4096  # file versions whose hash is kept (the oldest go first): a long session of new files stays bounded


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


def file_key(path) -> tuple:
    """(resolved path, mtime in ns, size): what identifies one version of a file."""
    return _stat_key(Path(os.fspath(path)).expanduser().resolve())


def _file_digest(path: Path, size: int) -> str:
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(CHUNK))
        if size > CHUNK:
            f.seek(max(CHUNK, size - CHUNK))
            h.update(f.read(CHUNK))
    return h.hexdigest()


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256(b"folder")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _FOLDER_FILES):
        rel = path.relative_to(folder).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0{file_hash(path)}\0".encode())
    return h.hexdigest()


def file_hash(path) -> str | None:
    """A short hash of a file or model folder (see the module docstring); None when it cannot be read."""
    try:
        resolved = Path(os.fspath(path)).expanduser().resolve()
        key = _stat_key(resolved)
        if resolved.is_dir():  # its files are cached one by one (a folder's mtime misses changes below it)
            return _folder_digest(resolved)[:HASH_DIGITS]
        hit = _CACHE.get(key)
        if hit is None:
            while len(_CACHE) >= MAX_CACHED:
                _CACHE.pop(next(iter(_CACHE)))
            hit = _CACHE[key] = _file_digest(resolved, key[2])[:HASH_DIGITS]
        return hit
    except (OSError, TypeError, ValueError) as exc:
        log.debug("no hash for %s: %s", path, exc)
        return None


def file_record(source) -> dict | None:
    """``{"name": file or folder name, "hash": short hash}`` for a model part's source (a path, or a checkpoint
    path with ``:key`` for a part stored inside it); None for no source."""
    if not source:
        return None
    text = os.fspath(source)
    path = Path(text)
    if not path.exists() and ":" in path.name:  # e.g. "ckpt.safetensors:pile_t5xl.spiece_model"
        path = path.with_name(path.name.split(":", 1)[0])
    return {"name": Path(text).name, "hash": file_hash(path)}


def _inside(source, checkpoint) -> bool:
    """Whether a part's source is the checkpoint itself (a part stored in it) or inside its folder."""
    if not source or not checkpoint:
        return False
    text, ckpt = os.fspath(source), os.fspath(checkpoint)
    return text == ckpt or text.startswith(ckpt + ":") or text.startswith(ckpt.rstrip("/\\") + os.sep)


def speed_name(speed) -> str | dict:
    """A plan's speed setting as JSON: its name, "exact" for None, or a `SpeedOptions` as a dict."""
    if speed is None:
        return "exact"
    if isinstance(speed, str):
        return speed
    return asdict(speed)


def run_record(sources: dict, *, dtype, compute_dtype, device, speed, noise_device, loras=()) -> dict:
    """The ``auraflow`` metadata entry of an image: see the module docstring. ``sources``: part -> its file or
    folder (`AuraFlowPipeline.sources`); ``loras``: the applied LoRAs' metadata dicts."""
    from . import __version__

    record = {"version": __version__}
    checkpoint = sources.get("transformer")
    for part in ("transformer", "text_encoder", "vae", "tokenizer"):
        source = sources.get(part)
        if part != "transformer" and _inside(source, checkpoint):
            continue  # the checkpoint's own part: its name and hash say it
        entry = file_record(source)
        if entry is not None:
            record["checkpoint" if part == "transformer" else part] = entry
    record.update(dtype=str(dtype), compute_dtype=str(compute_dtype).replace("torch.", ""), device=str(device),
                  speed=speed_name(speed), noise_device=noise_device, loras=list(loras))
    return record


__all__ = ["file_hash", "file_key", "file_record", "run_record", "speed_name"]
