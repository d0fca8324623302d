"""LoRA files in every format the pack reads, made by the formats' own libraries (peft, lycoris) or written by hand
(kohya / ComfyUI keys), applied as patches to a transformer loaded by `aura_flow.load`, and compared with the same
LoRA merged by the format's own tool and run in plain diffusers."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from aura_flow.errors import LoadError, ParameterError
from aura_flow.lora import LoraFile, apply_loras, prepare_lora
from aura_flow.lora.patches import DoraPatch, Factor, LoHaPatch, LoKrPatch, PermutedRows, swap_halves
from aura_flow.weights.linear import patchable_layers

TOL = 1e-4  # fp32, relative to the output's largest magnitude


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safetensors.torch import load_file

    from aura_flow.tiny import build_tiny

    dest = tmp_path_factory.mktemp("lora_tiny")
    path = build_tiny(dest, "transformer_only_diffusers")
    files = dict(checkpoint=path, text_encoder=dest / "text_encoder.safetensors", vae=dest / "vae.safetensors")
    return dict(files=files, sd=load_file(str(path)))


@pytest.fixture(scope="module")
def pack(tiny):
    import aura_flow

    return aura_flow.load(tiny["files"]["checkpoint"], text_encoder=tiny["files"]["text_encoder"],
                          vae=tiny["files"]["vae"], device="cpu").transformer


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "pack" in request.fixturenames:
        apply_loras(request.getfixturevalue("pack"), [])


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(2, 8, 32, generator=g), timestep=torch.tensor([0.3, 0.8]))


def reference(sd):
    """Plain diffusers transformer with weights ``sd``."""
    from diffusers import AuraFlowTransformer2DModel

    from aura_flow.tiny import transformer_config

    model = AuraFlowTransformer2DModel(**transformer_config("tiny"))
    model.load_state_dict(sd)
    return model.eval()


def run(model, inputs, dtype=torch.float32):
    with torch.no_grad():
        return model(**{k: v.to(dtype) for k, v in inputs.items()}, return_dict=False)[0].float()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check(pack, inputs, base_out, ref_out, loras, tol=TOL):
    """The pack with ``loras`` matches ``ref_out``, and the LoRA changes the output by far more than ``tol``."""
    apply_loras(pack, loras)
    out = run(pack, inputs)
    assert rel(ref_out, base_out) > 1e-2, "the LoRA barely changes the output: the comparison would prove nothing"
    assert rel(out, ref_out) < tol
    return out


@pytest.fixture(scope="module")
def base_out(tiny, inputs):
    return run(reference(tiny["sd"]), inputs)


def save(tmp_path, name, sd, metadata=None):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------- diffusers / peft
def peft_model(sd, seed=0, **config):
    from peft import LoraConfig, get_peft_model

    model = reference(sd)
    cfg = LoraConfig(target_modules=linear_names(model), **config)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return pm, cfg


@pytest.mark.parametrize("config, metadata", [
    (dict(r=4, lora_alpha=8), True),                                    # alpha != rank, from diffusers' metadata
    (dict(r=4, lora_alpha=4), False),                                   # no metadata: scale 1, as diffusers loads it
    (dict(r=4, lora_alpha=3, use_rslora=True), True),                   # alpha / sqrt(rank)
    (dict(r=4, lora_alpha=8, rank_pattern={"to_q": 2}, alpha_pattern={"ff.linear_1": 3}), True),
], ids=["alpha8", "no-metadata", "rslora", "patterns"])
def test_diffusers_peft_lora_matches_peft_merge(tmp_path, tiny, pack, inputs, base_out, config, metadata):
    from diffusers.loaders.lora_pipeline import AuraFlowLoraLoaderMixin
    from peft import get_peft_model_state_dict

    pm, cfg = peft_model(tiny["sd"], **config)
    sd = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}
    AuraFlowLoraLoaderMixin.save_lora_weights(tmp_path, transformer_lora_layers=sd,
                                              transformer_lora_adapter_metadata=cfg.to_dict() if metadata else None)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert all(k.startswith("transformer.") for k in LoraFile(path).keys)
    ref = run(pm.merge_and_unload(), inputs)
    check(pack, inputs, base_out, ref, [(path, 1.0)])
    report = apply_loras(pack, [(path, 1.0)]).loras[0]
    assert (report.matched, report.modules, report.unmatched) == (30, 30, [])
    assert report.styles == ["diffusers/peft lora"]


def test_peft_save_pretrained_folder_with_adapter_config(tmp_path, tiny, pack, inputs, base_out):
    """peft's own layout: ``base_model.model.`` keys, alpha in adapter_config.json beside the weights."""
    pm, _ = peft_model(tiny["sd"], seed=3, r=3, lora_alpha=5)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    assert next(iter(LoraFile(path).keys)).startswith("base_model.model.")
    check(pack, inputs, base_out, run(pm.merge_and_unload(), inputs), [(tmp_path, 1.0)])  # the folder works too


