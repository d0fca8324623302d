"""Messages in the words of the place (issue #13): the engine speaks neutrally (``vae=PATH``, "this is X, not
AuraFlow"), the command line in flags, the nodes in their inputs and ComfyUI's loader nodes. Files that are other
models are recognised from their keys before anything is assembled."""
from __future__ import annotations

import subprocess
import sys

import pytest
import safetensors
import torch
from safetensors.torch import save_file

import aura_flow
from aura_flow.cli import main
from aura_flow.errors import LoadError
from workflow_exec import ROOT, load_pack

pack = load_pack()
N = pack.NODE_CLASS_MAPPINGS
engine = sys.modules[f"{pack.__name__}.aura_flow"]

OTHERS = {  # found -> (keys, what the engine says it is)
    "sdxl": (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.x"],
             "a Stable Diffusion / SDXL UNet checkpoint"),
    "unet": (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "up_blocks.0.x"],
             "a Stable Diffusion / SDXL UNet in diffusers keys"),
    "flux": (["transformer_blocks.0.attn.add_q_proj.weight", "x_embedder.weight", "context_embedder.weight",
              "single_transformer_blocks.0.attn.to_q.weight"], "a Flux transformer in diffusers keys"),
    "sd3": (["transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight", "pos_embed.pos_embed",
             "context_embedder.weight", "proj_out.weight"], "a Stable Diffusion 3 MMDiT in diffusers keys"),
    "lora": (["transformer.joint_transformer_blocks.0.attn.to_q.lora_A.weight"], "a LoRA"),
    "vae": (["encoder.down.0.block.0.conv1.weight"], "a VAE only"),
    "text_encoder": (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "a T5 text encoder only"),
    "clip": (["text_model.encoder.layers.0.mlp.fc1.weight"], "a CLIP text encoder"),
}


def write(tmp_path, found) -> str:
    path = tmp_path / f"{found}.safetensors"
    # 4-D where SD3 keeps a conv: the shapes that made the old path crash
    save_file({k: torch.zeros(2, 2, 2, 2) if k == "pos_embed.proj.weight" else torch.zeros(2, 2)
               for k in OTHERS[found][0]}, str(path))
    return str(path)


@pytest.mark.parametrize("found", sorted(OTHERS))
def test_other_models_are_named_neutrally_before_anything_is_read(tmp_path, found, monkeypatch):
    reads = []
    real = safetensors.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self._h = real(*a, **k)

        def __getattr__(self, name):
            return getattr(self._h, name)

        def get_tensor(self, key):
            reads.append(key)
            return self._h.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    with pytest.raises(LoadError) as info:
        aura_flow.load(write(tmp_path, found), device="cpu")
    assert info.value.found == found
    assert f"no AuraFlow transformer keys found: this is {OTHERS[found][1]}, not AuraFlow." in str(info.value)
    assert "Load " not in str(info.value) and "AuraFlow Loader" not in str(info.value)  # no ComfyUI words
    assert reads == []


def test_the_cli_says_it_in_flags(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--checkpoint", write(tmp_path, "sdxl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "this is a Stable Diffusion / SDXL UNet checkpoint, not AuraFlow." in err and "Load it" not in err
    assert main(["generate", "--checkpoint", write(tmp_path, "vae"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "To use it, give it as --vae=PATH, with an AuraFlow transformer as --checkpoint=PATH." in err
    assert main(["generate", "--checkpoint", str(tmp_path), "--cfg", "30", "--out", str(out)]) == 2
    assert "error: --cfg=30.0 is out of range; allowed: 0.0..20.0" in capsys.readouterr().err
    assert not out.exists()


def test_the_cli_checks_out_before_loading(tmp_path, capsys):
    taken = tmp_path / "a_file"
    taken.write_text("keep me")
    code = main(["generate", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(taken)])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {taken}: is a file, not a folder" in err and "missing.safetensors" not in err
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize("command, default", [("generate", "(default: 5.0)"), ("demo", "(default: auto)"),
                                              ("remote", "(default: 180.0)"), ("queue", "(default: 3600.0)")])
def test_help_shows_defaults(command, default):
    result = subprocess.run([sys.executable, "-m", "aura_flow", command, "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0 and default in " ".join(result.stdout.split())


def test_the_demo_says_a_range_is_wrong_without_importing_torch(tmp_path):
    code = ("import sys; from aura_flow.cli import main; rc = main(['demo', '--cfg', '30', '--out', "
            f"{str(tmp_path / 'o')!r}]); print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.split() == ["2", "False"] and "--cfg=30.0 is out of range" in result.stderr


def test_the_loader_node_says_where_comfyui_loads_it(tmp_path, tiny_models):
    with pytest.raises(engine.LoadError) as info:
        N["AuraFlowLoader"]().load(write(tmp_path, "flux"))
    assert str(info.value).endswith("not AuraFlow. Load it with Load Diffusion Model.")
    with pytest.raises(engine.LoadError) as info:
        N["AuraFlowLoader"]().load(write(tmp_path, "vae"))
    assert "not AuraFlow. Pick it in AuraFlow Loader's vae input (files in models/vae)" in str(info.value)
    assert "To use it" not in str(info.value) and "PATH" not in str(info.value)
    lone = tiny_models["transformer_only"]["checkpoint"]
    with pytest.raises(engine.LoadError, match=r"has no text encoder; give one as AuraFlow Loader's text_encoder "
                                               r"input \(models/text_encoders\)"):
        N["AuraFlowLoader"]().load(str(lone))
    with pytest.raises(engine.ParameterError, match="weight_dtype='fp12' is not known"):
        N["AuraFlowLoader"]().load(str(lone), weight_dtype="fp12")


def test_nodes_name_their_own_inputs(tmp_path, tiny_models, monkeypatch):
    model, te, _vae = N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")
    (cond,) = N["AuraFlowTextEncode"]().encode(te, "a cat")
    sampler = N["AuraFlowSampler"]()
    with pytest.raises(engine.ParameterError, match="sampler_name='nope' is not known"):
        sampler.sample(model, cond, cond, 1, 2, 1.0, "nope", "normal", 1.73, 1.0)
    with pytest.raises(engine.ParameterError, match="batch_size=11 is out of range"):
        sampler.sample(model, cond, cond, 1, 2, 1.0, "euler", "normal", 1.73, 1.0, batch_size=11)
    with pytest.raises(engine.ParameterError, match="^text: the weight nan of 'x' is out of range"):
        N["AuraFlowTextEncode"]().encode(te, "(x:nan)")
    with pytest.raises(engine.ParameterError, match="^text is not valid UTF-8"):
        N["AuraFlowTextEncode"]().encode(te, "\udcff")
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path))
    with pytest.raises(engine.ParameterError, match="quality=101 is out of range"):
        N["AuraFlowSaveImage"]().save(torch.rand(1, 8, 8, 3), "q", "png", 101, True)
    monkeypatch.setattr(model, "velocity", lambda x, sigma, context: torch.full_like(x, float("nan")))
    with pytest.raises(engine.NumericError, match=r"with sampler_name='euler' at cfg=1. Lower cfg, compute in fp32 "
                                                  r"\(AuraFlow Loader's weight_dtype='fp32'\)"):
        sampler.sample(model, cond, cond, 1, 2, 1.0, "euler", "normal", 1.73, 1.0, width=64, height=64, speed="exact")
