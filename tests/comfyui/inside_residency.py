"""Run by test_residency.py with ComfyUI's Python (``python inside_residency.py CHECKOUT PACK_DIR TINY_DIR``): the
pack's nodes inside a real ComfyUI's own modules, on the CPU, checking that ComfyUI's memory manager owns the pack's
weights. Prints one JSON line of measurements; every check is also asserted here.

- residency: "Requested to load" once per part; a second sampling or encoding loads nothing anew;
- a tiny memory budget (the budget load_models_gpu hands LoadedModel.model_load, made small as on a GPU with little
  free memory): the transformer loads partially and the latent equals the fully loaded one, for float weights and
  for a GGUF file (TINY_DIR/../gguf, written by aura_flow.weights.writers.build_tiny_gguf);
- ComfyUI's own AuraFlow on the same weights (a core MODEL built as comfy.supported_models.AuraFlow builds it):
  free_memory unloads the pack's models for it and the other way round (on a CPU load_models_gpu never frees, so
  free_memory is called as it would be on a GPU, with the free-memory figure at 0);
- inpainting and conditioning areas: AuraFlow Sampler against ComfyUI's KSampler on those weights, and AuraFlow
  Sampler taking the core MODEL itself.
"""
import asyncio
import json
import logging
import sys
from pathlib import Path

checkout, pack_dir, tiny = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sys.path.insert(0, checkout)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import nodes  # noqa: E402

records = []


class Grab(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())


logging.getLogger().addHandler(Grab())
logging.getLogger().setLevel(logging.INFO)


def requested(since):
    return [m.split("Requested to load ", 1)[1] for m in records[since:] if m.startswith("Requested to load ")]


def loaded_names():
    return sorted(type(lm.model.model).__name__ for lm in mm.current_loaded_models if lm.model is not None)


assert asyncio.run(nodes.load_custom_node(pack_dir))
N = nodes.NODE_CLASS_MAPPINGS
report = {}

# ------------------------------------------------------------------------------------------------ residency
model, te, vae = N["AuraFlowLoader"]().load(
    str(tiny / "aura_flow_tiny_transformer.safetensors"), text_encoder=str(tiny / "text_encoder.safetensors"),
    vae=str(tiny / "vae.safetensors"), tokenizer=str(tiny / "tokenizer.model"), weight_dtype="fp32")
n = len(records)
encode = N["AuraFlowTextEncode"]()
pos = encode.encode(te, "a cat")[0]
neg = encode.encode(te, "")[0]
sampler = N["AuraFlowSampler"]()
args = dict(seed=3, steps=4, cfg=4.0, sampler_name="euler", scheduler="normal", shift=1.73, denoise=1.0, width=64,
            height=64, batch_size=1, speed="exact")
full = sampler.sample(model, pos, neg, **args)[0]["samples"]
image = nodes.VAEDecode().decode(vae, {"samples": full})[0]
report["first_run"] = requested(n)
assert report["first_run"] == ["AuraFlowTextEncoder", "AuraFlowTransformer", "AuraFlowAutoencoder"], report
n = len(records)
again = sampler.sample(model, pos, neg, **args)[0]["samples"]
encode.encode(te, "a dog")
nodes.VAEDecode().decode(vae, {"samples": again})
report["rerun"] = requested(n)
assert report["rerun"] == [] and torch.equal(again, full), report
assert loaded_names() == ["AuraFlowAutoencoder", "AuraFlowTextEncoder", "AuraFlowTransformer"], loaded_names()
patcher = te.patcher
assert type(patcher).__name__ == "AuraFlowPatcher" and isinstance(patcher, comfy.model_patcher.ModelPatcher)
assert comfy.model_patcher.is_model_patcher_output(te) and comfy.model_patcher.is_model_patcher_output(vae)