def test_alpha_tensors_in_diffusers_keys(tmp_path, tiny, pack, inputs, base_out):
    """Converted files keep kohya's per-module ``.alpha`` beside ``lora_A`` / ``lora_B``: scale = alpha / rank."""
    from peft import get_peft_model_state_dict

    pm, _ = peft_model(tiny["sd"], seed=4, r=4, lora_alpha=6)
    sd = {f"transformer.{k.removeprefix('base_model.model.')}": v for k, v in get_peft_model_state_dict(pm).items()}
    sd.update({k.replace("lora_A.weight", "alpha"): torch.tensor(6.0) for k in list(sd) if "lora_A" in k})
    path = save(tmp_path, "with_alpha.safetensors", sd)
    check(pack, inputs, base_out, run(pm.merge_and_unload(), inputs), [(path, 1.0)])


def test_peft_dora_matches_peft_merge(tmp_path, tiny, pack, inputs, base_out):
    from diffusers.loaders.lora_pipeline import AuraFlowLoraLoaderMixin
    from peft import get_peft_model_state_dict

    pm, cfg = peft_model(tiny["sd"], seed=5, r=4, lora_alpha=8, use_dora=True)
    sd = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}
    assert any("lora_magnitude_vector" in k for k in sd)
    AuraFlowLoraLoaderMixin.save_lora_weights(tmp_path, transformer_lora_layers=sd,
                                              transformer_lora_adapter_metadata=cfg.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    check(pack, inputs, base_out, run(pm.merge_and_unload(), inputs), [(path, 1.0)])
    assert all(isinstance(p, DoraPatch) for p in prepare_lora(path, pack).patches.values())


# ---------------------------------------------------------------- lycoris (SimpleTuner)
LYCORIS = {
    "lokr": dict(algo="lokr", linear_dim=2, linear_alpha=3, factor=4),               # w1 full, w2 low rank
    "lokr-both": dict(algo="lokr", linear_dim=2, linear_alpha=1, factor=16, decompose_both=True),
    "lokr-unbalanced": dict(algo="lokr", linear_dim=2, linear_alpha=5, factor=8, unbalanced_factorization=True),
    "lokr-full": dict(algo="lokr", linear_dim=10000, linear_alpha=1, factor=16),   # SimpleTuner's default: scale 1
    "loha": dict(algo="loha", linear_dim=2, linear_alpha=4),
    "lokr-dora": dict(algo="lokr", linear_dim=2, linear_alpha=3, factor=4, dora_wd=True),
    "loha-dora-in": dict(algo="loha", linear_dim=2, linear_alpha=4, dora_wd=True, wd_on_output=False),
    "full": dict(algo="full"),
    "lora": dict(algo="lora", linear_dim=3, linear_alpha=6),
}


NOISE = {"lora": 0.1, "lokr-full": 0.15, "lokr-unbalanced": 0.25}  # random factors for a change of order 1


def lycoris_net(sd, seed=0, multiplier=1.0, amount=0.4, **config):
    """A lycoris network on a plain diffusers transformer, applied (its forward is lycoris'), weights randomised."""
    from lycoris import create_lycoris

    model = reference(sd)
    kw = dict(config)
    net = create_lycoris(model, multiplier, kw.pop("linear_dim", 4), kw.pop("linear_alpha", 1), **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.2 * noise)
            elif config.get("algo") == "full":
                p.add_(noise * 0.05)
            else:
                p.copy_(noise * amount)
    return model, net


def save_simpletuner(net, path, config):
    """As SimpleTuner saves its LyCORIS: the network's own save_weights, the config in the metadata."""
    net.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(config)})
    return path


