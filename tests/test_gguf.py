"""GGUF dequantization kernels against gguf-py, type by type, on real blocks."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from aura_flow.weights.gguf_dequant import FLOAT_TYPES, KERNELS, dequantize
from aura_flow.weights.writers import can_quantize, random_blocks

Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------- kernels
def _real_blocks(qtype, rng):
    """Blocks of ``qtype``: gguf-py's quantization of Gaussian weights where it has one, else valid random blocks."""
    if can_quantize(qtype):
        return gguf.quants.quantize(rng.standard_normal((16, 512)).astype(np.float32) * 0.05, qtype)
    return random_blocks(qtype, 32, rng)


@pytest.mark.parametrize("qtype", [*KERNELS, *FLOAT_TYPES], ids=lambda q: q.name)
def test_kernel_equals_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    for blocks in (_real_blocks(qtype, rng), _real_blocks(qtype, rng)[::-1].copy()):
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(blocks, qtype), dtype=np.float32))
        ours = dequantize(torch.from_numpy(blocks.view(np.uint8)), qtype, ref.shape)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, ref), f"{qtype.name}: max diff {(ours - ref).abs().max().item()}"
    # every bit pattern of the packed fields (random bytes), with finite scales
    if qtype in KERNELS:
        blocks = random_blocks(qtype, 256, rng)
        ref = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
        assert torch.equal(dequantize(torch.from_numpy(blocks), qtype, ref.shape), ref)


@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.TQ2_0, Q.IQ4_NL], ids=lambda q: q.name)
def test_other_types_go_through_gguf_py(qtype):
    rng = np.random.default_rng(0)
    blocks = _real_blocks(qtype, rng)
    ref = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    out = dequantize(torch.from_numpy(blocks), qtype, ref.shape, torch.bfloat16)
    assert qtype not in KERNELS and out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))