# ------------------------------------------------------------------------------------------------ partial load
def partially_loaded(model, full, key):
    """Sample again with a third of the transformer's bytes as the budget (the budget load_models_gpu would hand
    LoadedModel.model_load on a GPU with little free memory); record the log, the difference and the streaming."""
    patcher = model.transformer.__dict__["_comfyui_patcher"]
    size = patcher.model_size()
    mm.unload_all_models()
    assert loaded_names() == [], loaded_names()
    original_model_load = mm.LoadedModel.model_load

    def small_budget(self, lowvram_model_memory=0, force_patch_weights=False):
        if self.model is patcher:
            lowvram_model_memory = size // 3
        return original_model_load(self, lowvram_model_memory, force_patch_weights=force_patch_weights)

    mm.LoadedModel.model_load = small_budget
    n = len(records)
    calls = []
    layers = [m for m in model.transformer.modules() if hasattr(m, "comfy_cast_weights")]
    for layer in layers:
        layer.compute_weight = (lambda orig, lay: lambda dtype, device: calls.append(lay) or orig(dtype, device))(
            layer.compute_weight, layer)
    try:
        partial = sampler.sample(model, pos, neg, **args)[0]["samples"]
    finally:
        mm.LoadedModel.model_load = original_model_load
        for layer in layers:
            del layer.compute_weight
    streamed = [m for m in layers if m.comfy_cast_weights]
    report[key] = {"log": [m for m in records[n:] if m.startswith("loaded ")], "diff": float((partial - full).abs().max()),
                   "streamed_layers": len(streamed), "layers": len(layers), "loaded_bytes": patcher.loaded_size(),
                   "size": size, "lowvram": bool(patcher.model.model_lowvram)}
    assert any(m.startswith("loaded partially") for m in report[key]["log"]), report[key]
    assert report[key]["lowvram"] and 0 < len(streamed) < len(layers) and all(m in calls for m in streamed)
    assert report[key]["diff"] <= 1e-6, report[key]


partially_loaded(model, full, "partial")
gguf_dir = tiny.parent / "gguf"
gguf_model = N["AuraFlowLoader"]().load(
    str(next(gguf_dir.glob("*.gguf"))), text_encoder=str(gguf_dir / "text_encoder.safetensors"),
    vae=str(gguf_dir / "vae.safetensors"), tokenizer=str(gguf_dir / "tokenizer.model"), weight_dtype="fp32")[0]
gguf_full = sampler.sample(gguf_model, pos, neg, **args)[0]["samples"]
assert type(next(m for m in gguf_model.transformer.modules() if hasattr(m, "qtype"))).__name__ == "GGUFLinear"
partially_loaded(gguf_model, gguf_full, "partial_gguf")  # quantized blocks stream as they are, dequantized per call
report["gguf_vs_float"] = float((gguf_full - full).abs().max())
mm.unload_all_models()
del gguf_model
sampler.sample(model, pos, neg, **args)

# ------------------------------------------------------------------------------------------------ a core model
sd = comfy.utils.load_torch_file(str(tiny / "aura_flow_tiny_transformer.safetensors"))
dim = sd["cond_seq_linear.weight"].shape[0]
double = len({k.split(".")[1] for k in sd if k.startswith("double_layers.")})
single = len({k.split(".")[1] for k in sd if k.startswith("single_layers.")})
config = comfy.supported_models.AuraFlow({"cond_seq_dim": sd["cond_seq_linear.weight"].shape[1], "dim": dim,
                                          "global_conddim": dim, "n_heads": dim // model.transformer.config.attention_head_dim,
                                          "n_double_layers": double, "n_layers": double + single,
                                          "max_seq": sd["positional_encoding"].shape[1]})
