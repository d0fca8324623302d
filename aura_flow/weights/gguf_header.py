"""A GGUF header walked with every count checked against the bytes present, before gguf-py reads it.

gguf-py's reader trusts the file's counts: an array that claims 10⁸ elements in a 200-byte file makes it loop 10⁸
times over empty slices (its memory map returns nothing past the end, never an error). `check_header` walks the
same structure (key/value pairs, arrays, tensor infos) in bounded work: a count is accepted only when the bytes
left can hold that many of the smallest item, arrays of fixed-size items are skipped in one step, nesting is
bounded, and the walk stops at `MAX_HEADER_BYTES`. A header that fails is a `LoadError` naming the file and the
field, so gguf-py only ever sees a header whose every count fits the file.
"""
from __future__ import annotations

import math
import os
import struct

import gguf

from ..errors import LoadError, shown

MAX_HEADER_BYTES = 256 * 1024 * 1024  # LLM files with big vocabularies have headers of a few tens of MiB
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 3
# GGUFValueType -> size of one value (STRING = 8 and ARRAY = 9 have variable sizes)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Walk:
    def __init__(self, path, data: bytes, size: int):
        self.path, self.data, self.size, self.pos = path, data, size, 0
        self.order = "<"

    def fail(self, what: str):
        raise LoadError(f"{self.path}: not a readable GGUF file: {what}; it is truncated, damaged or of another "
                        "format. Download it again.")

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > len(self.data):
            beyond = " (the header is larger than this reader takes)" if len(self.data) < self.size else ""
            self.fail(f"{what} needs {n:,} bytes at offset {self.pos:,}, past the end of the "
                      f"{self.size:,}-byte file{beyond}")

    def u32(self, what) -> int:
        self.need(4, what)
        (value,) = struct.unpack_from(self.order + "I", self.data, self.pos)
        self.pos += 4
        return value

    def u64(self, what) -> int:
        self.need(8, what)
        (value,) = struct.unpack_from(self.order + "Q", self.data, self.pos)
        self.pos += 8
        return value

    def string(self, what) -> str:
        n = self.u64(what)
        self.need(n, what)
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} {shown(raw)} is not UTF-8 text")

    def count(self, what, smallest: int) -> int:
        """A count of items of at least ``smallest`` bytes each, checked against the bytes left."""
        n = self.u64(what)
        left = len(self.data) - self.pos
        if n * smallest > left:
            self.fail(f"{what} claims {n:,} items, but only {left:,} bytes follow")
        return n

    def value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[kind], what)
            self.pos += _SCALAR_SIZES[kind]
        elif kind == _STRING:
            self.string(what)
        elif kind == _ARRAY:
            if depth >= MAX_NESTING:
                self.fail(f"{what}: arrays nested over {MAX_NESTING} deep")
            item = self.u32(what)
            if item in _SCALAR_SIZES:
                n = self.count(what, _SCALAR_SIZES[item])
                self.pos += n * _SCALAR_SIZES[item]  # checked by count: fixed-size items in one step
            elif item in (_STRING, _ARRAY):
                for _ in range(self.count(what, 8)):  # each item at least its 8-byte length: bounded by the bytes
                    self.value(item, what, depth + 1)
            else:
                self.fail(f"{what}: unknown array item type {item}")
        else:
            self.fail(f"{what}: unknown value type {kind}")


def check_header(path) -> None:
    """LoadError naming ``path`` and the field unless every count, length and type of its GGUF header fits the
    file (see the module docstring); reads at most `MAX_HEADER_BYTES`."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            data = fh.read(min(size, MAX_HEADER_BYTES))
    except OSError as exc:
        raise LoadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    walk = _Walk(path, data, size)
    walk.need(24, "the header")
    if data[:4] != b"GGUF":
        walk.fail("it does not start with 'GGUF'")
    walk.pos = 4
    version = walk.u32("the version")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        walk.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        walk.fail(f"version {version} (this reader takes 2 and 3)")
    tensors = walk.u64("the tensor count")
    pairs = walk.count("the metadata count", 8 + 4 + 1)  # a key's length, its type, a one-byte value at least
    alignment = 32  # GGUF_DEFAULT_ALIGNMENT
    for i in range(pairs):
        key = walk.string(f"metadata key #{i}")
        kind = walk.u32(f"the type of {shown(key)}")
        if key == "general.alignment" and kind == 4:
            alignment = walk.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                walk.fail(f"general.alignment={alignment} is not a power of two")
            continue
        walk.value(kind, f"metadata {shown(key)}")
    left = len(data) - walk.pos
    if tensors * (8 + 4 + 4 + 8) > left:  # name length, dims count, type, offset
        walk.fail(f"the tensor count claims {tensors:,} tensors, but only {left:,} bytes follow")
    tensors_info = []
    for i in range(tensors):
        name = walk.string(f"tensor name #{i}")
        dims = walk.u32(f"the dimensions of tensor {shown(name)}")
        if not 1 <= dims <= MAX_DIMS:
            walk.fail(f"tensor {shown(name)} has {dims} dimensions (1..{MAX_DIMS})")
        shape = [walk.u64(f"the shape of tensor {shown(name)}") for _ in range(dims)]
        if any(d >= 1 << 40 for d in shape):
            walk.fail(f"tensor {shown(name)} has shape {shape}")
        kind = walk.u32(f"the type of tensor {shown(name)}")
        offset = walk.u64(f"the offset of tensor {shown(name)}")
        try:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            walk.fail(f"tensor {shown(name)} has unknown type {kind}")
        tensors_info.append((name, math.prod(shape), block, block_bytes, offset))
    start = walk.pos + (-walk.pos % alignment)
    for name, numel, block, block_bytes, offset in tensors_info:
        end = start + offset + numel // block * block_bytes
        if numel % block or end > size:
            walk.fail(f"tensor {shown(name)} ({numel:,} values) " + (
                f"ends at byte {end:,}, past the end of the {size:,}-byte file" if end > size
                else f"is not a whole number of {block}-value blocks"))


__all__ = ["check_header", "MAX_HEADER_BYTES"]
