"""ComfyUI's native AuraFlow as a benchmark contender, on the benchmark's weights, in the same process.

ComfyUI's own loaders recognise AuraFlow only at full width (its model table requires a 2048-wide text input and
its MMDiT defaults to width 3072), so for the smaller presets this builds the same objects its
``load_diffusion_model_state_dict`` builds (detected config, ``supported_models.AuraFlow``, ``model_base.AuraFlow``,
``ModelPatcher``, the weights in the original key names) with only the widths filled in from the preset, and runs
``comfy.sample.sample`` (KSampler, euler/normal) and ``comfy.sd.VAE.decode``. ComfyUI's Pile-T5 text encoder class
is fixed at full size, so the prompts are the pack's encodings (ComfyUI's semantics; the pack caches them, as
ComfyUI caches its CLIPTextEncode outputs), and no text encoding is timed for ComfyUI.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def _import_comfy(path: Path, device: str):
    path = path.expanduser().resolve()
    if not (path / "comfy" / "sd.py").exists():
        return None, f"{path} is not a ComfyUI checkout (no comfy/sd.py)"
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = device.startswith("cpu")  # as `main.py --cpu`
        import comfy.model_detection  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy.supported_models  # noqa: F401
    except (ImportError, RuntimeError) as exc:
        return None, (f"cannot import ComfyUI from {path} with this Python ({exc}); run the benchmark with "
                      f"ComfyUI's Python, e.g. <ComfyUI venv>/bin/python -m benchmarks.run --comfyui {path}")
    return sys.modules["comfy"], None


def prepare(args, root: Path, pipe):
    """ComfyUI's model on the pipeline's weights, built once -> (``make(size_args, noise)`` giving its `Contender`
    for one image size, a note for the report), or (None, why not)."""
    import torch

    from aura_flow.tiny import transformer_to_original, vae_to_original
    from benchmarks.measure import Contender

    comfy, why = _import_comfy(args.comfyui, args.device)
    if comfy is None:
        return None, why
    if not args.device.startswith("cpu") and not torch.cuda.is_available():
        return None, f"device {args.device} is not available to ComfyUI here"
    import comfy.model_detection as detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample
    import comfy.sd
    import comfy.supported_models

    tr = pipe.transformer
    cfg = tr.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    sd = {k: v.detach().clone() for k, v in transformer_to_original(tr.state_dict()).items()}
    unet_config = detection.detect_unet_config(sd, "")
    if unet_config is None or "n_double_layers" not in unet_config:
        return None, "ComfyUI did not detect the transformer as AuraFlow"
    unet_config.update(dim=width, n_heads=cfg.num_attention_heads, global_conddim=width,
                       patch_size=cfg.patch_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels)
    device = torch.device(args.device)
    model_config = comfy.supported_models.AuraFlow(unet_config)
    model_config.set_inference_dtype(torch.float32, None, device=device)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())
    note = ("ComfyUI: text encoding not timed (its Pile-T5 class is fixed at full size; the pack's prompt "
            "encodings are its conditioning)")
    try:
        vae = comfy.sd.VAE(sd=vae_to_original(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
        decode = vae.decode
    except (ValueError, RuntimeError) as exc:  # its VAE config is fixed at the SDXL VAE's widths
        note += f"; its VAE loader refused this preset's VAE ({str(exc).splitlines()[0][:80]}), so the pack decodes"
        decode = pipe.decode

    positive = [[pipe.encode_prompt(args.prompt).float().cpu(), {}]]
    negative = [[pipe.encode_prompt(args.negative_prompt).float().cpu(), {}]]

    def make(size_args, noise):
        latent = torch.zeros(1, 4, size_args.height // 8, size_args.width // 8)

        def run():
            stamps = []
            samples = comfy.sample.sample(patcher, noise.clone(), args.steps, args.cfg, "euler", "normal", positive,
                                          negative, latent, callback=lambda *a: stamps.append(time.perf_counter()),
                                          disable_pbar=True, seed=args.seed)
            return decode(samples)[0].float().cpu(), stamps

        return Contender("comfyui", run)

    return make, note
