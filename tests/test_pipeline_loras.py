"""LoRAs on a loaded pipeline: ``load(loras=...)``, ``set_loras`` (switching and removing exactly, from a cache),
``with_loras`` views that share the modules and never change their base, and the AuraFlow LoRA Loader node chained
twice, against the same LoRAs applied with `aura_flow.lora.apply_loras` and merged into the weights by hand."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import aura_flow
from aura_flow.errors import LoadError, ParameterError
from aura_flow.lora import apply_loras
from aura_flow.weights.linear import patchable_layers
from lora_files import LAYERS_A, LAYERS_B, write_lora
from workflow_exec import load_pack

pack = load_pack()
N = pack.NODE_CLASS_MAPPINGS
SAMPLE = dict(seed=5, steps=2, cfg=4.0, sampler="euler", scheduler="normal", shift=1.73)


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return dict(ckpt=tiny_models["diffusers"]["checkpoint"],
                a=write_lora(folder / "style_a.safetensors", LAYERS_A, seed=1),
                b=write_lora(folder / "char_b.safetensors", LAYERS_B, seed=2, rank=2, alpha=4.0, style="peft"))


@pytest.fixture(scope="module")
def pipe(files):
    return aura_flow.load(files["ckpt"], device="cpu")


@pytest.fixture(autouse=True)
def _base_again(request):
    yield
    if "pipe" in request.fixturenames:
        request.getfixturevalue("pipe").set_loras([])


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(2, 8, 32, generator=g), timestep=torch.tensor([0.3, 0.8]))


def out(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def contexts(pipe):
    return pipe.encode_prompt("a red fox"), pipe.encode_prompt("")


def sample(model, pipe, **kw):
    pos, neg = contexts(pipe)
    return model.sample(pos, neg, torch.zeros(1, 4, 8, 8), **{**SAMPLE, **kw})


def merged_delta(path, layer_shapes) -> dict:
    """ΔW of a LoRA file written by lora_files.write_lora, merged by hand: up @ down * alpha / rank."""
    from safetensors.torch import load_file

    sd, deltas = load_file(str(path)), {}
    for name in layer_shapes:
        for down_key, up_key, alpha_key in ((f"lora_unet_{name.replace('.', '_')}.lora_down.weight",
                                             f"lora_unet_{name.replace('.', '_')}.lora_up.weight",
                                             f"lora_unet_{name.replace('.', '_')}.alpha"),
                                            (f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight",
                                             f"transformer.{name}.alpha")):
            if down_key in sd:
                down, up = sd[down_key], sd[up_key]
                deltas[name] = up @ down * (float(sd[alpha_key]) / down.shape[0])
    return deltas


def test_load_with_loras_equals_apply_loras_and_the_hand_merge(files, pipe, inputs):
    loras = [(files["a"], 0.7), (files["b"], -1.3)]
    loaded = aura_flow.load(files["ckpt"], device="cpu", loras=loras)
    assert [(os.path.basename(p), s) for p, s in loaded.loras] == [("style_a.safetensors", 0.7),
                                                                  ("char_b.safetensors", -1.3)]
    apply_loras(pipe.transformer, loras)
    assert torch.equal(out(loaded.transformer, inputs), out(pipe.transformer, inputs))
    # and the numbers are the LoRAs' own: the weights merged by hand give the same output
    apply_loras(pipe.transformer, [])
    base = out(pipe.transformer, inputs)
    layers = patchable_layers(pipe.transformer)
    saved = {n: layers[n].weight.clone() for n in set(LAYERS_A) | set(LAYERS_B)}
    try:
        for path, strength in loras:
            for name, delta in merged_delta(path, saved).items():
                layers[name].weight += strength * delta
        merged = out(pipe.transformer, inputs)
    finally:
        for name, weight in saved.items():
            layers[name].weight.copy_(weight)
    got = out(loaded.transformer, inputs)
    assert (merged - base).abs().max() > 1e-2  # the LoRAs change the output, so the match means something
    assert ((got - merged).abs().max() / merged.abs().max()) < 1e-5


def test_set_loras_switches_and_removes_exactly_without_reading_again(files, pipe, inputs):
    base = out(pipe.transformer, inputs)
    report = pipe.set_loras([(files["a"], 1.0)])
    assert [(r.name, r.strength, r.matched) for r in report.loras] == [("style_a.safetensors", 1.0, len(LAYERS_A))]
    assert report.layers_patched == len(LAYERS_A)
    with_a = out(pipe.transformer, inputs)
    prepared_a = pipe._lora_state.prepared(pipe.loras[0])
    pipe.set_loras([(files["b"], 0.5), (files["a"], 1.0)])
    assert pipe._lora_state.prepared(pipe.loras[1]) is prepared_a  # cached: the file is not read again
    assert not torch.equal(out(pipe.transformer, inputs), with_a)
    pipe.set_loras([(files["a"], 1.0)])
    assert torch.equal(out(pipe.transformer, inputs), with_a)
    assert pipe.set_loras([]).layers_patched == 0 and pipe.loras == ()
    assert torch.equal(out(pipe.transformer, inputs), base)
    assert all(layer.patches == () for layer in patchable_layers(pipe.transformer).values())


def test_a_changed_file_is_read_again(files, pipe, tmp_path, inputs):
    path = write_lora(tmp_path / "evolving.safetensors", LAYERS_A, seed=7)
    pipe.set_loras([(path, 1.0)])
    first = out(pipe.transformer, inputs)
    old = pipe._lora_state.prepared(pipe.loras[0])
    write_lora(path, LAYERS_A, seed=8, rank=4)  # retrained: another size and mtime
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    pipe.set_loras([(path, 1.0)])
    assert pipe._lora_state.prepared(pipe.loras[0]) is not old
    assert not torch.equal(out(pipe.transformer, inputs), first)


def test_views_share_modules_and_never_change_their_base(files, pipe):
    base_latent = sample(pipe, pipe)
    view = pipe.with_loras([(files["a"], 0.7)])
    chained = view.with_loras([*view.loras, (files["b"], -1.3)])
    assert pipe.loras == () and len(view.loras) == 1 and len(chained.loras) == 2
    assert chained.transformer is pipe.transformer and chained.vae is pipe.vae and chained.device == pipe.device
    assert chained.context_dim == pipe.context_dim and chained.base is pipe
    copied = copy.copy(chained)  # hosts may copy node outputs: still a view of the same pipeline
    assert copied.base is pipe and copied.loras == chained.loras
    view_latent = sample(view, pipe)
    chained_latent = sample(chained, pipe)
    # interleaved runs each get their own LoRAs on the shared layers
    assert torch.equal(sample(pipe, pipe), base_latent)
    assert torch.equal(sample(view, pipe), view_latent)
    assert torch.equal(sample(chained, pipe), chained_latent)
    assert not torch.equal(view_latent, base_latent) and not torch.equal(chained_latent, view_latent)
    # the same as a pipeline loaded with those LoRAs
    loaded = aura_flow.load(files["ckpt"], device="cpu", loras=[(files["a"], 0.7), (files["b"], -1.3)])
    assert torch.equal(sample(loaded, loaded), chained_latent)
    # velocity and generate of a view run with its LoRAs too
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.6])
    ctx = pipe.encode_prompt("a red fox")
    assert torch.equal(chained.velocity(x, sigma, ctx), loaded.velocity(x, sigma, ctx))
    assert not torch.equal(pipe.velocity(x, sigma, ctx), loaded.velocity(x, sigma, ctx))
    gen = dict(prompt="a red fox", seed=2, steps=2, width=64, height=64, sampler="euler")
    result = chained.generate(**gen)
    assert torch.equal(result.tensor, loaded.generate(**gen).tensor)
    assert [lora["name"] for lora in result.record["loras"]] == ["style_a.safetensors", "char_b.safetensors"]
    assert pipe.generate(**gen).record["loras"] == []


def test_lora_loader_nodes_chained_equal_load_with_loras_and_leave_the_input_alone(files):
    model, text_encoder, _vae = N["AuraFlowLoader"]().load(str(files["ckpt"]), weight_dtype="fp32")
    node = N["AuraFlowLoraLoader"]()
    (first,) = node.load(model, str(files["a"]), 0.7)
    (second,) = node.load(first, str(files["b"]), -1.3)
    assert model.loras == () and len(first.loras) == 1  # inputs untouched
    pos = N["AuraFlowTextEncode"]().encode(text_encoder, "a red fox")[0]
    neg = N["AuraFlowTextEncode"]().encode(text_encoder, "")[0]

    def run(m):
        args = dict(seed=5, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal", shift=1.73, denoise=1.0,
                    width=64, height=64, batch_size=1)
        return N["AuraFlowSampler"]().sample(m, pos, neg, **args)[0]["samples"]

    plain = aura_flow.load(files["ckpt"], device="cpu")
    reference = aura_flow.load(files["ckpt"], device="cpu", loras=[(files["a"], 0.7), (files["b"], -1.3)])
    pos_t, neg_t = pos[0][0], neg[0][0]
    chain_out = run(second)
    ref_out = reference.sample(pos_t, neg_t, torch.zeros(1, 4, 8, 8), **SAMPLE, denoise=1.0, speed="auto")
    assert torch.equal(chain_out, ref_out)
    # another branch of the same graph samples the loader's model: the base, as if no LoRA had been loaded
    base_out = plain.sample(pos_t, neg_t, torch.zeros(1, 4, 8, 8), **SAMPLE, denoise=1.0, speed="auto")
    assert torch.equal(run(model), base_out) and not torch.equal(base_out, chain_out)
    assert torch.equal(run(second), chain_out)


def test_bad_loras_are_refused_before_any_work(files, pipe, tmp_path):
    with pytest.raises(ParameterError, match=r"strength 12 of style_a.safetensors is not a number in -10..10"):
        aura_flow.load("/nonexistent/checkpoint", loras=[(files["a"], 12)])  # before the checkpoint is looked at
    with pytest.raises(ParameterError, match="strength nan"):
        pipe.set_loras([(files["a"], float("nan"))])
    with pytest.raises(ParameterError, match=r"each item is \(path, strength\)"):
        pipe.set_loras([files["a"]])
    with pytest.raises(LoadError, match="LoRA file not found"):
        aura_flow.load("/nonexistent/checkpoint", loras=[(tmp_path / "missing.safetensors", 1.0)])
    (tmp_path / "old.pt").write_bytes(b"x")
    with pytest.raises(LoadError, match="only .safetensors LoRAs"):
        pipe.with_loras([(tmp_path / "old.pt", 1.0)])
    with pytest.raises(ValueError, match=r"strength=11.0 is out of range; allowed: -10.0..10.0"):
        N["AuraFlowLoraLoader"]().load(pipe, str(files["a"]), 11.0)
    with pytest.raises(FileNotFoundError, match="LoRA 'nope.safetensors' not found"):
        N["AuraFlowLoraLoader"]().load(pipe, "nope.safetensors", 1.0)
    assert pipe.loras == ()
