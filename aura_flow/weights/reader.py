"""Lazy access to safetensors files (keys from the headers, tensors one at a time, cast as read) and to the files
of a diffusers component folder.

Tensors are handed out as `LazyTensor`s: shape and dtype from the header (a meta tensor), bytes read only when
a loader has checked every shape against the model it builds, so a wrong or hostile file is refused with work
bounded by its header, and tensors the model has no place for are never read.

Only safetensors are read: pickled checkpoints (.bin, .pt, .ckpt...) can run code when unpickled, so they are
refused by name with the fix. A shard index names files inside its own folder only (no absolute paths, no ``..``,
no link leading out of the folder, except the Hugging Face cache's links into its own ``blobs/``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import LoadError, shown

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_TENSORS = 100_000  # tensors in one safetensors file (AuraFlow's all-in-one file: about 1,200)
MAX_JSON_BYTES = 16 * 1024 * 1024  # a config or shard index; the real ones are a few kB (an index ~100 kB)
_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
# safetensors dtype names -> torch dtypes a loader can take (weights: the floats; U8 for a serialized tokenizer or
# ComfyUI's per-layer JSON; the integers, so that a weight stored as one is named as not floating point)
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64"}


class LazyTensor:
    """A tensor known by its shape and dtype (``meta``, on the meta device) whose values ``read()`` fetches: the
    loaders check every shape before any is read. ``t[index]`` is the same, indexed when read."""

    def __init__(self, meta, read):
        self.meta, self._read = meta, read

    shape = property(lambda self: self.meta.shape)
    dtype = property(lambda self: self.meta.dtype)
    ndim = property(lambda self: self.meta.ndim)

    def dim(self):
        return self.meta.dim()

    def numel(self):
        return self.meta.numel()

    def is_floating_point(self):
        return self.meta.is_floating_point()

    def __getitem__(self, index):
        return LazyTensor(self.meta[index], lambda: self.read()[index])

    def read(self):
        return self._read()


def real(t):
    """``t``'s values: a `LazyTensor` read, a tensor as it is."""
    return t.read() if isinstance(t, LazyTensor) else t


def lazily(t, change):
    """``change(t)`` now for a tensor, when read for a `LazyTensor` (``change`` keeps the shape)."""
    return LazyTensor(t.meta, lambda: change(t.read())) if isinstance(t, LazyTensor) else change(t)


class SafetensorsReader:
    """Lazy access to one or more safetensors files: keys from the headers, tensors one at a time."""

    def __init__(self, files):
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        self._handles = {}
        self.key_file = {}
        self.metadata = {}
        for f in self.files:
            refuse_pickle(f)
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                keys = list(h.keys())
            except Exception as exc:  # safetensors raises its own error types
                if "unable to mmap" in str(exc):
                    raise LoadError(f"{f}: {f.stat().st_size:,} bytes, more than this machine can map into memory "
                                    "(its memory and swap); use a smaller file of the model (fp8 or GGUF), or add "
                                    "swap") from None
                raise LoadError(f"{f}: not a readable safetensors file ({_why(f) or exc}); the file is truncated, "
                                f"corrupt or of another format. Download it again.") from None
            if len(keys) > MAX_TENSORS:
                raise LoadError(f"{f}: holds {len(keys):,} tensors, more than any model this pack reads (at most "
                                f"{MAX_TENSORS:,}; a whole AuraFlow checkpoint holds about 1,200); the file is damaged "
                                "or not a model")
            self._handles[f] = h
            self.metadata.update(h.metadata() or {})
            for k in keys:
                self.key_file[k] = f

    def header(self, key) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name) of ``key``, from the header."""
        view = self._handles[self.key_file[key]].get_slice(key)
        return tuple(view.get_shape()), view.get_dtype()

    def lazy(self, prefix: str = "", dtype=None, strip: bool = True, keep_fp8: bool = False) -> dict:
        """Every tensor under ``prefix`` (the prefix stripped from the keys unless ``strip=False``) as a `LazyTensor`
        of the shape and dtype the header gives, cast to ``dtype`` when read as `get` does; nothing is read here.
        A dtype no loader takes (4- or 6-bit floats, exponent-only scales, complex...) is a LoadError naming the
        file and the tensor."""
        import torch

        out = {}
        for k in list(self.key_file):
            if not k.startswith(prefix):
                continue
            shape, name = self.header(k)
            if name not in _DTYPES:
                raise LoadError(f"{self.key_file[k]}: tensor {shown(k)} is stored as {name}, a type this pack does not "
                                f"read (expected {', '.join(list(_DTYPES)[:6])}); the file is of another format or "
                                "damaged. Use a bf16, fp16, fp32 or fp8 file of this model")
            stored = getattr(torch, _DTYPES[name])
            cast = dtype if dtype is not None and stored.is_floating_point and stored != dtype and \
                not (keep_fp8 and stored.itemsize == 1) else stored
            out[k[len(prefix):] if strip else k] = LazyTensor(
                torch.empty(shape, dtype=cast, device="meta"),
                lambda k=k, shape=shape: self._checked(k, shape, dtype, keep_fp8))
        return out

    def _checked(self, key, shape, dtype, keep_fp8):
        t = self.get(key, dtype, keep_fp8)
        if tuple(t.shape) != shape:  # safetensors hands out what its header says; a guard, never expected
            raise LoadError(f"{self.key_file[key]}: tensor {shown(key)} read as {tuple(t.shape)}, its header says "
                            f"{shape}; the file is damaged")
        return t

    def keys(self):
        return self.key_file.keys()

    def get(self, key, dtype=None, keep_fp8: bool = False):
        """One tensor, cast to ``dtype`` as it is read (fp8 ones left as stored with ``keep_fp8``)."""
        t = self._handles[self.key_file[key]].get_tensor(key)
        if dtype is not None and t.dtype != dtype and t.is_floating_point() and not (keep_fp8 and t.element_size() == 1):
            t = t.to(dtype)
        return t




def _why(path: Path) -> str | None:
    """Why safetensors refused ``path``, in words, for the cases users meet (a truncated download): the header that
    claims more bytes than the file holds, or the tensor whose data runs past its end; None for the others."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            if n is None or n > size - 8:
                return f"{size:,} bytes, too short for the header it starts with" if n is None else \
                    f"its header claims {n:,} bytes, but the file holds {size:,}"
            header = json.loads(fh.read(n)) if n <= MAX_JSON_BYTES * 8 else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    ends = [(v["data_offsets"][1], k) for k, v in header.items() if isinstance(v, dict) and
            isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2 and
            isinstance(v["data_offsets"][1], int)]
    end, key = max(ends, default=(0, None))
    if key is not None and 8 + n + end > size:
        return (f"tensor {shown(key)} ends at byte {8 + n + end:,}, past the end of the {size:,}-byte file: the "
                "download is truncated")
    return None


