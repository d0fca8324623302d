"""GGUF dequantization kernels against gguf-py, type by type, on real blocks; patches on the stored-form layers."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aura_flow.weights.gguf_dequant import FLOAT_TYPES, KERNELS, dequantize
from aura_flow.weights.quantized_linear import GGUFLinear, ScaledFp8Linear
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


# ---------------------------------------------------------------- patches on stored layers
class DensePatch:
    def __init__(self, delta):
        self.delta = delta

    def delta_weight(self, dtype, device):
        return self.delta.to(device=device, dtype=dtype)

    def delta_output(self, x):
        return None


class LowRankPatch:
    def __init__(self, down, up):
        self.down, self.up = down, up

    def delta_weight(self, dtype, device):
        return (self.up @ self.down).to(device=device, dtype=dtype)

    def delta_output(self, x):
        return x @ self.down.T @ self.up.T


def _check_patches(layer, weight):
    g = torch.Generator().manual_seed(3)
    out_f, in_f = weight.shape
    dense = DensePatch(torch.randn(out_f, in_f, generator=g) * 0.01)
    low = LowRankPatch(torch.randn(2, in_f, generator=g), torch.randn(out_f, 2, generator=g) * 0.01)
    x = torch.randn(5, in_f, generator=g)
    layer.patches = ((dense, 0.7), (low, -1.5))
    expected = F.linear(x, weight + 0.7 * dense.delta + -1.5 * low.up @ low.down, layer.bias)
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.patches = ()
    assert torch.allclose(layer(x), F.linear(x, weight, layer.bias), rtol=1e-6, atol=1e-7)


def test_patches_apply_on_gguf_and_fp8_layers():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((48, 64)).astype(np.float32) * 0.05
    blocks = gguf.quants.quantize(w, Q.Q5_1)
    layer = GGUFLinear(torch.from_numpy(blocks.reshape(-1)), Q.Q5_1, 48, 64, torch.randn(48))
    _check_patches(layer, torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q5_1)))

    fp8 = torch.from_numpy(w).to(torch.float8_e4m3fn)
    layer = ScaledFp8Linear(fp8, torch.tensor(0.25), torch.randn(48))
    _check_patches(layer, fp8.float() * 0.25)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.scale_weight.dtype == torch.float32
