"""Lazy access to safetensors files (keys from the headers, tensors one at a time, cast as read) and to the files
of a diffusers component folder."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoadError


class SafetensorsReader:
    """Lazy access to one or more safetensors files: keys from the headers, tensors one at a time."""

    def __init__(self, files):
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        self._handles = {}
        self.key_file = {}
        self.metadata = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                keys = list(h.keys())
            except Exception as exc:  # safetensors raises its own error types
                raise LoadError(f"{f}: not a readable safetensors file ({exc}); the file is truncated, corrupt or "
                                f"of another format. Download it again.") from None
            self._handles[f] = h
            self.metadata.update(h.metadata() or {})
            for k in keys:
                self.key_file[k] = f

    def keys(self):
        return self.key_file.keys()

    def get(self, key, dtype=None, keep_fp8: bool = False):
        """One tensor, cast to ``dtype`` as it is read (fp8 ones left as stored with ``keep_fp8``)."""
        t = self._handles[self.key_file[key]].get_tensor(key)
        if dtype is not None and t.dtype != dtype and t.is_floating_point() and not (keep_fp8 and t.element_size() == 1):
            t = t.to(dtype)
        return t

    def take(self, prefix: str = "", dtype=None, strip: bool = True, keep_fp8: bool = False) -> dict:
        """Every tensor under ``prefix`` (the prefix stripped from the keys unless ``strip=False``)."""
        out = {}
        for k in list(self.key_file):
            if k.startswith(prefix):
                out[k[len(prefix):] if strip else k] = self.get(k, dtype, keep_fp8)
        return out



def folder_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one diffusers component folder, preferring full precision over the fp16 variant."""
    for variant in ("", ".fp16"):
        index = folder / f"{stem}.safetensors.index{variant}.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / n for n in names]
        single = folder / f"{stem}{variant}.safetensors"
        if single.exists():
            return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    bins = sorted(folder.glob("*.bin"))
    hint = " (only .bin files: convert them to safetensors)" if bins else ""
    raise LoadError(f"{folder}: no {stem}*.safetensors weights found{hint}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: cannot read the config ({exc})") from None