@pytest.mark.parametrize("variant", list(LYCORIS))
def test_lycoris_matches_lycoris_forward(tmp_path, tiny, pack, inputs, base_out, variant):
    config = LYCORIS[variant]
    model, net = lycoris_net(tiny["sd"], seed=7, amount=NOISE.get(variant, 0.4), **config)
    path = save_simpletuner(net, tmp_path / f"{variant}.safetensors", config)
    assert next(iter(LoraFile(path).groups)).startswith("lycoris_")
    ref = run(model, inputs)  # lycoris' own forward: what training and SimpleTuner's validation ran
    check(pack, inputs, base_out, ref, [(path, 1.0)])
    report = apply_loras(pack, [(path, 1.0)]).loras[0]
    assert report.matched == 30 and report.styles == [f"lycoris {config['algo']}"]


def test_lycoris_merge_agrees_where_its_scale_is_one(tmp_path, tiny, pack, inputs, base_out):
    """lycoris' merge_to (as `lycoris` 4.1 writes it) multiplies LoKr/LoHa by alpha/rank twice, its forward once; with
    both Kronecker sides full (SimpleTuner's default) the scale is 1 and merge, forward and the pack all agree."""
    config = LYCORIS["lokr-full"]
    model, net = lycoris_net(tiny["sd"], seed=8, amount=NOISE["lokr-full"], **config)
    path = save_simpletuner(net, tmp_path / "lokr_full.safetensors", config)
    forward = run(model, inputs)
    net.restore()
    net.merge_to(1.0)
    merged = run(model, inputs)
    assert rel(merged, forward) < TOL
    check(pack, inputs, base_out, merged, [(path, 1.0)])
    # where alpha != rank, merge_to's ΔW is alpha/rank times its forward's: the forward is the reference above
    _, net = lycoris_net(tiny["sd"], seed=9, **LYCORIS["lokr"])
    lyco = next(m for m in net.loras if m.lora_name.endswith("joint_transformer_blocks_0_attn_to_q"))
    before = lyco.org_weight.clone()
    forward_delta = lyco.get_weight(lyco.shape).detach()
    net.restore()
    net.merge_to(1.0)
    assert lyco.scale == 1.5
    assert torch.allclose(lyco.org_module[0].weight - before, forward_delta * lyco.scale, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- kohya / ComfyUI keys, written by hand
HAND_LAYERS = ["joint_transformer_blocks.0.attn.to_q", "joint_transformer_blocks.0.attn.add_k_proj",
               "joint_transformer_blocks.0.ff_context.linear_2", "joint_transformer_blocks.0.norm1.linear",
               "single_transformer_blocks.0.ff.out_projection", "single_transformer_blocks.0.attn.to_out.0",
               "context_embedder", "time_step_proj.linear_1", "pos_embed.proj", "norm_out.linear", "proj_out"]


def hand_lora(sd, layers, seed, rank=3, alpha=1.5):
    """{diffusers layer: (down, up, alpha)} with random factors, and the dense ΔW of each (scale included)."""
    g = torch.Generator().manual_seed(seed)
    factors, deltas = {}, {}
    for name in layers:
        out_f, in_f = sd[f"{name}.weight"].shape
        down, up = torch.randn(rank, in_f, generator=g) * 0.2, torch.randn(out_f, rank, generator=g) * 0.2
        factors[name] = (down, up, alpha)
        deltas[name] = up @ down * (alpha / rank)
    return factors, deltas


def original_name(name):
    from aura_flow.tiny import transformer_to_original

    (key,) = transformer_to_original({f"{name}.weight": torch.zeros(2, 1)})
    return key.removesuffix(".weight")


def kohya_keys(factors, spell, to_original):
    """Keys as kohya (``lora_unet_`` + underscores) or ComfyUI (``diffusion_model.`` + dots) write them; a factor
    given for a diffusers layer is written for its original name (rows in the original order) if asked."""
    sd = {}
    for name, (down, up, alpha) in factors.items():
        module = name
        if to_original:
            module = original_name(name)
            if name == "norm_out.linear":  # the original weight's halves are the other way round
                up = up[swap_halves(up.shape[0])]
        stem = spell(module)
        sd.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                   f"{stem}.alpha": torch.tensor(alpha)})
    return sd


def merged_diffusers(sd, deltas, strength=1.0):
    out = dict(sd)
    for name, delta in deltas.items():
        out[f"{name}.weight"] = out[f"{name}.weight"] + strength * delta
    return out


