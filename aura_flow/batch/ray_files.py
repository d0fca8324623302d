"""The files a ``ray`` batch worker writes into the output folder itself (`aura_flow.batch.ray`): under the sink's
names, and a retried job takes over its own earlier file (the same bytes) instead of writing a copy."""
from __future__ import annotations

import os
from pathlib import Path


def write_files(folder, job, images) -> list[str]:
    """Write ``images`` (encoded bytes) of ``job`` into ``folder`` under the sink's names; a name already holding
    exactly these bytes (this job's file from an attempt never recorded) is taken as written. Relative paths."""
    from ..images import image_extension, write_first_free
    from .runner import image_names

    folder = Path(folder)
    out = []
    for i, data in enumerate(images):
        for name in image_names(job, i, image_extension(data)):
            path = folder / name
            if os.path.lexists(path):
                if _same_bytes(path, data):
                    break
                continue
            try:
                write_first_free(folder, data, [name])
                break
            except FileExistsError:  # taken meanwhile: look at it again
                if _same_bytes(path, data):
                    break
        else:
            raise FileExistsError(f"{folder}: no free file name left for line {job.line}; clean the folder")
        out.append(name)
    return out


def _same_bytes(path, data: bytes) -> bool:
    try:
        if os.path.islink(path) or os.path.getsize(path) != len(data):
            return False
        with open(path, "rb") as fh:
            return fh.read() == data
    except OSError:
        return False


__all__ = ["write_files"]
