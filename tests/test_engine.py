"""The engine (issue 2): every layout, diffusers parity, ComfyUI semantics, and clear errors on bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aura_flow
from aura_flow import ParameterError
from aura_flow.errors import LoadError
from aura_flow.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SMALL = dict(width=64, height=64, steps=2, sampler="euler", scheduler="normal")


def _state(module):
    return {k: v.detach().float() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("layout", ["single_file", "transformer_only", "transformer_only_diffusers"])
def test_every_layout_loads_the_same_weights(tiny_models, tiny_pipe, layout):
    pipe = aura_flow.load(**tiny_models[layout], device="cpu")
    for part in ("transformer", "text_encoder", "vae"):
        ref, got = _state(getattr(tiny_pipe, part)), _state(getattr(pipe, part))
        assert ref.keys() == got.keys(), part
        for k in ref:
            assert torch.equal(ref[k], got[k]), f"{layout} {part} {k}"
    assert dict(pipe.transformer.config) == dict(tiny_pipe.transformer.config)
    # the same prompt gives the same ids whichever tokenizer file was used
    assert pipe.tokenizer("a photo of a cat") == tiny_pipe.tokenizer("a photo of a cat")


def test_config_is_inferred_from_shapes(tiny_pipe):
    from aura_flow.weights.configs import infer_t5_config, infer_transformer_config, infer_vae_config

    t = infer_transformer_config(tiny_pipe.transformer.state_dict(), {"aura_flow.attention_head_dim": "8"})
    cfg = tiny_pipe.transformer.config
    for k, v in t.items():
        assert cfg[k] == v, k
    t5 = infer_t5_config(tiny_pipe.text_encoder.state_dict())
    for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        assert getattr(t5, k) == getattr(tiny_pipe.text_encoder.config, k), k
    v = infer_vae_config(tiny_pipe.vae.state_dict())
    for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
        assert list(tiny_pipe.vae.config[k]) == list(v[k]) if isinstance(v[k], list) else tiny_pipe.vae.config[k] == v[k]
    # without metadata, a width that is a multiple of 256 gets AuraFlow's 256-wide heads
    sd = {k: v for k, v in tiny_pipe.transformer.state_dict().items()}
    sd["pos_embed.proj.weight"] = torch.zeros(3072, 16)
    sd["pos_embed.pos_embed"] = torch.empty(1, 256, 3072, device="meta")
    sd["context_embedder.weight"] = torch.empty(3072, 32, device="meta")
    assert infer_transformer_config(sd)["num_attention_heads"] == 12


def test_fp16_variant_folder(tmp_path, tiny_pipe):
    root = build_tiny(tmp_path, "diffusers", variant="fp16")
    assert not list((root / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    pipe = aura_flow.load(root, device="cpu", dtype="fp32")
    ref = _state(tiny_pipe.transformer)
    got = _state(pipe.transformer)
    for k in ref:
        assert torch.equal(ref[k].half().float(), got[k]), k


def test_dtypes_fp8_and_bf16_stay_close(tiny_models, tiny_pipe):
    exact = tiny_pipe.generate(prompt="a cat", seed=5, **SMALL).tensor
    for dtype, min_psnr in (("bf16", 25.0), ("fp8_e4m3fn", 15.0)):
        pipe = aura_flow.load(**tiny_models["single_file"], device="cpu", dtype=dtype)
        lin = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
        want = torch.float8_e4m3fn if dtype.startswith("fp8") else torch.bfloat16
        assert any(m.weight.dtype == want for m in lin)
        assert all(p.dtype == torch.float32 for p in pipe.vae.parameters())  # the VAE always decodes in fp32
        got = pipe.generate(prompt="a cat", seed=5, **SMALL).tensor
        mse = ((got - exact) ** 2).mean().item()
        psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()
        assert psnr >= min_psnr, (dtype, psnr)


def test_tokenizer_serialized_in_the_checkpoint(tmp_path, tiny_models, tiny_pipe):
    """ComfyUI saves Pile-T5's sentencepiece model into checkpoints as text_encoders.<name>.spiece_model."""
    from safetensors.torch import load_file, save_file

    src = Path(tiny_models["single_file"]["checkpoint"])
    sd = load_file(str(src))
    blob = (src.parent / "tokenizer.model").read_bytes()
    sd["text_encoders.pile_t5xl.spiece_model"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    alone = tmp_path / "with_tokenizer.safetensors"  # no tokenizer.model beside it
    save_file(sd, str(alone), metadata={"aura_flow.attention_head_dim": "8"})
    pipe = aura_flow.load(alone, device="cpu")
    assert pipe.tokenizer.source.endswith(":pile_t5xl.spiece_model")
    assert pipe.tokenizer("a photo of a cat") == tiny_pipe.tokenizer("a photo of a cat")


# ------------------------------------------------------------------ generation
def test_generate_matches_diffusers_pipeline(tiny_models, tiny_pipe):
    from diffusers import AuraFlowPipeline

    ref = AuraFlowPipeline.from_pretrained(str(tiny_models["diffusers"]["checkpoint"]), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    # 12x8 patches: an even count each way, where diffusers' centre crop and ComfyUI's agree (for odd counts
    # diffusers rounds the crop's start up and ComfyUI down; the engine follows ComfyUI)
    noise = torch.randn((2, 4, 16, 24), generator=torch.manual_seed(11))
    ours = tiny_pipe.generate(prompt="a photo of a cat", negative_prompt="blurry", width=192, height=128, steps=4,
                              cfg=5.0, seed=11, sampler="euler", scheduler="normal", number_of_images=2, shift=1.73)
    theirs = ref(prompt="a photo of a cat", negative_prompt="blurry", width=192, height=128, num_inference_steps=4,
                 guidance_scale=5.0, num_images_per_prompt=2, latents=noise.clone(), output_type="pt").images
    assert ours.tensor.shape == (2, 128, 192, 3)
    # our seeded noise is exactly the noise handed to diffusers
    assert torch.equal(aura_flow.prepare_noise((2, 4, 16, 24), 11), noise)
    assert (theirs.permute(0, 2, 3, 1) - ours.tensor).abs().max().item() < 1e-4
    assert ours.tensor.std() > 0.01  # a real image, not a constant


def test_vae_runs_channels_last_on_the_cpu_with_the_same_result(tiny_pipe):
    seen = []
    hook = tiny_pipe.vae.decoder.conv_in.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    z = torch.randn(2, 4, 16, 24, generator=torch.manual_seed(5))
    try:
        ours = tiny_pipe.decode(z)
    finally:
        hook.remove()
    assert seen == [True]  # the faster layout was used (the weights were not touched)
    assert all(p.is_contiguous() for p in tiny_pipe.vae.parameters())
    with torch.inference_mode():
        plain = ((tiny_pipe.vae.decode(z).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert ours.shape == (2, 128, 192, 3) and ours.is_contiguous()
    assert (ours - plain).abs().max() < 1e-4  # another kernel: rounding only
    images = ours[:, :64, :64]
    back = tiny_pipe.encode(images)
    with torch.inference_mode():
        ref = tiny_pipe.vae.encode(images.permute(0, 3, 1, 2).contiguous() * 2 - 1).latent_dist.mean
    assert back.is_contiguous() and (back - ref).abs().max() < 1e-4


@pytest.mark.parametrize("affine", [True, False])
def test_channels_last_group_norm_is_as_accurate_as_the_default_layout(affine):
    """torch's channels-last group norm on the CPU loses ~1e-4 when the mean is large against the spread; the
    VAE's layers take an accurate path for that layout (aura_flow.pipeline.vae_layout) and torch's otherwise."""
    from aura_flow.pipeline.vae_layout import install_group_norm

    g = torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, 64, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=g)
            norm.bias.normal_(generator=g)
    x = (torch.randn(2, 64, 96, 80, generator=g) * 0.5 + 3).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.group_norm(x.double(), 8, *(None if t is None else t.double()
                                                          for t in (norm.weight, norm.bias)), norm.eps)
    default_error = (norm(x.contiguous()) - ref).abs().max()
    assert install_group_norm(torch.nn.Sequential(norm)) == 1
    ours = norm(x)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert (ours - ref).abs().max() <= 2 * default_error + 1e-6
    assert torch.equal(norm(x.contiguous()), torch.nn.functional.group_norm(x.contiguous(), 8, norm.weight,
                                                                            norm.bias, norm.eps))


@pytest.mark.parametrize("case_id", ["000-euler-normal", "044-euler-simple"])
def test_sample_matches_comfyui_fixture(case_id):
    case = next(c for c in json.loads((DATA / "comfyui_sampler_parity.json").read_text())["cases"]
                if c["id"] == case_id)
    s, k = case["toy_s"], case["toy_k"]

    def toy(x, sigma, context):  # the fixture's analytic velocity field
        mu = context[:, :, :4].mean(dim=1)[:, :, None, None]
        sg = sigma.view(-1, 1, 1, 1)
        g = (1 - sg) * s ** 2 / ((1 - sg) ** 2 * s ** 2 + sg ** 2)
        x0 = mu + g * (x - (1 - sg) * mu)
        return (x - x0) / sg.clamp(min=1e-6) + k * torch.tanh(x) * sg

    pos = torch.randn(1, 7, 2048, generator=torch.Generator().manual_seed(case["positive_seed"]))
    neg = torch.randn(1, 7, 2048, generator=torch.Generator().manual_seed(case["negative_seed"]))
    latent = torch.zeros(case["batch"], 4, case["latent_h"], case["latent_w"])
    out = aura_flow.sample(toy, pos, neg, {"samples": latent}, seed=case["seed"], steps=case["steps"],
                           cfg=case["cfg"], sampler=case["sampler"], scheduler=case["scheduler"], shift=case["shift"])
    assert (out["samples"].flatten() - torch.tensor(case["output"])).abs().max().item() < 1e-4
    assert torch.equal(latent, torch.zeros_like(latent))  # the input is not mutated


def test_seed_reproducible_and_reported(tiny_pipe):
    a = tiny_pipe.generate(prompt="a cat", seed=42, **SMALL)
    b = tiny_pipe.generate(prompt="a cat", seed=42, **SMALL)
    c = tiny_pipe.generate(prompt="a cat", seed=43, **SMALL)
    assert torch.equal(a.tensor, b.tensor)
    assert (a.tensor - c.tensor).abs().max() > 1e-3
    r = tiny_pipe.generate(prompt="a cat", **SMALL)  # no seed: a random one, reported
    again = tiny_pipe.generate(prompt="a cat", seed=r.seed, **SMALL)
    assert torch.equal(r.tensor, again.tensor)
    assert a.seed == 42 and a.params["seed"] == 42


def test_batch_uses_one_noise_tensor(tiny_pipe):
    """ComfyUI draws the whole batch's noise from one generator: image 0 of a batch of 2 equals a batch of 1."""
    one = tiny_pipe.generate(prompt="a cat", seed=9, **SMALL)
    two = tiny_pipe.generate(prompt="a cat", seed=9, number_of_images=2, **SMALL)
    assert two.tensor.shape[0] == 2 and len(two.images) == 2
    assert (two.tensor[0] - one.tensor[0]).abs().max() < 1e-5
    assert (two.tensor[1] - two.tensor[0]).abs().max() > 1e-3


def test_cfg_one_skips_the_uncond_pass(tiny_pipe):
    rows = []  # batch rows through the transformer's output layer, per forward (every speed path ends there)
    hook = tiny_pipe.transformer.proj_out.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
    try:
        tiny_pipe.generate(prompt="a cat", negative_prompt="dog", seed=1, cfg=1.0, **SMALL)
        rows_cfg1 = list(rows)
        rows.clear()
        tiny_pipe.generate(prompt="a cat", negative_prompt="dog", seed=1, cfg=5.0, **SMALL)
        rows_cfg5 = list(rows)
        x = tiny_pipe.generate(prompt="a cat", negative_prompt="dog", seed=1, cfg=1.0, **SMALL)
        y = tiny_pipe.generate(prompt="a cat", negative_prompt="something else", seed=1, cfg=1.0, **SMALL)
    finally:
        hook.remove()
    assert rows_cfg1 == [1, 1]  # one single-row forward per step: no uncond pass
    assert rows_cfg5 == [2, 2]  # cond and uncond as one batched forward per step
    assert torch.equal(x.tensor, y.tensor)  # the negative prompt plays no part at cfg 1


def test_long_prompts_are_not_truncated(tiny_pipe):
    words = "a photo of a cat sitting on a mat " * 60
    ids, mask = tiny_pipe.tokenizer(words)
    assert len(ids) > 256 and sum(mask) == len(ids)
    a = tiny_pipe.encode_prompt(words + "purple")
    b = tiny_pipe.encode_prompt(words + "rainbow")
    assert a.shape[1] > 256
    n = min(a.shape[1], b.shape[1])
    assert (a[0, 256:n] - b[0, 256:n]).abs().max() > 1e-4  # the tail past 256 tokens reaches the model
    short = tiny_pipe.encode_prompt("a cat")
    n = sum(tiny_pipe.tokenizer("a cat")[1])
    assert short.shape[1] == 256 and torch.count_nonzero(short[0, n:]) == 0  # padding zeroed


@pytest.mark.parametrize("text,parsed", [
    ("a photo of a cat", [("a photo of a cat", 1.0)]),
    ("a (red:1.5) ((cat))", [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1.1 * 1.1)]),
    ("(x:0.5) (y) z", [("x", 0.5), (" ", 1.0), ("y", 1.1), (" z", 1.0)]),
    (r"a \(literal\) x", [("a (literal) x", 1.0)]),
    ("(a:bad) b", [("a:bad", 1.1), (" b", 1.0)]),
    ("unclosed (paren", [("unclosed ", 1.0), ("(paren", 1.0)]),
])
def test_prompt_weights_parse_like_comfyui(text, parsed):
    from aura_flow.prompts import parse_weights

    assert parse_weights(text) == parsed


def test_weighted_tokens_scale_away_from_the_empty_prompt(tiny_pipe):
    """z = z_empty + w (z - z_empty) on the weighted tokens (ComfyUI's rule); other tokens are untouched."""
    from aura_flow.prompts import encode_prompt

    te, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    ids, mask, weights = tok.weighted("a (cat:1.5) on a mat")
    assert weights.count(1.5) >= 1 and set(weights) == {1.0, 1.5}
    weighted = encode_prompt(te, tok, "a (cat:1.5) on a mat", "cpu", torch.float32)[0]
    with torch.inference_mode():
        rows = torch.tensor([ids, [tok.end_id] + [tok.pad_id] * (len(ids) - 1)])
        masks = torch.tensor([mask, [1] + [0] * (len(ids) - 1)])
        out = te(input_ids=rows, attention_mask=masks)[0] * masks.unsqueeze(-1)
    plain, empty = out[0], out[1]
    w = torch.tensor(weights).view(-1, 1)
    assert torch.allclose(weighted, empty + w * (plain - empty), atol=1e-6)
    moved = (weighted - plain).abs().amax(dim=1) > 1e-6
    assert moved.tolist() == [x != 1.0 for x in weights]  # exactly the weighted tokens changed
    # weight 1 everywhere is the plain encoding
    assert torch.equal(encode_prompt(te, tok, "a cat", "cpu", torch.float32),
                       encode_prompt(te, tok, "a (cat:1.0)", "cpu", torch.float32))


def test_sizes_beyond_the_position_grid_and_odd_sizes(tiny_pipe):
    grid = int(tiny_pipe.transformer.config.pos_embed_max_size ** 0.5)  # 16 patches -> 256 px
    big = tiny_pipe.generate(prompt="a cat", seed=1, width=grid * 16 + 64, height=128, steps=1, sampler="euler")
    assert big.tensor.shape == (1, 128, grid * 16 + 64, 3) and torch.isfinite(big.tensor).all()
    odd = tiny_pipe.generate(prompt="a cat", seed=1, width=72, height=88, steps=1, sampler="euler")  # 9x11 latent
    assert odd.tensor.shape == (1, 88, 72, 3) and torch.isfinite(odd.tensor).all()
    # within the grid the embedding is the centre crop (what diffusers and ComfyUI both use)
    pe = tiny_pipe.transformer.pos_embed
    x = torch.zeros(1, 4, 8, 8)
    got = pe(x) - pe.proj(torch.zeros(1, 16, 16))
    idx = pe.pe_selection_index_based_on_dim(8, 8)
    assert torch.allclose(got, pe.pos_embed[:, idx], atol=1e-6)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name,value,fragment", [
    ("cfg", 25.0, "cfg=25.0 is out of range; allowed: 0.0..20.0"),
    ("cfg", -1, "cfg=-1.0 is out of range"),
    ("shift", 11, "shift=11.0 is out of range; allowed: 0.0..10.0"),
    ("steps", 0, "steps=0 is out of range; allowed: 1..100"),
    ("steps", 101, "steps=101 is out of range"),
    ("steps", 2.5, "steps=2.5 is not an integer"),
    ("width", 60, "width=60 is out of range; allowed: 64..16384"),
    ("height", 100, "height=100 is not a multiple of 8"),
    ("number_of_images", 11, "number_of_images=11 is out of range; allowed: 1..10"),
    ("output_quality", 101, "output_quality=101 is out of range; allowed: 0..100"),
    ("output_format", "gif", "output_format='gif' is not known; valid names: webp, jpg, png"),
    ("seed", -1, "seed=-1 is out of range; allowed: 0..18446744073709551615"),
    ("seed", 2**64, "seed=18446744073709551616 is out of range"),
    ("sampler", "eulr", "sampler='eulr' is not known; valid names: euler"),
    ("scheduler", "linear", "scheduler='linear' is not known; valid names: simple, sgm_uniform"),
    ("guidance", 5, "unknown parameter(s) guidance"),
])
def test_bad_parameters_fail_before_any_work(tiny_pipe, name, value, fragment):
    calls = []
    hook = tiny_pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ParameterError) as err:
            tiny_pipe.generate(prompt="a cat never encoded before", **{name: value})
    finally:
        hook.remove()
    assert fragment in str(err.value)
    assert calls == []  # nothing heavy ran