config.set_inference_dtype(torch.float32, None)
base = config.get_model({})
missing, unexpected = base.diffusion_model.load_state_dict(sd, strict=False)
assert not missing and not unexpected, (missing, unexpected)
core = comfy.model_patcher.CoreModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())
n = len(records)
mm.load_models_gpu([core])
assert requested(n) == ["AuraFlow"] and "AuraFlow" in loaded_names(), (requested(n), loaded_names())
free = mm.get_free_memory
mm.get_free_memory = lambda dev=None, torch_free_too=False: (0, 0) if torch_free_too else 0
mine = ("AuraFlowAutoencoder", "AuraFlowTextEncoder", "AuraFlowTransformer")
core_loaded = [lm for lm in mm.current_loaded_models if lm.model is core]
mm.free_memory(1e30, torch.device("cpu"), keep_loaded=core_loaded)  # ComfyUI making room for the core model
report["after_core"] = loaded_names()
assert report["after_core"] == ["AuraFlow"], report
mm.get_free_memory = free
n = len(records)
sampler.sample(model, pos, neg, **args)  # the pack's transformer comes back
report["reloaded"] = requested(n)
mm.get_free_memory = lambda dev=None, torch_free_too=False: (0, 0) if torch_free_too else 0
pack_loaded = [lm for lm in mm.current_loaded_models if type(lm.model.model).__name__ in mine]
mm.free_memory(1e30, torch.device("cpu"), keep_loaded=pack_loaded)  # and room for the pack's: the core one goes
mm.get_free_memory = free
report["after_pack"] = loaded_names()
assert report["reloaded"] == ["AuraFlowTransformer"] and report["after_pack"] == ["AuraFlowTransformer"], report

# ------------------------------------------------------------------------------------------------ vs KSampler
latent = torch.randn(1, 4, 8, 8, generator=torch.manual_seed(5)) * 3
mask = torch.zeros(1, 64, 64)
mask[:, :, 32:] = 1.0
masked = nodes.SetLatentNoiseMask().set_mask({"samples": latent}, mask)[0]
ks_args = (3, 4, 4.0, "euler", "normal")
theirs = nodes.KSampler().sample(core, *ks_args, pos, neg, masked, denoise=1.0)[0]["samples"]
ours = sampler.sample(model, pos, neg, latent_image=masked, **{**args, "batch_size": 1})[0]["samples"]
native = sampler.sample(core, pos, neg, latent_image=masked, **{**args, "batch_size": 1})[0]["samples"]
keep = comfy.utils.reshape_mask(masked["noise_mask"], latent.shape) == 0
report["inpaint_vs_ksampler"] = float((ours - theirs).abs().max())
report["inpaint_native_vs_ksampler"] = float((native - theirs).abs().max())
report["kept_ours"] = float((ours[keep] - latent[keep]).abs().max())
report["kept_theirs"] = float((theirs[keep] - latent[keep]).abs().max())
report["changed"] = float((ours[~keep] - latent[~keep]).abs().mean())
assert report["inpaint_vs_ksampler"] < 1e-4 and report["inpaint_native_vs_ksampler"] < 1e-6, report
assert report["kept_ours"] < 1e-5 and report["kept_theirs"] < 1e-5 and report["changed"] > 0.1, report

dog = encode.encode(te, "a dog")[0]
area = nodes.ConditioningSetArea().append(dog, 32, 32, 16, 8, 1.2)[0]
ranged = nodes.ConditioningSetTimestepRange().set_range(pos, 0.0, 0.5)[0]
combined = nodes.ConditioningCombine().combine(nodes.ConditioningCombine().combine(pos, area)[0], ranged)[0]
theirs = nodes.KSampler().sample(core, *ks_args, combined, neg, {"samples": latent}, denoise=0.8)[0]["samples"]
ours = sampler.sample(model, combined, neg, latent_image={"samples": latent}, **{**args, "denoise": 0.8})[0]["samples"]
report["options_vs_ksampler"] = float((ours - theirs).abs().max())
assert report["options_vs_ksampler"] < 1e-4, report
try:
    sampler.sample(comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu")),
                   pos, neg, **args)
    raise AssertionError("a MODEL that is not AuraFlow was sampled")
except ValueError as exc:
    report["not_auraflow"] = str(exc)
    assert "holds Linear, not AuraFlow" in str(exc), exc
print(json.dumps(report))
