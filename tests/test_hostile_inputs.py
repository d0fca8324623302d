"""Hostile and broken inputs to the engine, the command line and the nodes (issue #13): prompts (weights, length,
encoding), NaN and empty latents, the cost of a run, and saving. Each case asserts the exact error type, that the
message names the parameter and the fix, that no heavy step ran, and that no file was written."""
from __future__ import annotations

import os
import re
import sys
import threading
import time

import pytest
import torch

import aura_flow
from aura_flow.errors import NumericError, ParameterError
from workflow_exec import load_pack

pack = load_pack()
N = pack.NODE_CLASS_MAPPINGS
engine = sys.modules[f"{pack.__name__}.aura_flow"]
NodeParameterError = engine.ParameterError
NodeNumericError = engine.NumericError


@pytest.fixture
def encoder_calls(tiny_pipe, monkeypatch) -> list:
    """Every call of the tiny pipeline's text encoder (through the real one)."""
    calls = []
    real = tiny_pipe.text_encoder.forward
    monkeypatch.setattr(tiny_pipe.text_encoder, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(tiny_pipe, "_prompt_cache", {})
    return calls


# ------------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("prompt, weight", [("a (cat:nan)", "nan"), ("(cat:inf) dog", "inf"), ("(cat:1e39)", "1e+39"),
                                            ("(cat:-1e39)", "-1e+39"), ("(cat:-10.5)", "-10.5"),
                                            ("(" * 30 + "cat" + ")" * 30, "17.4494")])
def test_prompt_weights_out_of_range_fail_before_any_model_work(prompt, weight, tiny_pipe, encoder_calls):
    message = rf"prompt: the weight {re.escape(weight)} of 'cat' is out of range; allowed: -10..10 \(finite;"
    with pytest.raises(ParameterError, match=message):
        aura_flow.plan_generation({"prompt": prompt})
    with pytest.raises(ParameterError, match=message.replace("prompt:", "negative_prompt:")):
        aura_flow.plan_generation({"negative_prompt": prompt})
    with pytest.raises(ParameterError, match=message):  # the nodes' path: encode_prompt
        tiny_pipe.encode_prompt(prompt)
    assert encoder_calls == []
    assert aura_flow.plan_generation({"prompt": prompt}, remote=True).prompt == prompt  # the service's own text


def test_weights_in_range_and_weights_on_nothing_still_work(tiny_pipe):
    parsed = aura_flow.prompts.parse_weights("(a:-10) (b:10) ( :nan)")
    assert parsed[:3] == [("a", -10.0), (" ", 1.0), ("b", 10.0)] and parsed[-1][0] == " "  # a weight on a space
    tiny_pipe.encode_prompt("(a:-10) (b:10) ( :nan)")


def test_nesting_is_bounded_instead_of_a_recursion_error():
    with pytest.raises(ParameterError, match=r"prompt: parentheses nested over 100 deep; at most 100 \(write \\\( "):
        aura_flow.plan_generation({"prompt": "(" * 5000 + "x:1" + ")" * 5000})


def test_a_100_kb_prompt_is_refused_at_once():
    t0 = time.perf_counter()
    with pytest.raises(ParameterError, match="prompt is 100,000 characters long; at most 16,384: shorten it"):
        aura_flow.plan_generation({"prompt": "a cat " * 16666 + "abcd"})
    assert time.perf_counter() - t0 < 1


def test_tokens_are_capped_before_the_encoder_runs(tiny_pipe, encoder_calls):
    text = " ".join(f"w{i}" for i in range(3000))[:16000]
    with pytest.raises(ParameterError, match="prompt is over 2048 tokens .*; at most 2048, about 8000 characters of "
                                             "English: shorten it"):
        tiny_pipe.encode_prompt(text)
    assert encoder_calls == []


