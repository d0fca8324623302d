"""``noise_device``: "cpu" (ComfyUI's start noise) or "gpu" (the compute device's own generator, as diffusers and
Pony V7's noise node draw it on CUDA), in the plan, the sampling loop, the pipeline and the nodes.

A velocity model that returns zeros leaves the start noise untouched through an euler run, so the sampled latent
is exactly the noise the run drew (divided by the latent scale): that shows which generator was used."""
from __future__ import annotations

import logging

import pytest
import torch

import aura_flow
from aura_flow.errors import ParameterError
from aura_flow.plan import plan_generation, plan_sampling
from aura_flow.sampling.loop import noise_generator_device, prepare_noise
from aura_flow.sampling.schedules import LATENT_SCALE

SETTINGS = dict(seed=123, steps=3, cfg=1.0, sampler="euler", scheduler="normal", shift=1.73)


def zero_velocity(x, sigma, context):
    return torch.zeros_like(x)


def drawn_noise(latent, noise_device):
    ctx = torch.zeros(1, 4, 8, device=latent.device)
    out = aura_flow.sample(zero_velocity, ctx, ctx, latent, plan_sampling(**SETTINGS, noise_device=noise_device))
    return out * LATENT_SCALE


def test_the_plan_checks_and_carries_it():
    assert plan_sampling(**SETTINGS).noise_device == "cpu"
    assert plan_generation({}, noise_device="gpu").sampling.noise_device == "gpu"
    with pytest.raises(ParameterError, match=r"noise_device='cuda' is not known; valid: cpu .* or gpu"):
        plan_sampling(**SETTINGS, noise_device="cuda")
    with pytest.raises(ParameterError, match="noise_device=None"):
        plan_generation({}, noise_device=None)


def test_where_each_setting_draws():
    cuda = torch.device("cuda", 1)  # a device object needs no GPU to exist
    assert noise_generator_device("cpu", cuda) == torch.device("cpu")
    assert noise_generator_device("gpu", cuda) == cuda
    assert noise_generator_device("gpu", "mps") == torch.device("mps")
    assert noise_generator_device("gpu", "cpu") == torch.device("cpu")


def test_cpu_noise_is_comfyuis(caplog):
    shape = (2, 4, 8, 8)
    want = torch.randn(shape, generator=torch.manual_seed(123))
    assert torch.equal(prepare_noise(shape, 123), want)
    latent = torch.zeros(shape)
    assert torch.allclose(drawn_noise(latent, "cpu"), want, atol=1e-6)
    # "gpu" where the sampling runs on the CPU: the CPU's generator, the same noise, and a log line saying so
    with caplog.at_level(logging.INFO, logger="aura_flow.sampling.loop"):
        assert torch.equal(drawn_noise(latent, "gpu"), drawn_noise(latent, "cpu"))
    assert "noise_device='gpu': the model runs on the CPU" in caplog.text


def test_pipeline_and_nodes_on_the_cpu_give_the_same_image_for_both(tiny_pipe):
    gen = dict(prompt="a fox", seed=4, steps=2, width=64, height=64, sampler="euler")
    cpu = tiny_pipe.generate(**gen)
    gpu = tiny_pipe.generate(**gen, noise_device="gpu")
    assert torch.equal(cpu.tensor, gpu.tensor)
    assert (cpu.record["noise_device"], gpu.record["noise_device"]) == ("cpu", "gpu")
    with pytest.raises(ParameterError, match="noise_device='GPU'"):
        tiny_pipe.generate(**gen, noise_device="GPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_noise_is_the_cuda_generators():
    shape = (1, 4, 16, 16)
    latent = torch.zeros(shape, device="cuda")
    want = torch.randn(shape, generator=torch.Generator("cuda").manual_seed(123), device="cuda")
    got = drawn_noise(latent, "gpu")
    assert got.device.type == "cuda" and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(drawn_noise(latent, "cpu").cpu(), torch.randn(shape, generator=torch.manual_seed(123)),
                          atol=1e-5)
    assert not torch.allclose(got.cpu(), drawn_noise(latent, "cpu").cpu())
