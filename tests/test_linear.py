"""`PatchableLinear`'s plain path (no patches, nothing to cast) and the float32 CPU GEMM it picks: the same layer
as ``nn.Linear`` up to GEMM rounding, patches and casts still taking the full path. No timing here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from aura_flow.weights import linear as lin
from aura_flow.weights.linear import ONEDNN_MIN_MACS, PatchableLinear, cpu_gemm, set_cpu_gemm


@pytest.fixture
def gemm():
    before = cpu_gemm()
    yield set_cpu_gemm
    set_cpu_gemm(before)


def _pair(i=256, o=512, dtype=torch.float32):
    torch.manual_seed(0)
    ref = nn.Linear(i, o).to(dtype)
    layer = PatchableLinear(i, o, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        layer.bias.copy_(ref.bias)
    return ref, layer


class Delta:
    """A dense ΔW patch (no low-rank form)."""

    def __init__(self, w):
        self.w = w

    def delta_weight(self, dtype, device):
        return self.w.to(device, dtype)

    def delta_output(self, x):
        return None


@pytest.mark.parametrize("name", lin.GEMMS)
def test_plain_layer_is_nn_linear(gemm, name):
    if name == "onednn" and not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pytest.skip("no oneDNN linear in this torch")
    gemm(name)
    ref, layer = _pair()
    x = torch.randn(2, 64, 256)  # 2*64*256*512 multiply-adds: above the oneDNN threshold
    assert x.numel() * 512 >= ONEDNN_MIN_MACS
    with torch.inference_mode():
        out = layer(x)
    if name == "blas":
        assert torch.equal(out, ref(x))
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-5)
    small = torch.randn(1, 4, 256)  # below it: plain F.linear whatever the setting
    assert torch.equal(layer(small), ref(small))


def test_onednn_and_blas_agree_and_autograd_still_works(gemm):
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("no oneDNN linear in this torch")
    _, layer = _pair(512, 1024)
    x = torch.randn(3, 100, 512)
    outs = {}
    for name in lin.GEMMS:
        gemm(name)
        outs[name] = layer(x)
    torch.testing.assert_close(outs["onednn"], outs["blas"], rtol=0, atol=1e-5)
    gemm("onednn")
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()  # recorded by autograd: the BLAS path, which has a backward
    torch.testing.assert_close(xg.grad, layer.weight.sum(0).expand_as(x), rtol=0, atol=1e-4)


def test_patches_and_casts_take_the_full_path(gemm):
    gemm("onednn")
    ref, layer = _pair()
    x = torch.randn(2, 64, 256)
    delta = torch.randn(512, 256) * 0.01
    layer.patches = ((Delta(delta), 0.5),)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, ref.weight + 0.5 * delta, ref.bias),
                                   rtol=0, atol=1e-5)
        layer.patches = ()
        half = layer(x.bfloat16())  # an fp32 layer run in bf16: cast per call, not the plain path
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref(x), rtol=0.05, atol=0.05)


def test_gemm_setting_is_checked(gemm, monkeypatch):
    with pytest.raises(ValueError, match="cpu gemm 'mkl'"):
        gemm("mkl")
    monkeypatch.setenv("AURAFLOW_CPU_GEMM", "blas")
    assert lin._default_gemm() == "blas"
    gemm("auto")
    assert cpu_gemm() == "blas"


def test_a_hosts_streaming_and_weight_hooks_are_never_skipped(gemm):
    """ComfyUI's ModelPatcher marks a streamed layer ``comfy_cast_weights`` and puts its own patches in
    ``weight_function`` / ``bias_function``: the plain path must not bypass either."""
    gemm("onednn")
    ref, layer = _pair()
    x = torch.randn(2, 64, 256)
    computed = []
    layer.compute_weight = lambda dtype, device: computed.append(device) or layer.weight.to(device, dtype)
    with torch.inference_mode():
        layer(x)
        assert computed == []  # nothing to do: the plain path
        layer.comfy_cast_weights = True
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-5)
        assert computed == [x.device]
        layer.comfy_cast_weights = False
        layer.weight_function.append(lambda w: w * 2)
        layer.bias_function.append(lambda b: b - 1)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, ref.weight * 2, ref.bias - 1), rtol=0, atol=1e-5)
        layer.weight_function.clear()
        layer.bias_function.append(lambda b: b + 1)
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-5)
