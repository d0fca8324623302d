"""Inpainting (a latent noise_mask) and ComfyUI's conditioning options, number for number with ComfyUI 0.30.

Fixture tests/data/comfyui_masks_and_conds.json, computed once with ComfyUI's own functions (see its ``about``):
``comfy.sampler_helpers.prepare_mask`` on the listed masks, ``percent_to_sigma`` of ComfyUI's flow model sampling,
and whole KSampler runs (``comfy.sample.sample``) of an AuraFlow model whose transformer is the analytic toy below,
with noise masks and conditioning entries carrying areas, masks, strengths and timestep ranges.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aura_flow import ParameterError
from aura_flow.sampling.conds import Cond, has_options
from aura_flow.sampling.loop import prepare_mask, sample
from aura_flow.sampling.schedules import ModelSampling

DATA = json.loads((Path(__file__).resolve().parent / "data" / "comfyui_masks_and_conds.json").read_text())
TOY = DATA["toy"]


def toy_velocity(x, sigma, context):
    """The fixture's toy transformer: a data ~ N(mu, s^2) flow, bent by tanh and by the input's spatial mean (so an
    area crop changes the prediction)."""
    s, k, c = TOY["s"], TOY["k"], TOY["c"]
    mu = context[:, :, :4].mean(dim=1)[:, :, None, None]
    sg = sigma.view(-1, 1, 1, 1)
    g = (1 - sg) * s ** 2 / ((1 - sg) ** 2 * s ** 2 + sg ** 2)
    x0 = mu + g * (x - (1 - sg) * mu)
    return (x - x0) / sg.clamp(min=1e-6) + k * torch.tanh(x) * sg + c * x.mean(dim=(2, 3), keepdim=True) * sg


def make_mask(r):
    if r["kind"] == "rand":
        return torch.rand(r["shape"], generator=torch.Generator().manual_seed(r["seed"]))
    m = torch.zeros(r["shape"])
    y0, y1, x0, x1 = r["box"]
    m[..., y0:y1, x0:x1] = r.get("value", 1.0)
    return m


def context(seed):
    return torch.randn(1, 7, TOY["width"], generator=torch.Generator().manual_seed(seed))


def conds(entries):
    out = []
    for e in entries:
        area = e.get("area")
        out.append(Cond(context(e["context_seed"]), area=None if area is None else tuple(area),
                        strength=e.get("strength", 1.0),
                        mask=make_mask(e["mask"]) if e.get("mask") else None, mask_strength=e.get("mask_strength", 1.0),
                        set_area_to_bounds=e.get("set_area_to_bounds", False),
                        start_percent=e.get("start_percent"), end_percent=e.get("end_percent")))
    return out


@pytest.mark.parametrize("case", DATA["prepare_mask"], ids=lambda c: f"{c['mask']['shape']}->{c['latent_shape']}")
def test_prepare_mask_matches_comfyui(case):
    got = prepare_mask(make_mask(case["mask"]), case["latent_shape"], torch.device("cpu"))
    assert list(got.shape) == case["output_shape"] and got.dtype == torch.float32
    assert torch.allclose(got.flatten(), torch.tensor(case["output"]), atol=1e-7, rtol=0)


def test_percent_to_sigma_matches_comfyui():
    for row in DATA["percent_to_sigma"]:
        assert ModelSampling(row["shift"]).percent_to_sigma(row["percent"]) == pytest.approx(row["sigma"], abs=1e-12)


@pytest.mark.parametrize("case", DATA["cases"], ids=lambda c: c["id"])
def test_masked_and_optioned_sampling_matches_comfyui(case):
    shape = (case["batch"], 4, case["latent_h"], case["latent_w"])
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(case["latent_seed"])) * 4.0
    given = {"samples": latent}
    if case["noise_mask"]:
        given["noise_mask"] = make_mask(case["noise_mask"])
    out = sample(toy_velocity, conds(case["positive"]), conds(case["negative"]), given, seed=case["seed"],
                 steps=case["steps"], cfg=case["cfg"], sampler=case["sampler"], scheduler=case["scheduler"],
                 shift=case["shift"], denoise=case["denoise"])
    want = torch.tensor(case["output"]).view(shape)
    scale = max(1.0, want.abs().max().item())
    assert (out["samples"] - want).abs().max().item() <= 2e-5 * scale, case["id"]
    assert out.get("noise_mask") is given.get("noise_mask")  # kept in the LATENT, as ComfyUI's KSampler keeps it
    assert torch.equal(given["samples"], latent)  # the input is never touched


def test_the_unmasked_region_keeps_the_input_latent():
    """Where the noise mask is 0 the result is the input latent (up to float rounding), as with ComfyUI's KSampler."""
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 4.0
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    for sampler in ("euler", "dpmpp_2m_sde", "heun", "ddim"):
        out = sample(toy_velocity, context(1), context(2), {"samples": latent, "noise_mask": mask}, seed=9, steps=4,
                     cfg=3.0, sampler=sampler, scheduler="normal", shift=1.73)["samples"]
        assert (out[..., :4] - latent[..., :4]).abs().max().item() < 1e-5, sampler
        assert (out[..., 4:] - latent[..., 4:]).abs().max().item() > 0.1, sampler


def test_plain_conditioning_keeps_the_batched_cfg_path():
    assert not has_options(context(1), context(2)) and not has_options([Cond(context(1))], [context(2)])
    assert has_options([Cond(context(1)), Cond(context(3))], context(2))
    assert has_options([Cond(context(1), strength=0.5)], context(2))
    plain = sample(toy_velocity, context(1), context(2), torch.zeros(1, 4, 8, 8), seed=1, steps=3, cfg=4.0,
                   sampler="euler", scheduler="normal", shift=1.73)
    listed = sample(toy_velocity, [Cond(context(1))], [Cond(context(2), strength=1.0)], torch.zeros(1, 4, 8, 8),
                    seed=1, steps=3, cfg=4.0, sampler="euler", scheduler="normal", shift=1.73)
    assert torch.equal(plain, listed)


def test_bad_masks_and_conditioning_are_refused_in_words():
    with pytest.raises(ParameterError, match="noise_mask must be"):
        sample(toy_velocity, context(1), context(2), {"samples": torch.zeros(1, 4, 8, 8), "noise_mask": "x"},
               seed=1, steps=2, cfg=4.0, sampler="euler", scheduler="normal", shift=1.73)
    with pytest.raises(ParameterError, match="context tensors"):
        sample(toy_velocity, [Cond(torch.zeros(7, 16)), Cond(context(1))], context(2), torch.zeros(1, 4, 8, 8),
               seed=1, steps=2, cfg=4.0, sampler="euler", scheduler="normal", shift=1.73)
