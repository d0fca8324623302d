"""Opt-in speed modes (aura_flow.pipeline.speed): the exact mode is the plain path, each mode stays within its PSNR bound
and really skips work. Tiny random model; timing lives in benchmarks/run.py only."""
from __future__ import annotations

import pytest
import torch

from aura_flow.params import ParameterError
from aura_flow.pipeline.speed import MODES, PSNR_BOUNDS, FastTransformer, SpeedOptions, fold_padding, psnr, velocity_model

PARAMS = dict(prompt="a cat on a mat", negative_prompt="blurry", width=64, height=64, steps=8, cfg=5.0, seed=3,
              sampler="euler", scheduler="normal", shift=1.73)


@pytest.fixture(scope="module")
def exact(tiny_pipe):
    return tiny_pipe.generate(speed=None, **PARAMS).tensor


class BlockCounter:
    """Counts the rows that went through the transformer's last joint block (i.e. fully computed rows)."""

    def __init__(self, transformer):
        self.rows = 0
        self.handle = transformer.joint_transformer_blocks[-1].register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.rows += kwargs["hidden_states"].shape[0]

    def close(self):
        self.handle.remove()


def _sample_with(pipe, speed, params=PARAMS):
    """aura_flow.sample with the speed mode's velocity model; -> (latent, model, rows computed)."""
    from aura_flow.sampling.loop import sample
    from aura_flow.plan import sigmas

    p = params
    pos, neg = pipe.encode_prompt(p["prompt"]), pipe.encode_prompt(p["negative_prompt"])
    model = velocity_model(pipe, speed, batch=1, cfg=p["cfg"],
                           sigmas=sigmas(p["scheduler"], p["steps"], shift=p["shift"], sampler=p["sampler"]))
    counter = BlockCounter(pipe.transformer)
    try:
        out = sample(model, pos, neg, torch.zeros(1, 4, p["height"] // 8, p["width"] // 8), seed=p["seed"],
                     steps=p["steps"], cfg=p["cfg"], sampler=p["sampler"], scheduler=p["scheduler"], shift=p["shift"])
    finally:
        counter.close()
    return out, model, counter.rows


def test_exact_mode_is_the_plain_path(tiny_pipe, exact):
    for speed in ("exact", SpeedOptions(), MODES["exact"]):
        assert torch.equal(tiny_pipe.generate(speed=speed, **PARAMS).tensor, exact)


def test_auto_is_the_padding_fold_on_cpu_and_exact_elsewhere(tiny_pipe, exact):
    from aura_flow.pipeline.speed import resolve

    auto = tiny_pipe.generate(**PARAMS).tensor  # generate's default
    assert torch.equal(auto, tiny_pipe.generate(speed="fold_padding", **PARAMS).tensor)
    assert 0 < (auto - exact).abs().max() < 1e-5  # the fold ran, and it is exact up to rounding
    assert resolve("auto", "cpu") == MODES["fold_padding"]
    assert resolve("auto", "cuda") is None and resolve("auto", torch.device("cuda", 0)) is None


@pytest.mark.parametrize("mode", ["compile", "cfg_cutoff", "step_cache", "fast"])
def test_named_modes_build_on_the_default(mode):
    from aura_flow.pipeline.speed import resolve

    on_cpu, on_cuda = resolve(mode, "cpu"), resolve(mode, "cuda")
    assert on_cpu.fold_padding and on_cpu == SpeedOptions(**{**MODES[mode].__dict__, "fold_padding": True})
    assert on_cuda == MODES[mode]
    assert resolve(MODES[mode], "cpu") == MODES[mode]  # a SpeedOptions is taken as given
    assert resolve("exact", "cpu") is None


def _inputs(tr, pad=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 256, tr.config.joint_attention_dim, generator=g)
    ctx[:, 256 - pad:] = 0
    return dict(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([0.7, 0.7]))


def test_fast_transformer_with_nothing_on_is_the_plain_forward(tiny_pipe):
    tr = tiny_pipe.transformer
    with torch.inference_mode():
        ref = tr(**_inputs(tr, pad=200), return_dict=False)[0]
        assert torch.equal(FastTransformer(tr)(**_inputs(tr, pad=200))[0], ref)
        assert torch.equal(tr(**_inputs(tr, pad=200), return_dict=False)[0], ref)  # processors left exact


def test_fold_padding_is_exact_up_to_rounding(tiny_pipe):
    tr = tiny_pipe.transformer
    ctx = _inputs(tr, pad=200)["encoder_hidden_states"]
    folded, count = fold_padding(ctx)
    assert folded.shape[1] == 57 and count == 200 and torch.equal(folded, ctx[:, :57])
    assert fold_padding(_inputs(tr)["encoder_hidden_states"])[1] == 1  # no padding: nothing folded
    with torch.inference_mode():
        ref = tr(**_inputs(tr, pad=200), return_dict=False)[0]
        out = FastTransformer(tr, fold=True)(**_inputs(tr, pad=200))[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_step_cache_full_call_equals_the_transformer(tiny_pipe):
    tr = tiny_pipe.transformer
    x, ctx, t = _inputs(tr).values()
    with torch.inference_mode():
        ref = tr(hidden_states=x, encoder_hidden_states=ctx, timestep=t, return_dict=False)[0]
        cache = FastTransformer(tr, cache_threshold=0.5)
        first = cache(hidden_states=x, encoder_hidden_states=ctx, timestep=t)[0]
        again = cache(hidden_states=x, encoder_hidden_states=ctx, timestep=t)[0]  # unchanged input: reused
    assert torch.equal(first, ref)
    assert cache.skipped == 1
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["fold_padding", "cfg_cutoff", "step_cache", "fast"])
def test_mode_within_its_psnr_bound(tiny_pipe, exact, mode):
    fast = tiny_pipe.generate(speed=mode, **PARAMS).tensor
    value = psnr(fast, exact)
    assert value >= PSNR_BOUNDS[mode], f"{mode}: {value:.1f} dB < {PSNR_BOUNDS[mode]} dB"
    assert value < 200  # it is an approximation: it must not be the exact path in disguise


def test_cfg_cutoff_skips_the_uncond_rows(tiny_pipe):
    steps = PARAMS["steps"]
    _, _, rows = _sample_with(tiny_pipe, SpeedOptions(cfg_cutoff=0.5))
    assert rows == 2 * 4 + 1 * 4  # 4 steps with cond + uncond, then 4 with cond only
    _, _, rows_exact = _sample_with(tiny_pipe, SpeedOptions(cfg_cutoff=1.0))
    assert rows_exact == 2 * steps


def test_step_cache_skips_steps(tiny_pipe):
    _, model, rows = _sample_with(tiny_pipe, MODES["step_cache"])
    cache = model.transformer
    assert cache.calls == PARAMS["steps"] and cache.skipped >= 1
    assert rows == 2 * (cache.calls - cache.skipped)


def test_cfg_cutoff_leaves_cfg_1_alone(tiny_pipe):
    params = dict(PARAMS, cfg=1.0)
    plain = tiny_pipe.generate(speed=None, **params).tensor
    assert torch.equal(tiny_pipe.generate(speed=SpeedOptions(cfg_cutoff=0.2), **params).tensor, plain)


@pytest.mark.parametrize("bad", [dict(cfg_cutoff=0.0), dict(cfg_cutoff=1.5), dict(cache_threshold=-0.1),
                                 dict(cache_threshold=1.0)])
def test_options_are_validated(bad):
    with pytest.raises(ParameterError):
        SpeedOptions(**bad)


def test_unknown_mode_is_refused(tiny_pipe):
    with pytest.raises(ParameterError, match="speed='turbo' is not known"):
        tiny_pipe.generate(speed="turbo", **PARAMS)


@pytest.mark.heavy
def test_compile_within_its_bound_and_across_sizes_without_a_rebuild(tiny_pipe, exact):
    from torch._dynamo.utils import counters

    fast = tiny_pipe.generate(speed="compile", **PARAMS).tensor  # on the CPU: compiled blocks and the fold
    assert (fast - tiny_pipe.generate(**PARAMS).tensor).abs().max() < 1e-3  # close to the eager fold
    assert psnr(fast, exact) >= PSNR_BOUNDS["compile"]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    other = dict(PARAMS, width=96, height=64, steps=2, prompt="a much longer prompt about a dog on a rug")
    torch.testing.assert_close(tiny_pipe.generate(speed="compile", **other).tensor,
                               tiny_pipe.generate(speed=None, **other).tensor, rtol=0, atol=1e-3)
    alone = tiny_pipe.generate(speed=SpeedOptions(compile=True), **other).tensor  # no fold: no bias argument
    torch.testing.assert_close(alone, tiny_pipe.generate(speed=None, **other).tensor, rtol=0, atol=1e-3)
    # another size, aspect and prompt length reused the build; only the call without a bias made a new graph
    assert counters["stats"]["unique_graphs"] - graphs <= 1


def test_pipeline_sample_takes_a_speed_and_defaults_to_exact(tiny_pipe):
    from aura_flow.sampling.loop import sample

    pos, neg = tiny_pipe.encode_prompt(PARAMS["prompt"]), tiny_pipe.encode_prompt(PARAMS["negative_prompt"])
    kw = {k: PARAMS[k] for k in ("seed", "steps", "cfg", "sampler", "scheduler", "shift")}
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    plain = sample(tiny_pipe.velocity, pos, neg, latent, **kw)["samples"]
    assert torch.equal(tiny_pipe.sample(pos, neg, latent, **kw)["samples"], plain)
    cut = tiny_pipe.sample(pos, neg, latent, speed="cfg_cutoff", **kw)["samples"]  # its schedule from the settings
    assert 0 < (cut - plain).abs().max() < 0.05 * plain.abs().max()
    with pytest.raises(ParameterError, match="speed='turbo'"):
        tiny_pipe.sample(pos, neg, latent, speed="turbo", **kw)


@pytest.mark.heavy
def test_a_compiled_model_is_freed_with_its_pipeline(tiny_models):
    """The compiled blocks live on the transformer, so a model loaded in place of another (as in a long ComfyUI
    session) does not keep the old one in memory."""
    import gc
    import weakref

    import aura_flow

    pipe = aura_flow.load(**tiny_models["diffusers"], device="cpu")
    pipe.generate(speed="compile", **dict(PARAMS, steps=2))
    assert "_aura_flow_compiled" in pipe.transformer.__dict__
    ref = weakref.ref(pipe.transformer)
    del pipe
    gc.collect()
    assert ref() is None