def refuse_pickle(path: Path) -> None:
    """LoadError for a pickled checkpoint, before it is opened."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise LoadError(f"{path}: a pickled PyTorch file ({Path(path).suffix}); it is not read, because unpickling can "
                        "run code. Use the .safetensors version of the model (or convert it with safetensors' "
                        "convert tool on a machine you trust)")


def refuse_lone_shard(path: Path) -> None:
    """LoadError for one shard of a sharded model given alone (``...-00001-of-00003.safetensors``)."""
    match = _SHARD_NAME.search(Path(path).name)
    if match and int(match.group(2)) > 1:
        raise LoadError(f"{path}: this is shard {int(match.group(1))} of {int(match.group(2))} of a sharded model; "
                        f"give the folder that holds all {int(match.group(2))} shards and their "
                        f"*.safetensors.index.json (the diffusers folder, or its transformer/ folder)")


def folder_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one diffusers component folder, preferring full precision over the fp16 variant."""
    for variant in ("", ".fp16"):
        index = folder / f"{stem}.safetensors.index{variant}.json"
        if index.exists():
            return index_files(index)
        single = folder / f"{stem}{variant}.safetensors"
        if single.is_file():
            return [single]
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())  # no FIFO: it would block the reader
    if found:
        return found
    bins = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    hint = f" (only pickled {bins[0].suffix} files, which are not read: use the safetensors version)" if bins else ""
    raise LoadError(f"{folder}: no {stem}*.safetensors weights found{hint}")


def _roots(folder: Path) -> list[str]:
    """Where the files of ``folder`` may really lie: the folder itself, and for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>/...``, whose files are links) that repository's ``blobs/``."""
    roots = [os.path.realpath(folder)]
    absolute = Path(os.path.abspath(folder))
    for parent in absolute.parents:
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            roots.append(os.path.realpath(parent.parent / "blobs"))
            break
    return roots


def index_files(index: Path) -> list[Path]:
    """The shards a ``*.safetensors.index.json`` names, checked: each a safetensors file inside the index's folder
    that exists."""
    folder = index.parent
    weight_map = read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise LoadError(f"{index}: the shard index has no weight_map of tensor names to file names; download the "
                        "model again")
    roots = _roots(folder)
    files = []
    for name in sorted(set(weight_map.values())):
        parts = Path(name).parts
        real = os.path.realpath(folder / name)
        if Path(name).is_absolute() or ".." in parts or "\0" in name or \
                not any(os.path.commonpath((root, real)) == root for root in roots):
            raise LoadError(f"{index}: the shard index names {name!r}, outside the model folder {folder}; it is not "
                            "read. Download the model again")
        if not name.endswith(".safetensors"):
            raise LoadError(f"{index}: the shard index names {name!r}, not a .safetensors file; only safetensors "
                            "shards are read")
        if not (folder / name).is_file():
            raise LoadError(f"{index}: shard {name} is missing from {folder}; download it again (the index names "
                            f"{len(set(weight_map.values()))} shards)")
        files.append(folder / name)
    return files


def read_json(path: Path, what: str = "config") -> dict:
    """A JSON object from ``path`` (a config or a shard index), or LoadError naming the file."""
    if path.exists() and not path.is_file():  # a FIFO would block the read
        raise LoadError(f"{path}: the {what} is not a regular file")
    try:
        size = path.stat().st_size
        data = json.loads(path.read_bytes()) if size <= MAX_JSON_BYTES else None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or text, UnicodeDecodeError
        raise LoadError(f"{path}: cannot read the {what} ({exc.__class__.__name__}: {str(exc)[:200]}); download "
                        "the model again or fix the file") from None
    if data is None:
        raise LoadError(f"{path}: {size:,} bytes is too large for a {what} (at most {MAX_JSON_BYTES:,}); is it the "
                        "right file?")
    if not isinstance(data, dict):
        raise LoadError(f"{path}: the {what} is not a JSON object; download the model again or fix the file")
    return data
