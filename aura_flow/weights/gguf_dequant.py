"""GGUF blocks to float tensors, in torch, on whatever device the blocks are on.

A quantized GGUF tensor is a run of fixed-size blocks, each holding ``block_size`` consecutive values of the
flattened tensor (``gguf.GGML_QUANT_SIZES[qtype] == (block_size, type_size)``). The kernels below unpack the block
layouts of ggml (``ggml-common.h``) that users' files hold — the legacy Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants
Q2_K…Q6_K — with whole-tensor integer ops, no Python loop over blocks, so they run on the CPU and on CUDA alike.
Every kernel does gguf-py's arithmetic in the same order in float32, so its output equals
``gguf.quants.dequantize`` bit for bit (tests/test_gguf.py checks each type). Any other type gguf-py can unpack (the
IQ and ternary types, MXFP4) goes through gguf-py on the CPU: correct, but slow.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import gguf
import numpy as np
import torch

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
QK_K = 256  # values per K-quant super-block


# ---------------------------------------------------------------- field helpers
def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 scalar at byte ``at`` of every block, as float32 of shape (n, 1)."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


@lru_cache(maxsize=64)
def _shift_column(shifts: tuple, device: torch.device) -> torch.Tensor:
    """The shifts as a (k, 1) uint8 column on ``device``, made once (not one host-to-device copy per layer call)."""
    return torch.tensor(shifts, dtype=torch.uint8, device=device).view(-1, 1)


def _shifted(x: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """``(x >> s) & mask`` for each shift ``s``, stacked on a new axis just before the last one."""
    return (x.unsqueeze(-2) >> _shift_column(tuple(shifts), x.device)) & mask


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k) 4-bit values: the k low nibbles, then the k high ones (ggml's order). Written
    straight into one buffer (no intermediate per shift)."""
    n, k = qs.shape
    out = torch.empty(n, 2 * k, dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=out[:, :k])
    torch.bitwise_right_shift(qs, 4, out=out[:, k:])
    return out


def _bit_planes(bits: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 8k) single bits: bit 0 of every byte, then bit 1 of every byte, … (ggml's ``hmask`` order)."""
    return _shifted(bits, range(8), 1).flatten(1)


def _le_bits(b: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes of a little-endian bit field -> (n, 8k) bits, bit j of the field at index j."""
    return _shifted(b, range(8), 1).transpose(-1, -2).flatten(1)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, as float32 (n, 8, 1) each.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7; bytes 4-7 the same for the mins;
    bytes 8-11 the low nibbles of scales 4-7 (low half) and of mins 4-7 (high half)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=1)
    mins = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=1)
    return scales.float().unsqueeze(-1), mins.float().unsqueeze(-1)


# ---------------------------------------------------------------- legacy quants: 32 values a block
# The legacy kernels work in place on their one float32 buffer: the per-call dequantization of a large layer
# otherwise makes a float32 temporary per operation (time, and peak memory while generating).
def _q8_0(b):  # d:f16, qs:int8[32]
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b):  # d:f16, qs:u8[16]
    return _nibbles(b[:, 2:]).view(torch.int8).sub_(8).float().mul_(_f16(b, 0))


def _q4_1(b):  # d:f16, m:f16, qs:u8[16]
    return _nibbles(b[:, 4:]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b):  # d:f16, qh:u32, qs:u8[16]
    q = _nibbles(b[:, 6:]).bitwise_or_(_le_bits(b[:, 2:6]) << 4)
    return q.view(torch.int8).sub_(16).float().mul_(_f16(b, 0))


def _q5_1(b):  # d:f16, m:f16, qh:u32, qs:u8[16]
    q = _nibbles(b[:, 8:]).bitwise_or_(_le_bits(b[:, 4:8]) << 4)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


# ---------------------------------------------------------------- K-quants: 256 values a block
def _two_bit_runs(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K / Q3_K low bits: (n, 64) bytes -> (n, 256) 2-bit values; each 32-byte half yields 128 values, its bits
    0-1 first, then 2-3, 4-5, 6-7."""
    n = qs.shape[0]
    return _shifted(qs.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, QK_K)


def _q2_k(b):  # scales:u8[16] (low nibble scale, high nibble min), qs:u8[64], d:f16, dmin:f16
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0x0F).float()).unsqueeze(-1)
    ml = (_f16(b, 82) * (sc >> 4).float()).unsqueeze(-1)
    q = _two_bit_runs(b[:, 16:80]).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):  # hmask:u8[32], qs:u8[64], scales:12 bytes of 16 six-bit values, d:f16
    n = b.shape[0]
    packed = b[:, 96:108]
    low = _nibbles(packed[:, :8])  # 16 low nibbles
    high = _shifted(packed[:, 8:12], (0, 2, 4, 6), 3).flatten(1)  # value i: bits 2*(i//4) of byte 8 + i%4
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 108) * scales).unsqueeze(-1)
    hbit = _bit_planes(b[:, :32]) ^ 1  # a clear bit subtracts 4
    q = _two_bit_runs(b[:, 32:96]).to(torch.int8) - (hbit << 2).to(torch.int8)
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


