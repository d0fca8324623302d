"""A LoRA with finite tensors that still turns a run into NaN (issue 20) is named as the cause, with the layer and the
fix: a huge alpha (kohya's ``.alpha`` tensor, peft's ``lora_alpha`` in the metadata diffusers saves), huge factors
(written by peft), a LyCORIS LoHa / LoKr (written by the lycoris library) whose product overflows in fp16 or even
fp32. Through the Python API, the command line (exit 1, no image written) and the node chain. A normal LoRA's output
is bit-identical with the check in place, and the same LoRA given twice warns on every path."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import aura_flow
from aura_flow.cli import main
from aura_flow.errors import NumericError
from aura_flow.lora import prepare_lora
from aura_flow.lora.blame import RATIO_LIMIT, find_overflows
from lora_files import LAYERS_A, write_lora
from test_lora import LYCORIS, lycoris_net, peft_model, save_simpletuner
from workflow_exec import load_pack

GEN = dict(prompt="a fox", seed=3, steps=2, width=64, height=64, sampler="euler")
DAMAGED = r"its alpha or its factors are far too large, so the file is damaged or was converted wrongly: remove it, " \
          r"or download or train it again"


@pytest.fixture(scope="module")
def sd(tiny_pipe):
    """The tiny transformer's weights under diffusers' names, for the peft and lycoris models built on them."""
    return {k: v.float() for k, v in tiny_pipe.transformer.state_dict().items()}


def peft_file(folder, sd, name, *, lora_alpha=4, factor=1.0):
    """A LoRA trained by peft (r=4) and saved as diffusers saves it, its config (``lora_alpha``) in the metadata;
    ``factor`` multiplies its factors."""
    from diffusers.loaders.lora_pipeline import AuraFlowLoraLoaderMixin
    from peft import get_peft_model_state_dict

    pm, cfg = peft_model(sd, seed=11, r=4, lora_alpha=lora_alpha)
    weights = {k.removeprefix("base_model.model."): v * factor for k, v in get_peft_model_state_dict(pm).items()}
    folder.mkdir(parents=True, exist_ok=True)
    AuraFlowLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=weights,
                                              transformer_lora_adapter_metadata=cfg.to_dict(),
                                              weight_name=name)
    return folder / name


def lycoris_file(folder, sd, variant, amount, name):
    config = LYCORIS[variant]
    _model, net = lycoris_net(sd, seed=12, amount=amount, **config)
    folder.mkdir(parents=True, exist_ok=True)
    return save_simpletuner(net, folder / name, config)


def assert_blamed(exc_info, name, *, what=r"is [0-9.e+]+ times that layer's largest weight", fix=DAMAGED):
    message = str(exc_info.value)
    assert re.search(rf"the sampled latent holds NaN or infinite values, and the cause is the LoRA {re.escape(name)} "
                     rf"at strength [0-9.-]+ \(its change to layer \S+ {what}\): {fix}", message), message
    assert "sampler" not in message and "cfg" not in message
    cause = exc_info.value.__cause__  # the sampler's own finding stays the cause in the traceback
    assert type(cause).__name__ == "NumericError" and "overflowed with sampler=" in str(cause)


# ----------------------------------------------------------------------------------- files, API
@pytest.mark.parametrize("kind", ["kohya-alpha", "peft-lora_alpha", "peft-factors", "lycoris-lokr-fp32"])
def test_a_lora_that_overflows_is_named_through_the_api(tmp_path, tiny_pipe, sd, kind):
    if kind == "kohya-alpha":  # kohya's per-module .alpha tensor: scale 1e30 / 3
        path = write_lora(tmp_path / "kohya_alpha.safetensors", LAYERS_A, alpha=1e30)
    elif kind == "peft-lora_alpha":  # diffusers' saved peft config: lora_alpha 1e30
        path = peft_file(tmp_path, sd, "peft_alpha.safetensors", lora_alpha=1e30)
    elif kind == "peft-factors":  # finite factors of 1e16: ΔW about 1e31
        path = peft_file(tmp_path, sd, "peft_factors.safetensors", factor=1e17)
    else:  # LoKr factors of 1e14: kron(w1, w2 = a @ b) is past float32's 3.4e38
        path = lycoris_file(tmp_path, sd, "lokr", 1e14, "lokr_huge.safetensors")
    tensors = load_file(str(path))
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())  # no NaN in the file: read-time checks pass
    view = tiny_pipe.with_loras([(path, 1.0)])
    with pytest.raises(NumericError) as info:
        view.generate(**GEN)
    what = r"is not finite even in fp32" if kind.startswith("lycoris") else \
        r"is [0-9.]+e\+[0-9]+ times that layer's largest weight"
    assert_blamed(info, path.name, what=what)


def test_a_loha_that_overflows_in_fp16_is_named_with_the_dtype(tmp_path, tiny_models, sd):
    path = lycoris_file(tmp_path, sd, "loha", 300.0, "loha_fp16.safetensors")  # (w1a@w1b) ⊙ (w2a@w2b) ~ 1e10
    pipe = aura_flow.load(**tiny_models["diffusers"], device="cpu", dtype="fp16", loras=[(path, 1.0)])
    with pytest.raises(NumericError) as info:
        pipe.generate(**GEN)
    assert_blamed(info, "loha_fp16.safetensors", what=r"is infinite in fp16, [0-9.e+]+ times that layer's largest "
                                                      r"weight")
    # no strength helps: the layer builds ΔW in fp16 before scaling it, so the file itself is named as broken
    (found,) = find_overflows([(prepare_lora(path, pipe.transformer), 1e-6)], pipe.transformer, torch.float16)
    assert found.dtype is torch.float16 and found.broken_file and re.search(DAMAGED, found.describe())


@pytest.mark.parametrize("storage", ["fp8_e4m3fn", "gguf_Q8_0"])
def test_a_lora_on_fp8_and_gguf_layers_is_named(tmp_path, tiny_models, storage):
    """The check reads the weight as the layer computes it (fp8 with its scale, GGUF blocks dequantized)."""
    from aura_flow.weights.quantized_linear import GGUFLinear
    from aura_flow.weights.writers import build_tiny_gguf

    path = write_lora(tmp_path / "loras" / "on_quantized.safetensors", LAYERS_A, alpha=1e30)
    if storage.startswith("gguf"):
        gguf_path = build_tiny_gguf(tmp_path / "gguf", "Q8_0")
        pipe = aura_flow.load(gguf_path, text_encoder=gguf_path.parent / "text_encoder.safetensors",
                              vae=gguf_path.parent / "vae.safetensors", device="cpu", loras=[(path, 1.0)])
        assert any(isinstance(m, GGUFLinear) for m in pipe.transformer.modules())
    else:
        pipe = aura_flow.load(**tiny_models["single_file"], device="cpu", dtype=storage, loras=[(path, 1.0)])
        assert any(getattr(m, "weight", None) is not None and m.weight.dtype == torch.float8_e4m3fn
                   for m in pipe.transformer.modules())
    with pytest.raises(NumericError) as info:
        pipe.generate(**GEN)
    assert_blamed(info, "on_quantized.safetensors")


def test_a_strength_too_high_for_a_sound_lora_says_lower_it(tmp_path, tiny_pipe):
    path = write_lora(tmp_path / "strong.safetensors", LAYERS_A, alpha=1.5 * 30)  # 30x a plain LoRA's change
    prepared = prepare_lora(path, tiny_pipe.transformer)
    assert find_overflows([(prepared, 1.0)], tiny_pipe.transformer, torch.float32) == []
    (found,) = find_overflows([(prepared, 10.0)], tiny_pipe.transformer, torch.float32)
    assert RATIO_LIMIT < found.ratio < 10 * RATIO_LIMIT and not found.broken_file
    assert found.describe().endswith("lower its strength (now 10)")
    # with two LoRAs only the one out of bounds is named
    plain = prepare_lora(write_lora(tmp_path / "plain.safetensors", LAYERS_A, seed=4), tiny_pipe.transformer)
    assert [o.lora for o in find_overflows([(plain, 10.0), (prepared, 10.0)], tiny_pipe.transformer,
                                           torch.float32)] == ["strong.safetensors"]


def test_a_sound_lora_is_unchanged_and_mentioned_only_when_the_run_fails_for_another_reason(tmp_path, tiny_pipe):
    path = write_lora(tmp_path / "style.safetensors", LAYERS_A, seed=5)
    view = tiny_pipe.with_loras([(path, 1.0)])
    pos, neg = tiny_pipe.encode_prompt("a fox"), tiny_pipe.encode_prompt("")
    plan = dict(seed=4, steps=2, cfg=4.0, sampler="euler", scheduler="normal", shift=1.73)
    weights = {k: v.clone() for k, v in tiny_pipe.transformer.state_dict().items()}
    first = view.sample(pos, neg, torch.zeros(1, 4, 8, 8), **plan)
    with view.lora_scope():  # the same run without the pipeline's wrapper around the sampler: bit-identical
        bare = aura_flow.sample(tiny_pipe.velocity, pos, neg, torch.zeros(1, 4, 8, 8), **plan)
        assert find_overflows(tiny_pipe._lora_state._applied, tiny_pipe.transformer, torch.float32) == []
    assert torch.equal(first, bare) and torch.equal(view.sample(pos, neg, torch.zeros(1, 4, 8, 8), **plan), first)
    assert all(torch.equal(v, weights[k]) for k, v in tiny_pipe.transformer.state_dict().items())
    # a run that overflows for another reason (noise near float32's limit) keeps the sampler's message, and says
    # which LoRAs were on
    with pytest.raises(NumericError, match=r"overflowed with sampler='euler' at cfg=4\. .*LoRAs were active "
                                           r"\(style.safetensors@1\); none changes a weight out of bounds"):
        view.sample(pos, neg, torch.zeros(1, 4, 8, 8), noise=torch.full((1, 4, 8, 8), 3e38), **plan)
    # a latent that was NaN before the run is not blamed on the LoRA
    with pytest.raises(NumericError, match=r"^latent holds NaN or infinite values") as info:
        view.sample(pos, neg, torch.full((1, 4, 8, 8), float("nan")), **plan)
    assert "LoRA" not in str(info.value)


# ----------------------------------------------------------------------------------- command line and nodes
def test_the_command_line_names_the_lora_and_writes_nothing(tiny_models, tmp_path, capsys):
    path = write_lora(tmp_path / "broken_alpha.safetensors", LAYERS_A, alpha=1e30)
    files = tiny_models["transformer_only"]
    out = tmp_path / "out"
    args = ["generate", "--checkpoint", str(files["checkpoint"]), "--text-encoder", str(files["text_encoder"]),
            "--vae", str(files["vae"]), "--device", "cpu", "--prompt", "a fox", "--lora", str(path), "--out",
            str(out), "--steps", "2", "--width", "64", "--height", "64", "--seed", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: the sampled latent holds NaN or infinite values, and the cause is the LoRA "
                     rf"broken_alpha.safetensors at strength 1 \(its change to layer \S+ .*\): {DAMAGED}", err), err
    assert not out.exists() or not any(out.iterdir())


def test_the_lora_loader_node_chain_names_the_lora(tiny_models, tmp_path):
    n = load_pack().NODE_CLASS_MAPPINGS
    good = write_lora(tmp_path / "good.safetensors", LAYERS_A, seed=6)
    bad = write_lora(tmp_path / "bad_alpha.safetensors", LAYERS_A, seed=7, alpha=1e30)
    model, text_encoder, _vae = n["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]),
                                                           weight_dtype="fp32")
    (first,) = n["AuraFlowLoraLoader"]().load(model, str(good), 1.0)
    (second,) = n["AuraFlowLoraLoader"]().load(first, str(bad), 0.5)
    pos = n["AuraFlowTextEncode"]().encode(text_encoder, "a fox")[0]
    neg = n["AuraFlowTextEncode"]().encode(text_encoder, "")[0]
    args = dict(seed=5, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal", shift=1.73, denoise=1.0,
                width=64, height=64, batch_size=1)
    with pytest.raises(RuntimeError) as info:
        n["AuraFlowSampler"]().sample(second, pos, neg, **args)
    assert type(info.value).__name__ == "NumericError"
    assert re.search(rf"the cause is the LoRA bad_alpha.safetensors at strength 0.5 .*: {DAMAGED}", str(info.value))
    assert "good.safetensors" not in str(info.value)
    n["AuraFlowSampler"]().sample(first, pos, neg, **args)  # the chain without it runs


def test_the_same_lora_twice_warns_on_the_command_line_and_the_node_chain(tiny_models, tmp_path, caplog):
    path = write_lora(tmp_path / "twice.safetensors", LAYERS_A, seed=8)
    files = tiny_models["transformer_only"]
    caplog.set_level(logging.WARNING)
    args = ["generate", "--checkpoint", str(files["checkpoint"]), "--text-encoder", str(files["text_encoder"]),
            "--vae", str(files["vae"]), "--device", "cpu", "--prompt", "a fox", "--lora", f"{path}:0.5", "--lora",
            f"{tmp_path}/./twice.safetensors:0.25", "--out", str(tmp_path / "out"), "--steps", "1", "--width", "64",
            "--height", "64", "--seed", "1"]
    assert main(args) == 0
    assert "twice.safetensors: the same LoRA is given 2 times" in caplog.text
    caplog.clear()
    n = load_pack().NODE_CLASS_MAPPINGS
    model = n["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")[0]
    (first,) = n["AuraFlowLoraLoader"]().load(model, str(path), 1.0)
    assert "the same LoRA" not in caplog.text
    n["AuraFlowLoraLoader"]().load(first, str(path), 0.5)
    assert "twice.safetensors: the same LoRA is given 2 times" in caplog.text


def test_a_damaged_file_read_again_is_checked_again(tmp_path, tiny_pipe):
    """The check reads the patches as they are on the layers: a file replaced on disk (cache per file version) is
    judged by its new numbers."""
    path = write_lora(tmp_path / "changing.safetensors", LAYERS_A, seed=9)
    view = tiny_pipe.with_loras([(path, 1.0)])
    view.generate(**GEN)
    tensors = load_file(str(path))
    for key in tensors:
        if key.endswith(".alpha"):
            tensors[key] = torch.tensor(1e30)
    save_file(tensors, str(path))
    import os
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    with pytest.raises(NumericError) as info:
        view.generate(**GEN)
    assert_blamed(info, "changing.safetensors")


def test_a_check_that_runs_out_of_memory_keeps_the_runs_own_error(tmp_path, tiny_pipe, monkeypatch, caplog):
    """The check runs on the failure path, on the device: if it cannot finish, the sampler's error stands."""
    import aura_flow.lora.blame as blame

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    path = write_lora(tmp_path / "huge_alpha.safetensors", LAYERS_A, alpha=1e30)
    monkeypatch.setattr(blame, "find_overflows", out_of_memory)
    with pytest.raises(NumericError, match=r"overflowed with sampler='euler'") as info:
        tiny_pipe.with_loras([(path, 1.0)]).generate(**GEN)
    assert "huge_alpha" not in str(info.value)
    assert "could not check the active LoRAs after the NaN run: CUDA out of memory (injected)" in caplog.text