def merged_original(sd, deltas):
    """Merge in the original layout, then convert with diffusers' own converter (which swaps modF.1's halves)."""
    from diffusers.loaders.single_file_utils import convert_auraflow_transformer_checkpoint_to_diffusers

    from aura_flow.tiny import transformer_to_original

    orig = transformer_to_original(sd)
    for name, delta in deltas.items():
        key = f"{original_name(name)}.weight"
        if name == "norm_out.linear":
            delta = delta[swap_halves(delta.shape[0])]
        orig[key] = orig[key] + delta
    return convert_auraflow_transformer_checkpoint_to_diffusers(orig)


@pytest.mark.parametrize("form", ["kohya-diffusers", "kohya-original", "comfyui-original", "lycoris-prefix-lora"])
def test_kohya_and_comfyui_keys_match_hand_merge(tmp_path, tiny, pack, inputs, base_out, form):
    factors, deltas = hand_lora(tiny["sd"], HAND_LAYERS, seed=11)
    original = form.endswith("original")
    spell = {"kohya-diffusers": lambda m: "lora_unet_" + m.replace(".", "_"),
             "kohya-original": lambda m: "lora_unet_" + m.replace(".", "_"),
             "comfyui-original": lambda m: "diffusion_model." + m,
             "lycoris-prefix-lora": lambda m: "lycoris_" + m.replace(".", "_")}[form]
    path = save(tmp_path, f"{form}.safetensors", kohya_keys(factors, spell, original))
    ref_sd = merged_original(tiny["sd"], deltas) if original else merged_diffusers(tiny["sd"], deltas)
    check(pack, inputs, base_out, run(reference(ref_sd), inputs), [(path, 1.0)])
    prepared = prepare_lora(path, pack)
    assert set(prepared.patches) == set(HAND_LAYERS)
    assert isinstance(prepared.patches["norm_out.linear"], PermutedRows) == original


# ---------------------------------------------------------------- stacking, strength, removal
def test_stacking_and_negative_strength(tmp_path, tiny, pack, inputs, base_out):
    """A kohya LoRA at 0.7, a second at -1.3 and a lycoris LoKr at -0.5, against: both kohya ΔW merged by hand, and
    lycoris' own forward with multiplier -0.5 on top."""
    f1, d1 = hand_lora(tiny["sd"], HAND_LAYERS[:6], seed=21)
    f2, d2 = hand_lora(tiny["sd"], HAND_LAYERS[3:], seed=22, rank=2, alpha=4.0)
    p1 = save(tmp_path, "a.safetensors", kohya_keys(f1, lambda m: "lora_unet_" + m.replace(".", "_"), False))
    p2 = save(tmp_path, "b.safetensors", kohya_keys(f2, lambda m: "diffusion_model." + m, True))
    sd = merged_diffusers(merged_diffusers(tiny["sd"], d1, 0.7), d2, -1.3)
    config = LYCORIS["lokr"]
    model, net = lycoris_net(sd, seed=23, multiplier=-0.5, **config)
    p3 = save_simpletuner(net, tmp_path / "c.safetensors", config)
    report = apply_loras(pack, [(p1, 0.7), (p2, -1.3), (LoraFile(p3), -0.5)])
    assert [r.strength for r in report.loras] == [0.7, -1.3, -0.5] and report.layers_patched == 30
    check(pack, inputs, base_out, run(model, inputs), [(p1, 0.7), (p2, -1.3), (p3, -0.5)])
    # strength 0 is off; a negative strength subtracts
    check(pack, inputs, base_out, run(reference(merged_diffusers(tiny["sd"], d1, -2.0)), inputs),
          [(p1, -2.0), (p2, 0.0)])
    assert {n for n, layer in patchable_layers(pack).items() if layer.patches} == set(d1)


def test_removing_gives_back_the_base_bit_exactly(tmp_path, tiny, pack, inputs):
    before = run(pack, inputs)
    weights = {n: l.weight.clone() for n, l in patchable_layers(pack).items()}
    factors, _ = hand_lora(tiny["sd"], HAND_LAYERS, seed=31)
    path = save(tmp_path, "k.safetensors", kohya_keys(factors, lambda m: "lora_unet_" + m.replace(".", "_"), False))
    prepared = prepare_lora(path, pack)
    apply_loras(pack, [(prepared, 1.0), (path, 0.5)])
    assert not torch.equal(run(pack, inputs), before)
    apply_loras(pack, [])
    assert torch.equal(run(pack, inputs), before)
    assert all(layer.patches == () for layer in patchable_layers(pack).values())
    assert all(torch.equal(layer.weight, weights[n]) for n, layer in patchable_layers(pack).items())