def _q4_k(b):  # d:f16, dmin:f16, scales:12 bytes, qs:u8[128]
    n = b.shape[0]
    sc, m = _k_scales_mins(b[:, 4:16])
    d, dm = _f16(b, 0).unsqueeze(-1) * sc, _f16(b, 2).unsqueeze(-1) * m
    q = _nibbles(b[:, 16:].reshape(n * 4, 32)).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b):  # d:f16, dmin:f16, scales:12 bytes, qh:u8[32], qs:u8[128]
    n = b.shape[0]
    sc, m = _k_scales_mins(b[:, 4:16])
    d, dm = _f16(b, 0).unsqueeze(-1) * sc, _f16(b, 2).unsqueeze(-1) * m
    q = _nibbles(b[:, 48:].reshape(n * 4, 32)).reshape(n, 8, 32) | (_bit_planes(b[:, 16:48]).reshape(n, 8, 32) << 4)
    return (d * q.float() - dm).reshape(n, QK_K)


def _q6_k(b):  # ql:u8[128], qh:u8[64], scales:int8[16], d:f16
    n = b.shape[0]
    low = _nibbles(b[:, :128].reshape(n * 2, 64)).reshape(n, 8, 32)
    high = _shifted(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
    return (d * q).reshape(n, QK_K)


KERNELS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
           Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
# stored as plain floats: read by reinterpreting the bytes
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


# ---------------------------------------------------------------- public
CHUNK_VALUES = 1 << 20  # values dequantized at a time into a result of another dtype than float32


@lru_cache(maxsize=None)
def can_dequantize(qtype: Q) -> bool:
    """Whether this module can unpack ``qtype``: a torch kernel, a float type, or gguf-py's numpy fallback."""
    if qtype in KERNELS or qtype in FLOAT_TYPES:
        return True
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def tensor_bytes(qtype: Q, numel: int) -> int:
    """Bytes that ``numel`` values take in ``qtype``."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return numel // block_size * type_size


def dequantize(raw: torch.Tensor, qtype: Q, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of logical ``shape`` that the uint8 bytes ``raw`` hold in ``qtype``, as ``dtype`` on raw's device.

    ``raw`` is the tensor's bytes in file order (any shape: only the byte sequence matters, since blocks run over the
    flattened tensor). Quantized types unpack to float32, then cast once to ``dtype``."""
    shape = tuple(int(s) for s in shape)
    flat = raw.reshape(-1)
    if qtype in FLOAT_TYPES:
        return flat.view(FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = flat.reshape(-1, type_size)
    kernel = KERNELS.get(qtype)
    if kernel is not None and dtype != torch.float32 and blocks.shape[0] * block_size > CHUNK_VALUES:
        # into the result a chunk at a time: the float32 stage never holds more than a chunk (a 3072x18432 layer
        # in bf16 otherwise needs its 216 MiB float32 copy beside the 108 MiB result) and stays in the cache
        out = torch.empty(blocks.shape[0], block_size, dtype=dtype, device=raw.device)
        step = max(1, CHUNK_VALUES // block_size)
        for i in range(0, blocks.shape[0], step):
            out[i:i + step].copy_(kernel(blocks[i:i + step]))
        return out.reshape(shape)
    if kernel is not None:
        values = kernel(blocks)
    else:  # gguf-py's numpy code: slow, and a round trip through the CPU
        log.debug("dequantizing %s %s through gguf-py on the CPU", qtype.name, shape)
        values = torch.from_numpy(gguf.quants.dequantize(blocks.cpu().numpy(), qtype)).to(raw.device)
    return values.reshape(shape).to(dtype)
