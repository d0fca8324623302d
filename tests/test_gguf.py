"""GGUF and fp8 transformers kept quantized: every dequantization kernel against gguf-py, whole transformers against
diffusers given the same weights decoded by gguf-py (or by ``w.float() * scale``), memory, patches, refusals.

Real files in tmp_path, written the way ComfyUI-GGUF's tools and ComfyUI's fp8 converter write them
(`aura_flow.weights.writers`); tiny random transformers, fixed inputs, fp32."""
from __future__ import annotations

import weakref

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aura_flow.errors import LoadError
from aura_flow.weights.devices import module_bytes
from aura_flow.tiny import transformer_config, transformer_to_original
from aura_flow.weights.fp8 import has_fp8_weights, is_scaled_fp8, load_fp8_transformer
from aura_flow.weights.gguf import is_gguf, load_gguf_transformer
from aura_flow.weights.gguf_dequant import FLOAT_TYPES, KERNELS, dequantize
from aura_flow.weights.quantized_linear import GGUFLinear, ScaledFp8Linear
from aura_flow.weights.writers import build_tiny_gguf, can_quantize, random_blocks, write_fp8, write_gguf

Q = gguf.GGMLQuantizationType
PREFIX = "model.diffusion_model."


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


@pytest.mark.parametrize("qtype", [*KERNELS], ids=lambda q: q.name)
def test_chunked_dequantize_into_half_precision_equals_one_pass(qtype, monkeypatch):
    """Into bf16 or fp16 a large tensor is dequantized a chunk at a time (the float32 stage holds one chunk): the
    same values as float32 first and one cast, whatever the chunk and a short last chunk."""
    import aura_flow.weights.gguf_dequant as deq

    blocks = torch.from_numpy(random_blocks(qtype, 37, np.random.default_rng(1)))
    shape = (37, gguf.GGML_QUANT_SIZES[qtype][0])
    whole = dequantize(blocks, qtype, shape)
    monkeypatch.setattr(deq, "CHUNK_VALUES", 5 * shape[1])  # 8 chunks, the last of 2 blocks
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize(blocks, qtype, shape, dtype), whole.to(dtype))


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