def test_bf16_compute(tmp_path, tiny, inputs):
    """The pack loaded in bf16 runs LoRA and LoKr patches (both LoKr paths) in bf16: as close to the fp32 result as
    the format's own tool run in bf16 (lycoris; a hand merge into a bf16 diffusers model), and close to that tool."""
    import aura_flow

    files = tiny["files"]
    pack16 = aura_flow.load(files["checkpoint"], text_encoder=files["text_encoder"], vae=files["vae"], device="cpu",
                            dtype="bf16").transformer
    assert next(pack16.parameters()).dtype == torch.bfloat16
    config = LYCORIS["lokr"]
    model, net = lycoris_net(tiny["sd"], seed=42, **config)
    lokr = save_simpletuner(net, tmp_path / "lokr.safetensors", config)
    factors, deltas = hand_lora(tiny["sd"], HAND_LAYERS, seed=41)
    kohya = save(tmp_path, "k.safetensors", kohya_keys(factors, lambda m: "lora_unet_" + m.replace(".", "_"), False))
    merged = reference(merged_diffusers(tiny["sd"], deltas))
    for path, tool in ((lokr, model), (kohya, merged)):
        ref32 = run(tool, inputs)
        ref16 = run(tool.to(torch.bfloat16), inputs, torch.bfloat16)
        apply_loras(pack16, [(path, 1.0)])
        out16 = run(pack16, inputs, torch.bfloat16)
        assert rel(ref32, run(reference(tiny["sd"]), inputs)) > 0.1
        assert rel(out16, ref16) < 2e-2
        assert rel(out16, ref32) < 1.25 * rel(ref16, ref32) + 5e-3


# ---------------------------------------------------------------- refusals and reports
FOREIGN = {
    "sdxl": ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "SDXL UNet"),
    "flux": ("lora_unet_double_blocks_0_img_attn_qkv", "Flux"),
    "sd3": ("lora_unet_joint_blocks_0_x_block_attn_qkv", "SD3"),
    "text-encoder": ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text encoder"),
}


@pytest.mark.parametrize("model", list(FOREIGN))
def test_other_models_loras_are_refused(tmp_path, pack, model):
    stem, says = FOREIGN[model]
    sd = {f"{stem}.lora_down.weight": torch.randn(4, 64), f"{stem}.lora_up.weight": torch.randn(64, 4),
          f"{stem}.alpha": torch.tensor(4.0)}
    path = save(tmp_path, f"{model}_lora.safetensors", sd)
    with pytest.raises(LoadError, match=f"{model}_lora.safetensors.*{says}"):
        apply_loras(pack, [(path, 1.0)])
    assert all(layer.patches == () for layer in patchable_layers(pack).values())


def test_a_checkpoint_is_not_a_lora(tiny, pack):
    with pytest.raises(LoadError, match="no LoRA weights found.*model loader"):
        prepare_lora(tiny["files"]["checkpoint"], pack)


def test_partial_match_is_reported(tmp_path, pack, caplog):
    """A diffusers-keyed Flux LoRA shares a few module names with AuraFlow: those apply, the rest are reported."""
    sd = {}
    for module, (o, i) in {"single_transformer_blocks.0.attn.to_q": (32, 32),
                           "single_transformer_blocks.0.proj_mlp": (128, 32),
                           "transformer_blocks.0.attn.to_q": (32, 32), "transformer_blocks.0.ff.net.0.proj": (128, 32)
                           }.items():
        sd[f"transformer.{module}.lora_A.weight"] = torch.randn(2, i)
        sd[f"transformer.{module}.lora_B.weight"] = torch.randn(o, 2)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(2, 8)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(8, 2)
    sd["transformer.single_transformer_blocks.0.attn.to_q.lora_B.bias"] = torch.randn(32)
    path = save(tmp_path, "flux_style.safetensors", sd)
    with caplog.at_level(logging.WARNING, logger="aura_flow.lora"):
        report = apply_loras(pack, [(path, 1.0)]).loras[0]
    assert (report.matched, report.modules, report.text_encoder, report.keys_matched, report.keys) == (1, 5, 1, 2, 11)
    assert report.unmatched == ["transformer.single_transformer_blocks.0.proj_mlp", "transformer.transformer_blocks.0."
                                "attn.to_q", "transformer.transformer_blocks.0.ff.net.0.proj"]
    assert report.unsupported_keys == ["transformer.single_transformer_blocks.0.attn.to_q.lora_B.bias"]
    assert "only 1 of 4 transformer modules" in report.warnings[0] and "Flux" in report.warnings[0]
    assert any("text-encoder modules ignored" in w for w in report.warnings)
    assert "only 1 of 4" in caplog.text
    assert [n for n, l in patchable_layers(pack).items() if l.patches] == ["single_transformer_blocks.0.attn.to_q"]


