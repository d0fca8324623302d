"""AuraFlow Sampler on a ComfyUI ``MODEL`` that holds AuraFlow (Load Checkpoint, Load Diffusion Model, a GGUF
loader, after core LoRA nodes).

ComfyUI's own guider runs it — its memory manager, LoRA patches, hooks, conditioning options and inpainting come
with it — with the pack's settings: the sampler name (ComfyUI's function of that name; the engine's 44 give the
same numbers), the schedule the pack computes (the one the sigma plot shows; exactly ComfyUI's), and the node's
shift applied to a clone of the model as ModelSamplingAuraFlow applies it. The pack's speed modes act on the
diffusers transformer the pack loads and do not apply to ComfyUI's own AuraFlow.
"""
from __future__ import annotations

import logging

from ...aura_flow.errors import ParameterError
from .samplers import comfy_model_sampling

log = logging.getLogger(__name__)


def is_comfy_model(model) -> bool:
    """True for a ComfyUI MODEL (a ModelPatcher); False outside ComfyUI."""
    try:
        import comfy.model_patcher as mp
    except ImportError:
        return False
    return isinstance(model, mp.ModelPatcher)


def context_width(model) -> int | None:
    """The text width the MODEL's AuraFlow takes (2048 for Pile-T5-XL), or None when it cannot be read."""
    try:
        weight = model.model.diffusion_model.cond_seq_linear.weight
    except AttributeError:
        return None
    shape = getattr(weight, "tensor_shape", None) or weight.shape  # GGUF tensors keep their logical shape there
    return int(shape[-1]) if len(shape) == 2 else None


def check_auraflow(model) -> None:
    """Refuse, in the node's words, a MODEL that is not AuraFlow."""
    try:
        import comfy.model_base as base
    except ImportError:
        base = None
    inner = getattr(model, "model", None)
    if base is None or not isinstance(inner, base.AuraFlow):
        raise ParameterError(f"model: this ComfyUI MODEL holds {type(inner).__name__}, not AuraFlow. Load an AuraFlow "
                             "checkpoint (Load Checkpoint, Load Diffusion Model or a GGUF loader), or use AuraFlow "
                             "Loader")


def sample(model, positive, negative, latent: dict, plan, *, progress=None) -> dict:
    """Sample ``latent`` with ComfyUI's guider on ``model`` (already checked) and ``plan``'s settings; returns the
    LATENT as ComfyUI's KSampler does (a copy, noise_mask kept)."""
    import comfy.sample as comfy_sample  # there: the MODEL is ComfyUI's
    import comfy.samplers as samplers

    if plan.speed not in (None, "auto", "exact"):
        log.info("AuraFlow Sampler: speed %r applies to models from AuraFlow Loader; a ComfyUI MODEL runs "
                 "ComfyUI's own AuraFlow", plan.speed)
    patched = model.clone()
    patched.add_object_patch("model_sampling", comfy_model_sampling(plan.shift))
    latent_image = comfy_sample.fix_empty_latent_channels(patched, latent["samples"])
    if len(plan.sigmas) == 0:  # denoise 0
        return dict(latent)
    noise = comfy_sample.prepare_noise(latent_image, plan.seed, latent.get("batch_index"))
    total = len(plan.sigmas) - 1

    def callback(step, x0, x, total_steps):
        if progress is not None:
            progress(min(step + 1, total), total, x0)

    samples = comfy_sample.sample_custom(patched, noise, plan.cfg, samplers.sampler_object(plan.sampler),
                                         plan.sigmas_tensor(), positive, negative, latent_image,
                                         noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=True,
                                         seed=plan.seed)
    out = dict(latent)
    out.pop("downscale_ratio_spacial", None)
    out.pop("downscale_ratio_temporal", None)
    out["samples"] = samples
    return out