def test_a_hosts_weight_functions_run_on_the_computed_weight():
    """ComfyUI's lowvram path puts its patches in weight_function / bias_function: they see the dequantized weight
    in the compute dtype (never the stored blocks or fp8), before the layer's own patches; per layer lists."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((48, 64)).astype(np.float32) * 0.05
    blocks = gguf.quants.quantize(w, Q.Q8_0)
    layer = GGUFLinear(torch.from_numpy(blocks.reshape(-1)), Q.Q8_0, 48, 64, torch.randn(48))
    other = GGUFLinear(torch.from_numpy(blocks.reshape(-1)), Q.Q8_0, 48, 64, torch.randn(48))
    assert layer.comfy_cast_weights is False and layer.weight_function == [] and layer.weight_function is not \
        other.weight_function
    base = torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q8_0))
    seen = []
    layer.weight_function.append(lambda wt: seen.append((wt.dtype, wt.shape)) or wt * 2)
    layer.bias_function.append(lambda b: b + 1)
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), F.linear(x, base * 2, layer.bias + 1), rtol=1e-5, atol=1e-6)
    assert seen == [(torch.float32, (48, 64))] and other.weight_function == []


# ---------------------------------------------------------------- tiny transformers
RTOL = 1e-4  # relative, on the transformer's output in fp32
# head dim 16: wide enough (64) that most linears exceed the converter's 1024-value F32 threshold; 256 wide for the
# K-quants, whose blocks are 256 values a row
WIDTHS = {64: dict(attention_head_dim=16, num_attention_heads=4), 256: dict(attention_head_dim=64,
                                                                           num_attention_heads=4)}


def _config(width):
    cfg = transformer_config("tiny")
    cfg.update(WIDTHS[width], caption_projection_dim=width)
    return cfg


@pytest.fixture(scope="module")
def sources():
    """width -> (config, original-key state dict) of a seeded random transformer."""
    from diffusers import AuraFlowTransformer2DModel

    out = {}
    for width in WIDTHS:
        torch.manual_seed(width)
        model = AuraFlowTransformer2DModel(**_config(width))
        out[width] = (_config(width), transformer_to_original(model.state_dict()))
    return out


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 6, cfg["joint_attention_dim"], generator=g),
                timestep=torch.tensor([0.3, 0.8]))


def _run(model, cfg):
    with torch.no_grad():
        return model(**_inputs(cfg)).sample


def _diffusers_reference(original: dict, cfg):
    """diffusers' own transformer, given ``original`` (original keys, decoded tensors) through diffusers' converter."""
    from diffusers import AuraFlowTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_auraflow_transformer_checkpoint_to_diffusers

    model = AuraFlowTransformer2DModel(**cfg)
    sd = convert_auraflow_transformer_checkpoint_to_diffusers(dict(original))
    expected = model.state_dict()
    model.load_state_dict({k: v.float().reshape(expected[k].shape) for k, v in sd.items()}, strict=True)
    return model.eval()


def _gguf_py_decoded(path) -> dict:
    """The file's tensors decoded by gguf-py alone, original names, prefix removed."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        field = reader.get_field("comfy.gguf.orig_shape." + t.name)
        shape = [int(field.parts[i][0]) for i in field.data] if field else list(reversed(t.shape.tolist()))
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[t.name.removeprefix(PREFIX)] = torch.from_numpy(values).reshape(shape)
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- whole transformers from GGUF
CASES = {  # id: (width, qtypes, writer options)
    "Q8_0": (64, "Q8_0", {}),
    "Q4_0-prefix": (64, "Q4_0", dict(prefix=PREFIX)),
    "Q4_1": (64, "Q4_1", {}),
    "Q5_0-prefix": (64, "Q5_0", dict(prefix=PREFIX)),
    "Q5_1": (64, "Q5_1", {}),
    "BF16-prefix": (64, "BF16", dict(prefix=PREFIX)),
    "F16": (64, "F16", {}),
    "Q8_0-orig_shape": (64, "Q8_0", dict(prefix=PREFIX, orig_shape=True)),
    "Q4_0-llama_cpp_dims": (64, "Q4_0", dict(drop_unit_dims=True)),
    "MXFP4-gguf_py": (64, "MXFP4", {}),
    "K-quants-prefix": (256, ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"], dict(prefix=PREFIX)),
    "K-quants": (256, ["Q6_K", "Q4_K", "Q5_K"], {}),
}


@pytest.mark.parametrize("case", CASES)
def test_gguf_transformer_matches_diffusers(case, sources, tmp_path):
    width, qtypes, options = CASES[case]
    cfg, original = sources[width]
    path = write_gguf(tmp_path / f"{case}.gguf", original, qtypes, head_dim=cfg["attention_head_dim"], **options)
    model = load_gguf_transformer(path, torch.float32)

    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    wanted = {qtypes} if isinstance(qtypes, str) else set(qtypes)
    assert {m.qtype.name for m in layers} & wanted == wanted  # every requested type is really in play
    assert model.config.attention_head_dim == cfg["attention_head_dim"]  # from the file's head-dim key
    reference = _diffusers_reference(_gguf_py_decoded(path), cfg)
    out, ref = _run(model, cfg), _run(reference, cfg)
    assert _rel(out, ref) < RTOL


def test_gguf_without_head_dim_key_falls_back_like_the_loader(sources, tmp_path):
    cfg, original = sources[256]
    path = write_gguf(tmp_path / "nokey.gguf", original, "Q8_0")
    model = load_gguf_transformer(path, torch.float32)
    assert (model.config.attention_head_dim, model.config.num_attention_heads) == (256, 1)  # AuraFlow's head dim


def test_build_tiny_gguf_holds_the_tiny_transformer(tmp_path):
    """The benchmark's helper: aura_flow.tiny's transformer, its other parts beside it; F32 reproduces it exactly,
    and a bf16 compute dtype runs the same layers within bf16's precision."""
    from aura_flow.tiny import build_modules

    path = build_tiny_gguf(tmp_path, "F32")
    assert {"text_encoder.safetensors", "vae.safetensors", "tokenizer.model"} <= {p.name for p in tmp_path.iterdir()}
    reference, _, _ = build_modules("tiny")
    cfg = dict(reference.config)
    exact = _run(load_gguf_transformer(path, torch.float32), cfg)
    assert torch.equal(exact, _run(reference, cfg))
    q8 = load_gguf_transformer(build_tiny_gguf(tmp_path / "q8", "Q8_0"), torch.bfloat16)
    with torch.no_grad():
        out = q8(**{k: v.to(torch.bfloat16) for k, v in _inputs(cfg).items()}).sample
    assert out.dtype == torch.bfloat16 and _rel(out.float(), exact) < 0.03


def test_resident_bytes_are_the_files_and_one_layer_is_dequantized_at_a_time(sources, tmp_path):
    cfg, original = sources[256]
    path = write_gguf(tmp_path / "q4.gguf", original, "Q4_0", prefix=PREFIX)
    model = load_gguf_transformer(path, torch.float32)
    reader = gguf.GGUFReader(path)
    file_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    # linears hold exactly their bytes from the file; the rest (position grid, register tokens, biases) is decoded
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    decoded = module_bytes(model) - sum(m.stored_bytes() for m in layers)
    linear_file_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.removeprefix(PREFIX) not in
                            ("positional_encoding", "register_tokens") and t.name.endswith(".weight"))
    assert sum(m.stored_bytes() for m in layers) == linear_file_bytes
    assert decoded == sum(p.numel() * 4 for p in model.parameters())
    assert module_bytes(model) <= file_bytes + decoded
    dense = sum(t.numel() * 4 for t in original.values())
    assert module_bytes(model) < 0.25 * dense  # Q4_0 is 4.5 bits a weight

    alive, refs = [], []

    class Counting(GGUFLinear):
        def compute_weight(self, dtype, device):
            w = super().compute_weight(dtype, device)
            refs.append(weakref.ref(w))
            alive.append(sum(r() is not None for r in refs))
            return w

    for m in layers:
        m.__class__ = Counting
    _run(model, cfg)
    assert len(alive) == len(layers) and max(alive) == 1