def test_shape_mismatch_names_file_key_and_shapes(tmp_path, pack):
    stem = "lora_unet_joint_transformer_blocks_0_attn_to_q"
    path = save(tmp_path, "big.safetensors", {f"{stem}.lora_down.weight": torch.randn(4, 3072),
                                              f"{stem}.lora_up.weight": torch.randn(3072, 4)})
    with pytest.raises(LoadError, match=r"big.safetensors: lora_unet_joint_transformer_blocks_0_attn_to_q\.lora_\w+"
                                        r"\.weight .*\(3072, 3072\).*\(32, 32\)"):
        apply_loras(pack, [(path, 1.0)])


def test_bad_inputs(tmp_path, pack):
    with pytest.raises(LoadError, match="not found"):
        LoraFile(tmp_path / "missing.safetensors")
    with pytest.raises(LoadError, match="a folder without pytorch_lora_weights.safetensors"):
        LoraFile(tmp_path)
    pt = tmp_path / "old.pt"
    pt.write_bytes(b"x")
    with pytest.raises(LoadError, match="only .safetensors"):
        LoraFile(pt)
    stem = "lora_unet_proj_out"
    path = save(tmp_path, "half.safetensors", {f"{stem}.lora_down.weight": torch.randn(2, 32)})
    with pytest.raises(LoadError, match="half.safetensors: module lora_unet_proj_out has down but no up"):
        prepare_lora(path, pack)
    with pytest.raises(ParameterError, match="strength"):
        apply_loras(pack, [(path, float("nan"))])


# ---------------------------------------------------------------- the patch math itself
@pytest.mark.parametrize("w1, w2", [
    (dict(full=(4, 2)), dict(full=(8, 16))),
    (dict(full=(4, 2)), dict(a=(8, 3), b=(3, 16))),
    (dict(a=(4, 1), b=(1, 2)), dict(a=(8, 3), b=(3, 16))),
    (dict(full=(4, 2)), dict(a=(3, 8), b=(3, 16), t=(3, 3))),
])
@pytest.mark.parametrize("rows", [1, 3, 500])
def test_lokr_action_on_x_equals_dense(w1, w2, rows):
    g = torch.Generator().manual_seed(0)
    make = lambda spec: Factor(**{k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in spec.items()})
    patch = LoKrPatch(make(w1), make(w2), scale=0.7)
    x = torch.randn(2, rows, 32, generator=g, dtype=torch.float64)
    dense = x @ patch.delta_weight(torch.float64, x.device).T
    y = patch.delta_output(x)
    assert (y is None) == (rows == 500)  # many rows: building ΔW is cheaper
    if y is not None:
        assert torch.allclose(y, dense, rtol=1e-12, atol=1e-12)
    assert patch.delta_weight(torch.float64, x.device).shape == patch.shape == (32, 32)


def test_loha_dora_per_column_and_permuted_rows():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    loha = LoHaPatch(Factor(a=r(6, 2), b=r(2, 4)), Factor(a=r(6, 2), b=r(2, 4)), scale=0.5)
    assert torch.allclose(loha.delta_weight(torch.float64, "cpu"),
                          (loha.w1.a @ loha.w1.b) * (loha.w2.a @ loha.w2.b) * 0.5)
    layer = torch.nn.Linear(4, 6, dtype=torch.float64)
    layer.compute_weight = lambda dtype, device: layer.weight.to(device=device, dtype=dtype)
    m = r(1, 4).abs()
    dora = DoraPatch.of(loha, m, layer)
    v = layer.weight + loha.delta_weight(torch.float64, "cpu")
    expected = v * (m / v.norm(dim=0, keepdim=True)) - layer.weight
    assert torch.allclose(dora.delta_weight(torch.float64, "cpu"), expected)
    perm = swap_halves(6)
    assert perm.tolist() == [3, 4, 5, 0, 1, 2]
    swapped = PermutedRows(dora, perm)
    assert torch.equal(swapped.delta_weight(torch.float64, "cpu"), expected[perm])
    assert swapped.delta_output(r(2, 4)) is None
