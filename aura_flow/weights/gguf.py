"""AuraFlow transformers from GGUF files, as city96's ComfyUI-GGUF writes them (``city96/AuraFlow-v0.3-gguf``, Pony
V7's ``gguf/``), kept quantized in memory.

What such a file holds: ``general.architecture = "aura"``; the transformer's tensors under their original (fal /
ComfyUI) names (``double_layers.0.attn.w1q.weight``, ``modF.1.weight``, ``positional_encoding``…), sometimes under
``model.diffusion_model.``; each tensor's shape reversed (ggml order), or given by a ``comfy.gguf.orig_shape.<name>``
INT32 array when the converter flattened it; 1-D and small tensors in F32 (or F16), the rest in one or more quant
types. GGUFReader only parses the header (it memory-maps the file and reads the tensor table); each tensor's bytes
are then read from the file straight into the tensor that keeps them, so a load holds one copy, never two.

Entry points: `is_gguf` (the magic bytes) and `load_gguf_transformer`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import Counter
from pathlib import Path

import gguf
import torch

from ..errors import LoadError, shown
from .assemble import Dense, assemble_transformer
from .configs import HEAD_DIM_KEY
from .layouts import TRANSFORMER_KEYS, find_prefix, is_gguf  # noqa: F401  (is_gguf re-exported)
from .gguf_dequant import can_dequantize, dequantize
from .gguf_header import MAX_DIMS, check_header
from .quantized_linear import GGUFLinear
from .reader import LazyTensor

log = logging.getLogger(__name__)

ARCH = "aura"
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
# arch strings ComfyUI-GGUF accepts for models it cannot name otherwise (stable-diffusion.cpp files, its own "pig")
_UNNAMED_ARCHES = (None, "pig")


def _field(reader: gguf.GGUFReader, name: str, path="the file"):
    """A header value: str, int, float, list of them, or None when absent; LoadError naming the file and the field
    for text that is not UTF-8 or a value of no known form."""
    field = reader.get_field(name)
    if field is None:
        return None
    try:
        kind = field.types[0]
        if kind == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        if kind == gguf.GGUFValueType.ARRAY:
            if len(field.types) > 1 and field.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            return [field.parts[i].tolist()[0] for i in field.data]
        return field.parts[field.data[0]].tolist()[0]
    except (UnicodeDecodeError, IndexError, TypeError, ValueError) as exc:
        raise LoadError(f"{path}: GGUF metadata {name} cannot be read ({exc.__class__.__name__}: "
                        f"{str(exc)[:120]}); the file is damaged. Download it again.") from None


def _orig_shape(reader, path, tensor) -> list[int] | None:
    """The shape ComfyUI-GGUF records for a tensor it flattened: whole numbers >= 1, as many elements as stored."""
    key = ORIG_SHAPE_KEY + tensor.name
    shape = _field(reader, key, path)
    if shape is None:
        return None
    n = int(tensor.n_elements)
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= n for d in shape) or \
            math.prod(shape) != n:
        raise LoadError(f"{path}: GGUF metadata {key}={shown(shape)} is not a shape of {n:,} elements (1 to "
                        f"{MAX_DIMS} whole numbers >= 1 whose product is the tensor's size); the file is damaged. "
                        "Download or convert it again.")
    return shape


class GGUFSource:
    """The GGUF file the tensors of one read come from, open only while they are read (`reading`): the model is
    planned from the header with the file closed, then filled from one opening."""

    def __init__(self, path):
        self.name, self._fh = str(path), None

    @contextlib.contextmanager
    def reading(self):
        with open(self.name, "rb") as self._fh:
            yield
        self._fh = None

    def read_at(self, offset: int, out) -> int:
        if self._fh is None:
            raise RuntimeError(f"{self.name}: read outside GGUFSource.reading()")
        self._fh.seek(offset)
        return self._fh.readinto(out)


class GGUFStored:
    """One tensor of a GGUF file: its type, logical shape, and where its bytes are; read when a layer needs them."""

    def __init__(self, file, name: str, qtype, shape, offset: int, nbytes: int, swapped: bool = False):
        self.file, self.name, self.qtype = file, name, gguf.GGMLQuantizationType(qtype)
        self.shape = tuple(int(d) for d in shape)
        self.offset, self.nbytes, self.swapped = offset, nbytes, swapped

    def raw(self) -> torch.Tensor:
        """The tensor's bytes (uint8, file order), read into memory the tensor owns (their range was checked
        against the file's size when the header was read)."""
        out = torch.empty(self.nbytes, dtype=torch.uint8)
        if self.file.read_at(self.offset, memoryview(out.numpy())) != self.nbytes:
            raise LoadError(f"{self.file.name}: tensor {self.name} ends past the end of the file; the download is "
                            f"truncated. Download it again.")
        if self.swapped:  # exchange the halves of the rows: whole blocks, since the half is block-aligned
            out = torch.cat(out.chunk(2)[::-1])
        return out

    def dense(self, dtype):
        return dequantize(self.raw(), self.qtype, self.shape, dtype)

    def linear(self, bias, dtype):
        out_features, in_features = self.shape
        return GGUFLinear(self.raw(), self.qtype, out_features, in_features, bias)

    def swap_halves(self):
        block_size, _ = gguf.GGML_QUANT_SIZES[self.qtype]
        half = self.shape[0] // 2 * math.prod(self.shape[1:])
        if self.shape[0] % 2 == 0 and half % block_size == 0:
            return GGUFStored(self.file, self.name, self.qtype, self.shape, self.offset, self.nbytes, not self.swapped)
        # blocks straddle the middle: decode this one (small) tensor instead, when it is read
        decoded = LazyTensor(torch.empty(self.shape, device="meta"), lambda: self.dense(torch.float32))
        return Dense(decoded).swap_halves()