def test_nan_schedule_is_refused_with_its_reason(tiny_pipe):
    """kl_optimal at 1 step divides by zero in ComfyUI's formula; refuse it instead of drawing a black image."""
    assert torch.isnan(aura_flow.sigmas("kl_optimal", 1)).any()  # the schedule itself stays ComfyUI's
    with pytest.raises(ParameterError, match="scheduler='kl_optimal' gives no usable schedule for steps=1"):
        tiny_pipe.generate(prompt="a cat", seed=1, width=64, height=64, steps=1, scheduler="kl_optimal",
                           sampler="euler")


def test_not_auraflow_files_are_described(tmp_path):
    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(sdxl))
    with pytest.raises(LoadError, match=r"sdxl.safetensors: no AuraFlow transformer keys found: this is a Stable "
                                        r"Diffusion / SDXL UNet checkpoint, not AuraFlow\.$"):
        aura_flow.load(sdxl)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(LoadError, match="first keys: foo.weight"):
        aura_flow.load(other)


def test_truncated_and_corrupt_files(tmp_path, tiny_models):
    src = Path(tiny_models["single_file"]["checkpoint"])
    cut = tmp_path / "cut.safetensors"
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"cut.safetensors: not a readable safetensors file .*the file is truncated"):
        aura_flow.load(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoadError, match="junk.safetensors: not a readable safetensors file"):
        aura_flow.load(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(LoadError, match="empty.safetensors"):
        aura_flow.load(empty)


def test_missing_components_and_tokenizer(tmp_path, tiny_models):
    src = Path(tiny_models["transformer_only"]["checkpoint"])
    lone = tmp_path / "lone" / src.name
    lone.parent.mkdir()
    shutil.copy(src, lone)
    with pytest.raises(LoadError, match="has no text encoder; give one as text_encoder=PATH"):
        aura_flow.load(lone)
    te = Path(tiny_models["transformer_only"]["text_encoder"])
    with pytest.raises(LoadError, match="has no VAE; give one as vae=PATH"):
        aura_flow.load(lone, text_encoder=te)
    with pytest.raises(LoadError, match="no tokenizer found; give one as tokenizer=PATH"):
        aura_flow.load(lone, text_encoder=te, vae=tiny_models["transformer_only"]["vae"])
    pipe = aura_flow.load(lone, text_encoder=te, vae=tiny_models["transformer_only"]["vae"],
                          tokenizer=te.parent / "tokenizer.model")
    assert pipe.tokenizer.source.endswith("tokenizer.model")
    with pytest.raises(LoadError, match="vae='/nowhere/vae.safetensors' does not exist"):
        aura_flow.load(lone, vae="/nowhere/vae.safetensors")
    with pytest.raises(ParameterError, match="dtype='fp12' is not known; valid: auto, fp32"):
        aura_flow.load(lone, dtype="fp12")
    with pytest.raises(ParameterError, match="device='gpu0' is not a torch device"):
        aura_flow.load(lone, device="gpu0")
    if not torch.cuda.is_available():  # CI: say so before reading any weights
        with pytest.raises(ParameterError, match="device='cuda': this torch has no usable CUDA device"):
            aura_flow.load(lone, device="cuda")


# ------------------------------------------------------------------ command line
@pytest.mark.heavy
def test_cli_generate_writes_images(tmp_path, tiny_models):
    kw = tiny_models["transformer_only"]
    cmd = [sys.executable, "-m", "aura_flow", "generate", "--checkpoint", str(kw["checkpoint"]), "--text-encoder",
           str(kw["text_encoder"]), "--vae", str(kw["vae"]), "--prompt", "a cat", "--seed", "7", "--steps", "2",
           "--width", "64", "--height", "72", "--sampler", "euler", "--number-of-images", "2", "--output-format",
           "png", "--out", str(tmp_path / "o")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    paths = run.stdout.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    from PIL import Image

    from aura_flow.images import read_metadata

    img = Image.open(paths[0])
    assert img.size == (64, 72)
    assert read_metadata(paths[0])["parameters"]["seed"] == 7
    assert "seed: 7" in run.stderr and "2/2" in run.stderr  # progress bar reached the end
    bad = subprocess.run(cmd[:-2] + ["--cfg", "30"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cfg=30.0 is out of range; allowed: 0.0..20.0" in bad.stderr


def test_saved_images_are_readable_by_others(tmp_path):
    """Atomic saves go through a private temp file; the result gets the usual permissions (umask applied)."""
    import os

    from PIL import Image

    from aura_flow.images import save_image_atomic

    old = os.umask(0o022)
    try:
        path = save_image_atomic(Image.new("RGB", (8, 8), (200, 10, 10)), tmp_path / "x.png", "png")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert Image.open(path).getpixel((3, 3)) == (200, 10, 10)


def test_text_encoder_waits_on_the_cpu_only_when_memory_is_short(tiny_models):
    from aura_flow.weights.devices import WORKING_MEMORY, text_encoder_should_wait

    gib = 2**30
    real_bf16 = {"transformer": int(13.6 * gib), "text_encoder": int(2.4 * gib), "vae": int(0.33 * gib)}
    assert not text_encoder_should_wait(40 * gib, real_bf16)  # an A100/H100: everything stays on the GPU
    assert text_encoder_should_wait(16 * gib, real_bf16)  # a 16 GB card: the text encoder waits on the CPU
    edge = sum(real_bf16.values()) + WORKING_MEMORY
    assert not text_encoder_should_wait(edge, real_bf16) and text_encoder_should_wait(edge - 1, real_bf16)
    assert not text_encoder_should_wait(1 * gib, {**real_bf16, "text_encoder": 0})  # none loaded: nothing to move
    # on the CPU there is nothing to release; asking for it is allowed, a wrong value is named before any reading
    assert aura_flow.load(**tiny_models["diffusers"], device="cpu").offload_text_encoder is False
    pipe = aura_flow.load(**tiny_models["diffusers"], device="cpu", offload_text_encoder=True)
    assert pipe.offload_text_encoder is True and pipe.encode_prompt("a cat").shape[1] >= 256
    with pytest.raises(ParameterError, match="offload_text_encoder='yes'"):
        aura_flow.load(**tiny_models["diffusers"], device="cpu", offload_text_encoder="yes")