def test_to_moves_blocks_and_never_casts_them(sources, tmp_path):
    cfg, original = sources[64]
    model = load_gguf_transformer(write_gguf(tmp_path / "q8.gguf", original, "Q8_0"), torch.float32)
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.to(torch.float16)
    assert all(torch.equal(b, before[n]) and b.dtype == torch.uint8 for n, b in model.named_buffers())
    assert all(p.dtype == torch.float16 for p in model.parameters())
    model.to("meta")  # a device move (the CPU-only stand-in for CUDA) takes the blocks along
    assert all(b.is_meta for b in model.buffers())


@pytest.mark.parametrize("arch", ["flux", "llama"])
def test_gguf_of_another_architecture_is_refused(arch, sources, tmp_path):
    _, original = sources[64]
    path = write_gguf(tmp_path / f"{arch}.gguf", original, "Q8_0", arch=arch)
    with pytest.raises(LoadError, match=f"{arch}.gguf: a GGUF of architecture '{arch}', not an AuraFlow"):
        load_gguf_transformer(path, torch.float32)


def test_not_a_gguf(tmp_path, sources):
    _, original = sources[64]
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    assert is_gguf(fake) and not is_gguf(write_fp8(tmp_path / "a.safetensors", original))
    with pytest.raises(LoadError, match="model.gguf: not a readable GGUF file"):
        load_gguf_transformer(fake, torch.float32)
    with pytest.raises(LoadError, match="a.safetensors: not a GGUF file"):
        load_gguf_transformer(tmp_path / "a.safetensors", torch.float32)


def test_incomplete_gguf_names_what_is_missing(sources, tmp_path):
    _, original = sources[64]
    partial = {k: v for k, v in original.items() if not k.startswith("single_layers.0.mlp")}
    with pytest.raises(LoadError, match=r"incomplete.gguf: the transformer is missing 3 tensors"):
        load_gguf_transformer(write_gguf(tmp_path / "incomplete.gguf", partial, "Q8_0"), torch.float32)


# ---------------------------------------------------------------- fp8 safetensors
FP8_CASES = {
    "scaled": dict(scaled=True),
    "scaled-per_row-scale_input": dict(scaled=True, per_row=True, scale_input=True),
    "scaled-no_prefix": dict(scaled=True, prefix=""),
    "plain-e5m2": dict(scaled=False, fp8_dtype=torch.float8_e5m2),
}


@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_transformer_matches_diffusers(case, sources, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    cfg, original = sources[64]
    options = FP8_CASES[case]
    path = write_fp8(tmp_path / f"{case}.safetensors", original, **options)
    sd = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert is_scaled_fp8(sd, metadata) == options["scaled"] and has_fp8_weights(sd)
    model = load_fp8_transformer(sd, path, torch.float32, {"aura_flow.attention_head_dim": "16"})

    layers = [m for m in model.modules() if isinstance(m, ScaledFp8Linear)]
    fp8_weights = [k for k, v in sd.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and v.dim() == 2]
    assert len(layers) == len(fp8_weights) > 10
    assert all(m.weight.dtype == options.get("fp8_dtype", torch.float8_e4m3fn) for m in layers)
    # the reference: w.float() * scale_weight for every scaled weight, the rest as stored
    prefix = options.get("prefix", PREFIX)
    decoded = {}
    for k, v in sd.items():
        if not k.startswith(prefix) or k.endswith(("scaled_fp8", ".scale_weight", ".scale_input")):
            continue
        scale = sd.get(k[:-len(".weight")] + ".scale_weight")
        decoded[k[len(prefix):]] = v.float() * (scale.reshape(-1, 1) if scale is not None and scale.numel() > 1
                                                else (scale if scale is not None else 1.0))
    out, ref = _run(model, cfg), _run(_diffusers_reference(decoded, cfg), cfg)
    assert _rel(out, ref) < RTOL
    # resident: the fp8 bytes and float32 scales of the file, nothing more
    file_bytes = sum(v.numel() * v.element_size() for k, v in sd.items() if k in fp8_weights or
                     k.endswith(".scale_weight"))
    assert sum(m.stored_bytes() for m in layers) == file_bytes


def test_fp8_refuses_formats_it_does_not_read(sources, tmp_path):
    import json

    from safetensors.torch import load_file

    cfg, original = sources[64]
    sd = load_file(write_fp8(tmp_path / "x.safetensors", original))
    meta = {"_quantization_metadata": json.dumps({"layers": {"double_layers.0.attn.w1q": {"format": "nvfp4"}}})}
    with pytest.raises(LoadError, match="nvfp4.*float8 layers only"):
        load_fp8_transformer(sd, tmp_path / "x.safetensors", torch.float32, meta)