def _check_arch(reader, path, keys) -> str:
    arch = _field(reader, "general.architecture", path)
    if arch == ARCH:
        return arch
    if arch in _UNNAMED_ARCHES and find_prefix(keys, TRANSFORMER_KEYS) is not None:
        log.warning("%s: GGUF without an AuraFlow architecture tag (%r); its tensors are AuraFlow's, loading it",
                    path, arch)
        return ARCH
    found = f"architecture {shown(arch)}" if arch is not None else "no general.architecture and no AuraFlow tensors"
    raise LoadError(f"{path}: a GGUF of {found}, not an AuraFlow transformer (architecture {ARCH!r}). Pick an "
                    f"AuraFlow or Pony V7 GGUF; load other models with their own loader (for image models, "
                    f"ComfyUI-GGUF's Unet Loader (GGUF)).")


def _open_checked(path) -> tuple[gguf.GGUFReader, list[str]]:
    """The header of an AuraFlow GGUF (a reader and its tensor names); LoadError naming what else it is."""
    check_header(path)  # every count against the bytes present: gguf-py trusts them
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, OverflowError, MemoryError) as exc:
        # gguf-py raises ValueError for a bad magic or version, IndexError/KeyError/OverflowError for counts and
        # types that run past the file (a truncated or hostile header)
        raise LoadError(f"{path}: not a readable GGUF file ({exc.__class__.__name__}: {str(exc)[:200]}); it is "
                        "truncated, damaged or of another format. Download it again.") from None
    if reader.byte_order != "I":
        raise LoadError(f"{path}: a big-endian GGUF; convert the model again on a little-endian machine.")
    names = [t.name for t in reader.tensors]
    _check_arch(reader, path, names)
    return reader, names


def check_gguf(path) -> None:
    """Refuse a GGUF that is not an AuraFlow transformer (naming its architecture) from its header alone, before
    the other parts are looked for."""
    _open_checked(path)


def read_gguf(path, file: GGUFSource) -> tuple[dict[str, GGUFStored], dict]:
    """``({unprefixed name: GGUFStored}, header metadata)`` of an AuraFlow GGUF; ``file``: where the tensors of
    ``path`` are read from (inside its `GGUFSource.reading`)."""
    reader, names = _open_checked(path)
    prefix = find_prefix(names, TRANSFORMER_KEYS) or ""
    size = os.path.getsize(path)
    stored = {}
    for t in reader.tensors:
        if not t.name.startswith(prefix):
            continue
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype.name in ("I8", "I16", "I32", "I64", "F64"):
            raise LoadError(f"{path}: tensor {t.name} is {qtype.name}, not a weight type of an AuraFlow GGUF (F32, "
                            "F16, BF16 or a quant type); the file is damaged or of another format. Download it again")
        if not can_dequantize(qtype):
            raise LoadError(f"{path}: tensor {t.name} is {qtype.name}, a type neither this pack nor the installed "
                            f"gguf package can unpack. Update gguf (pip install -U gguf) or use a file of another "
                            f"quant type.")
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        end = int(t.data_offset) + int(t.n_bytes)
        if int(t.n_elements) % block or end > size:
            raise LoadError(f"{path}: tensor {t.name} ({int(t.n_elements):,} {qtype.name} elements) " +
                            (f"ends at byte {end:,}, past the end of the {size:,}-byte file; the download is "
                             "truncated" if end > size else f"is not a whole number of {block}-element blocks") +
                            ". Download it again.")
        shape = _orig_shape(reader, path, t)
        if shape is None:
            shape = [int(d) for d in reversed(t.shape.tolist())]
        stored[t.name[len(prefix):]] = GGUFStored(file, t.name, qtype, shape, int(t.data_offset), int(t.n_bytes))
    metadata = {}
    head_dim = _field(reader, HEAD_DIM_KEY, path)
    if head_dim is not None:
        metadata[HEAD_DIM_KEY] = str(head_dim)
    return stored, metadata


def load_gguf_transformer(path, compute_dtype: torch.dtype = torch.bfloat16, deferred: bool = False):
    """An `AuraFlowTransformer2DModel` (on the CPU) whose linear layers are `GGUFLinear`s holding ``path``'s blocks;
    the other tensors (position grid, register tokens, biases) decoded to ``compute_dtype``, the dtype the layers
    dequantize to when run. Every tensor info is checked against the model before a block is read. The file is
    closed when this returns. deferred: ``(the model on the meta device, finish)``, every tensor info checked and
    nothing read; ``finish()`` opens the file and fills the model from that plan (the file is not held open in
    between, and its header is read once)."""
    path = Path(os.fspath(path))
    if not is_gguf(path):
        raise LoadError(f"{path}: not a GGUF file (it does not start with 'GGUF'); pass an AuraFlow .gguf, or load a "
                        f".safetensors checkpoint with the ordinary loader.")
    source = GGUFSource(path)
    stored, metadata = read_gguf(path, source)
    planned, fill = assemble_transformer(stored, path, compute_dtype, metadata, deferred=True)

    def finish():
        with source.reading():
            model = fill()
        types = Counter(s.qtype.name for s in stored.values())
        log.info("AuraFlow GGUF %s: %s; %.1f MiB of tensors, run in %s", path.name,
                 ", ".join(f"{n} {k}" for k, n in types.most_common()),
                 sum(s.nbytes for s in stored.values()) / 2**20, str(compute_dtype).replace("torch.", ""))
        return model

    return (planned, finish) if deferred else finish()