def test_invalid_utf8_from_the_command_line_is_refused_before_loading(tmp_path, capsys):
    from aura_flow.cli import main

    out = tmp_path / "out"
    code = main(["generate", "--checkpoint", str(tmp_path / "not-there"), "--prompt", "a cat \udcff",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "prompt is not valid UTF-8 text (character 7 is the byte 0xff)" in err
    assert "check the terminal's encoding" in err and "not-there" not in err  # the model was never looked at
    assert not out.exists()


def test_invalid_text_in_a_node_input(tiny_models):
    model = N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")[0]
    with pytest.raises(NodeParameterError, match=r"is not valid UTF-8 text \(character 2 is a lone surrogate 0xd800\)"):
        N["AuraFlowTextEncode"]().encode(model, "a\ud800")
    with pytest.raises(NodeParameterError, match=": the weight inf of 'x' is out of range"):
        N["AuraFlowTextEncode"]().encode(model, "(x:inf)")


# ------------------------------------------------------------------------------------------------ NaN
def nan_model(x, sigma, context):
    return torch.full_like(x, float("nan"))


def test_a_nan_latent_fails_loudly_naming_the_cause(tiny_pipe):
    ctx = torch.zeros(1, 256, tiny_pipe.context_dim)
    with pytest.raises(NumericError, match=r"the sampled latent holds NaN or infinite values \(1,024 of 1,024\): the "
                                           r"model's numbers overflowed with sampler='euler' at cfg=5. Lower cfg, "
                                           r"compute in fp32 \(dtype='fp32'\), or try another sampler"):
        aura_flow.sample(nan_model, ctx, ctx, torch.zeros(1, 4, 16, 16), seed=1, steps=2, cfg=5.0, sampler="euler",
                         scheduler="normal", shift=1.73)
    bad = torch.zeros(1, 4, 8, 8)
    bad[0, 0, 0, 0] = float("inf")
    for fn in (lambda: tiny_pipe.decode(bad),
               lambda: aura_flow.sample(tiny_pipe.velocity, ctx, ctx, bad, seed=1, steps=2, cfg=5.0, sampler="euler",
                                        scheduler="normal", shift=1.73, denoise=0.5)):
        with pytest.raises(NumericError, match="latent holds NaN or infinite values; it cannot be sampled or decoded"):
            fn()


def test_the_cli_never_saves_a_nan_image(tmp_path, tiny_pipe, monkeypatch, capsys):
    from aura_flow.cli import main

    monkeypatch.setattr(tiny_pipe, "velocity", nan_model)
    monkeypatch.setattr("aura_flow.pipeline.pipeline.load", lambda *a, **k: tiny_pipe)
    out = tmp_path / "out"
    code = main(["generate", "--checkpoint", str(tmp_path), "--width", "64", "--height", "64", "--steps", "2",
                 "--speed", "exact", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "error: the sampled latent holds NaN" in err and "at --cfg=5. Lower cfg" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_nodes_refuse_nan_latents_and_images(tiny_models, tmp_path, monkeypatch):
    _model, _te, vae = N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")
    nan = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(NodeNumericError, match="samples holds NaN"):
        N["AuraFlowVAEDecode"]().decode({"samples": nan}, vae)
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path))
    images = torch.rand(2, 16, 16, 3)
    images[1, 3, 3, 0] = float("nan")
    with pytest.raises(NodeParameterError, match="images hold NaN or infinite values, so nothing was saved"):
        N["AuraFlowSaveImage"]().save(images, "nan", "png", 80, True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ empty latents
@pytest.mark.parametrize("shape", [(1, 4, 0, 0), (0, 4, 8, 8), (1, 4, 8, 0)])
def test_latents_of_size_0_are_parameter_errors_everywhere(shape, tiny_models, tiny_pipe):
    empty = torch.zeros(shape)
    ctx = torch.zeros(1, 256, tiny_pipe.context_dim)
    with pytest.raises(ParameterError, match=rf"latent has shape \({', '.join(map(str, shape))}\): an empty latent"):
        aura_flow.sample(tiny_pipe.velocity, ctx, ctx, empty, seed=1, steps=2, cfg=1.0, sampler="euler",
                         scheduler="normal", shift=1.73)
    model, te, vae = N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")
    (cond,) = N["AuraFlowTextEncode"]().encode(te, "a cat")
    with pytest.raises(NodeParameterError, match="an empty latent"):
        N["AuraFlowSampler"]().sample(model, cond, cond, 1, 2, 1.0, "euler", "normal", 1.73, 1.0,
                                      latent_image={"samples": empty})
    with pytest.raises(NodeParameterError, match="empty"):
        N["AuraFlowVAEDecode"]().decode({"samples": empty}, vae)
    with pytest.raises(NodeParameterError, match="empty"):
        vae.decode_tiled(empty, tile_x=8)
    with pytest.raises(NodeParameterError, match="pixels: expected .* at least one of at least 8x8"):
        N["AuraFlowVAEEncode"]().encode(torch.zeros(0, 64, 64, 3), vae)
    with pytest.raises(NodeParameterError, match="latent_image: expected a LATENT"):
        N["AuraFlowSampler"]().sample(model, cond, cond, 1, 2, 1.0, "euler", "normal", 1.73, 1.0,
                                      latent_image=[empty])


# ------------------------------------------------------------------------------------------------ bounded costs
@pytest.mark.parametrize("params, message", [
    ({"width": 16384, "height": 16384}, "width=16384 x height=16384 is 268,435,456 pixels; at most 16,777,216"),
    ({"width": 4096, "height": 4096, "number_of_images": 10},
     "number_of_images=10 images of 4096x4096 are 167,772,160 pixels; at most 41,943,040"),
])
def test_the_pixels_of_a_run_are_bounded(params, message):
    with pytest.raises(ParameterError, match=message):
        aura_flow.plan_generation(params)
    assert aura_flow.plan_generation({"width": 2048, "height": 2048, "number_of_images": 10}).number_of_images == 10


def test_the_sampler_node_bounds_its_empty_latent(tiny_models):
    model, te, _vae = N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")
    (cond,) = N["AuraFlowTextEncode"]().encode(te, "a cat")
    with pytest.raises(NodeParameterError, match="batch_size=10 images of 4096x4096"):
        N["AuraFlowSampler"]().sample(model, cond, cond, 1, 2, 1.0, "euler", "normal", 1.73, 1.0, width=4096,
                                      height=4096, batch_size=10)


# ------------------------------------------------------------------------------------------------ saving
@pytest.fixture
def saver(tmp_path, monkeypatch):
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "output"))
    return N["AuraFlowSaveImage"]()


@pytest.mark.parametrize("prefix, message", [
    ("cat\0.png", "filename_prefix='cat\\\\x00.png': give a file name \\(no NUL character\\)"),
    ("a" * 300, "filename_prefix: the name 'aaaa.*is 300 bytes long; at most 244 \\(the file name .* would be 311 "
                "bytes, and file names are limited to 255 bytes\\)"),
    ("ok/" + "ł" * 200, "is 400 bytes long; at most 244"),
    ("ł" * 200 + "/ok", "the folder name 'łłł.*is 400 bytes long; at most 255"),
    ("", "give a file name"),
])
def test_save_refuses_prefixes_that_cannot_name_a_file(saver, tmp_path, prefix, message):
    with pytest.raises(NodeParameterError, match=message):
        saver.save(torch.rand(1, 8, 8, 3), prefix, "png", 80, True)
    assert not (tmp_path / "output").exists() or not any((tmp_path / "output").rglob("*.png"))


def test_eight_parallel_saves_give_eight_files(saver, tmp_path):
    start = threading.Barrier(8)
    results, errors = [], []

    def save(i):
        start.wait()
        try:
            results.append(saver.save(torch.full((1, 8, 8, 3), i / 8), "same", "png", 80, False))
        except Exception as exc:  # noqa: BLE001 - any failure is the bug
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    names = sorted(r["ui"]["images"][0]["filename"] for r in results)
    assert len(set(names)) == 8 and sorted(p.name for p in (tmp_path / "output").iterdir()) == names


def test_a_link_in_the_output_folder_never_leads_a_save_outside(saver, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(NodeParameterError, match="leads outside the output folder .* through a link"):
        saver.save(torch.rand(1, 8, 8, 3), "sub/cat", "png", 80, True)
    assert list(outside.iterdir()) == []


def test_saving_never_changes_the_umask(saver, tmp_path, monkeypatch):
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    old = real(0o027)
    try:
        out = saver.save(torch.rand(2, 8, 8, 3), "masked", "webp", 80, True)
        assert engine.images.save_new_image
        assert calls == []
        for item in out["ui"]["images"]:
            assert (tmp_path / "output" / item["filename"]).stat().st_mode & 0o777 == 0o640
    finally:
        real(old)


def test_lora_strength_is_bounded_before_any_file_is_read(tiny_pipe, tmp_path):
    from aura_flow.errors import LoadError
    from aura_flow.lora.apply import apply_loras

    missing = tmp_path / "never_read.safetensors"
    for strength in (1e30, -101, float("inf")):
        with pytest.raises(ParameterError, match=r"strength of .* use a finite number in -100..100 \(1.0 is the LoRA"):
            apply_loras(tiny_pipe.transformer, [(missing, strength)])
    with pytest.raises(LoadError):  # 100 is allowed: the file is looked at next
        apply_loras(tiny_pipe.transformer, [(missing, 100)])


# ------------------------------------------------------------------------------------------------ the command line
def cli_args(out, *extra):
    return ["generate", "--checkpoint", "loaded-by-the-test", "--width", "64", "--height", "64", "--steps", "2",
            "--seed", "7", "--output-format", "png", "--out", str(out), *extra]


@pytest.fixture
def fake_load(tiny_pipe, monkeypatch):
    loads = []
    monkeypatch.setattr("aura_flow.pipeline.pipeline.load", lambda *a, **k: loads.append(a) or tiny_pipe)
    return loads


def test_the_cli_never_replaces_an_image(tmp_path, fake_load, capsys):
    from aura_flow.cli import main

    out = tmp_path / "out"
    assert main(cli_args(out)) == 0 and main(cli_args(out)) == 0
    first, second = capsys.readouterr().out.split()
    assert (first, second) == (str(out / "aura_flow_7_00.png"), str(out / "aura_flow_7_00_1.png"))
    assert sorted(p.name for p in out.iterdir()) == ["aura_flow_7_00.png", "aura_flow_7_00_1.png"]


def test_the_cli_checks_the_speed_before_loading(tmp_path, fake_load, capsys):
    from aura_flow.cli import main

    assert main(cli_args(tmp_path / "out", "--speed", "warp")) == 2
    assert "--speed='warp'" in capsys.readouterr().err and fake_load == []


def test_a_full_disk_is_an_error_message_not_a_traceback(tmp_path, fake_load, monkeypatch, capsys):
    import errno

    from aura_flow.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("aura_flow.images.write_first_free", full)
    assert main(cli_args(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "error: cannot write the images into --out" in err and "(No space left on device); free some space" in err
    assert "seed: 7" in err and not any((tmp_path / "out").glob("*.png"))


def test_sampling_costs_are_bounded_for_latents_and_schedules_from_elsewhere(tiny_pipe):
    ctx = torch.zeros(1, 256, tiny_pipe.context_dim)
    with pytest.raises(ParameterError, match="latent has a batch of 65; at most 64 images in one sampling"):
        aura_flow.sample(tiny_pipe.velocity, ctx, ctx, torch.zeros(65, 4, 8, 8), seed=1, steps=2, cfg=1.0,
                         sampler="euler", scheduler="normal", shift=1.73)
    t0 = time.perf_counter()
    with pytest.raises(ParameterError, match="sigmas: 1,000,000 values; at most 10001"):
        aura_flow.plan_sampling(seed=1, steps=2, cfg=1.0, sampler="euler", scheduler="normal", shift=1.73,
                                sigmas=torch.linspace(1, 0, 1_000_000))
    assert time.perf_counter() - t0 < 1
    with pytest.raises(ParameterError, match="finite numbers of 0 or more"):
        aura_flow.plan_sampling(seed=1, steps=2, cfg=1.0, sampler="euler", scheduler="normal", shift=1.73,
                                sigmas=[1.0, -1.0])
    with pytest.raises(ParameterError, match=r"negative: a context of shape \(1, 256, 3\); this model takes"):
        tiny_pipe.sample(ctx, ctx[..., :3], torch.zeros(1, 4, 8, 8), seed=1, steps=2, cfg=5.0, sampler="euler",
                         scheduler="normal", shift=1.73)


def test_sizes_a_format_cannot_hold_are_refused_before_work(saver, tmp_path):
    with pytest.raises(ParameterError, match=r"output_format='webp' holds at most 16383 pixels a side, and the image "
                                             r"is 16384x512; save it as png"):
        aura_flow.plan_generation({"width": 16384, "height": 512})
    assert aura_flow.plan_generation({"width": 16384, "height": 512, "output_format": "png"}).width == 16384
    with pytest.raises(NodeParameterError, match="format='webp' holds at most 16383 pixels a side"):
        saver.save(torch.rand(1, 1, 16400, 3), "wide", "webp", 80, True)
    assert saver.save(torch.rand(1, 1, 16400, 3), "wide", "png", 80, True)["ui"]["images"][0]["filename"]


def test_malformed_node_inputs_from_api_prompts(tiny_models):
    model, te, vae = N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")
    (cond,) = N["AuraFlowTextEncode"]().encode(te, "a cat")
    sampler = N["AuraFlowSampler"]()
    with pytest.raises(NodeParameterError, match=r"positive: expected a CONDITIONING entry \[tensor, options\]"):
        sampler.sample(model, [[]], cond, 1, 2, 1.0, "euler", "normal", 1.73, 1.0)
    with pytest.raises(NodeParameterError, match="latent_image: expected a LATENT"):
        sampler.sample(model, cond, cond, 1, 2, 1.0, "euler", "normal", 1.73, 1.0, latent_image={"samples": [[1]]})
    with pytest.raises(NodeParameterError, match="samples must be a .* SDXL latent, got NoneType"):
        N["AuraFlowVAEDecode"]().decode({}, vae)
    with pytest.raises(NodeParameterError, match=r"pixels: expected \(batch, height, width, 3\) images, got shape "
                                                 r"\(8, 8\)"):
        N["AuraFlowVAEEncode"]().encode(torch.zeros(8, 8), vae)


def test_the_demo_checks_its_cache_folder_before_building(tmp_path, capsys):
    from aura_flow.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["demo", "--cache", str(blocker / "cache"), "--out", str(tmp_path / "out")]) == 2
    assert f"--cache {blocker / 'cache' / 'demo-tiny'}: {blocker} is not a writable folder" in \
        capsys.readouterr().err
