"""ComfyUI sampler names the engine does not implement (a newer ComfyUI's, or another pack's), served by ComfyUI's
own sampler functions through the engine's k-diffusion calling convention.

Only inside ComfyUI. A name is offered when ComfyUI builds it as a plain k-diffusion sampler (a ``KSAMPLER`` with a
``sampler_function``) and it needs nothing the engine's CFG denoiser does not give: the CFG++ family reads the
unconditional prediction through ComfyUI's post-CFG hooks, which the engine runs its own way, so those are left
out. The sampler sees the denoiser dressed with the few attributes ComfyUI's samplers read (``model_sampling``
for this model: ComfyUI's own discrete-flow + CONST class, with the node's shift).
"""
from __future__ import annotations

import logging
import types

from ...aura_flow.sampling import registry

log = logging.getLogger(__name__)

LEFT_OUT = ("_cfg_pp",)  # need ComfyUI's sampler_post_cfg_function hooks


def comfy_model_sampling(shift: float):
    """ComfyUI's model sampling for AuraFlow (discrete flow, CONST prediction, multiplier 1) at ``shift``."""
    import comfy.model_sampling as ms  # inside ComfyUI only (its MODEL, or a sampler registered from it)

    class AuraFlowModelSampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    return AuraFlowModelSampling(types.SimpleNamespace(sampling_settings={"shift": shift, "multiplier": 1.0}))


class ComfyModelView:
    """The engine's CFG denoiser with the attributes ComfyUI's samplers read from their ``model`` argument."""

    def __init__(self, denoiser, model_sampling):
        self._denoiser = denoiser
        patcher = types.SimpleNamespace(
            get_model_object=lambda name: model_sampling if name == "model_sampling" else None)
        self.inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=model_sampling),
                                                 model_patcher=patcher)

    def __call__(self, x, sigma, **extra_args):
        return self._denoiser(x, sigma, **extra_args)


def comfy_sampler_function(name: str):
    """A k-diffusion-convention function running ComfyUI's sampler ``name`` on the engine's denoiser."""

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        import comfy.samplers as samplers  # registered from it

        sampler = samplers.sampler_object(name)
        view = ComfyModelView(model, comfy_model_sampling(model.model_sampling.shift))
        extra = {"model_options": {}, **(extra_args or {})}
        return sampler.sampler_function(view, x, sigmas, extra_args=extra, callback=callback, disable=disable,
                                        **sampler.extra_options)

    run.__qualname__ = f"comfyui:{name}"
    return run


def register_comfyui_samplers() -> list[str]:
    """Register ComfyUI's sampler names the engine lacks; idempotent, and a no-op outside ComfyUI."""
    try:
        import comfy.model_sampling  # noqa: F401 (comfy_model_sampling needs it)
        import comfy.samplers as samplers
    except ImportError:
        return []
    added = []
    for name in list(getattr(samplers.KSampler, "SAMPLERS", ())):
        if name in registry.SAMPLERS or name.endswith(LEFT_OUT):
            continue
        try:
            ok = callable(getattr(samplers.sampler_object(name), "sampler_function", None))
        except Exception as exc:  # a broken third-party sampler must not break the node list
            log.warning("AuraFlow: ComfyUI sampler %r cannot be used (%s)", name, exc)
            continue
        if not ok:
            continue
        registry.register_sampler(
            name, comfy_sampler_function(name),
            discard_penultimate=name in getattr(samplers.KSampler, "DISCARD_PENULTIMATE_SIGMA_SAMPLERS", ()))
        added.append(name)
    if added:
        log.info("AuraFlow: offering ComfyUI's own sampler(s) %s", ", ".join(added))
    return added
