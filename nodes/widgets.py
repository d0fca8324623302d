"""The widgets of the one-node generators, in the hosted Aura Flow API's order, built from aura_flow.params.

The local generate node and the remote one both take `generation_inputs`, so a workflow can swap one for the
other and keep its widget values. Only the image size range and the sampler/scheduler lists differ.
"""
from __future__ import annotations

from ..aura_flow import params as P
from ..aura_flow.pipeline.modes import SPEED_NAMES
from ..aura_flow.sampling import registry as R


def _range(name: str, widget: str, step, **extra) -> tuple:
    rng = P.RANGES[name]
    opts = {"default": P.DEFAULTS[name], "min": rng.lo, "max": rng.hi, "step": step}
    if widget == "INT":
        opts = {k: int(v) for k, v in opts.items()}
    opts.update(extra)
    opts["tooltip"] = rng.help[0].upper() + rng.help[1:] + f" ({opts['min']:g} to {opts['max']:g})."
    return (widget, opts)


def _choice(names, default: str, tooltip: str) -> tuple:
    names = list(names)
    return (names, {"default": default if default in names else names[0], "tooltip": tooltip})


def generation_inputs(remote: bool) -> dict:
    """``INPUT_TYPES()`` of a one-node generator: prompt, negative_prompt, cfg, seed, shift, steps, width, height,
    sampler, scheduler, number_of_images, output_format, output_quality, with the hosted API's defaults.

    ``remote=True``: sizes 512..2048 and the service's sampler/scheduler names; ``remote=False``: sizes 64..16384
    and every sampler/scheduler the engine registers.
    """
    lo, hi = (P.REMOTE_MIN_SIZE, P.REMOTE_MAX_SIZE) if remote else (P.LOCAL_MIN_SIZE, P.LOCAL_MAX_SIZE)
    if not remote:  # ComfyUI asks for INPUT_TYPES after every pack has loaded: pick up their sampler names
        from .comfyui.samplers import register_comfyui_samplers

        register_comfyui_samplers()
    where = "the service" if remote else "the engine"

    def size(name):
        return ("INT", {"default": P.DEFAULTS[name], "min": lo, "max": hi, "step": P.SIZE_STEP,
                        "tooltip": f"Image {name} in pixels ({lo} to {hi})."})

    return {
        "required": {
            "prompt": ("STRING", {"multiline": True, "default": P.DEFAULTS["prompt"],
                                  "tooltip": "What the image should show."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": P.DEFAULTS["negative_prompt"],
                                           "tooltip": "What the image should not show (used when cfg is not 1)."}),
            "cfg": _range("cfg", "FLOAT", 0.1, round=0.01),
            "seed": ("INT", {"default": 0, "min": 0, "max": P.MAX_SEED, "control_after_generate": True,
                             "tooltip": "Seed of the start noise; the same seed and settings give the same image."
                                        + (" The service makes one image per request, so a batch uses seed, "
                                           "seed+1, ..." if remote else "")}),
            "shift": _range("shift", "FLOAT", 0.01, round=0.001),
            "steps": _range("steps", "INT", 1),
            "width": size("width"),
            "height": size("height"),
            "sampler": _choice(R.REMOTE_SAMPLER_NAMES if remote else R.SAMPLER_NAMES, P.DEFAULTS["sampler"],
                               f"Sampling method, as {where} names it."),
            "scheduler": _choice(R.REMOTE_SCHEDULER_NAMES if remote else R.SCHEDULER_NAMES,
                                 P.DEFAULTS["scheduler"], "How the noise levels are spaced over the steps."),
            "number_of_images": _range("number_of_images", "INT", 1),
            "output_format": _choice(P.OUTPUT_FORMATS, P.DEFAULTS["output_format"],
                                     "Encoding of the images (webp, jpg or png)."),
            "output_quality": _range("output_quality", "INT", 1),
        }
    }


def speed_input() -> tuple:
    """The optional ``speed`` widget of the local sampler and generator: aura_flow.pipeline.speed's modes, "auto" first.
    Optional, so prompts and workflows saved before it existed still run (as "auto")."""
    return _choice(SPEED_NAMES, "auto", "auto: exact on a GPU, the lossless padding fold on the CPU. exact: the reference "
                                  "path. fold_padding: lossless. compile: torch.compile, the first run builds it "
                                  "(about a minute), then every size reuses it. cfg_cutoff, step_cache, fast: "
                                  "faster, with a small measured change to the image (see the README).")


def noise_device_input() -> tuple:
    """The optional ``noise_device`` widget of the local sampler and generator. Optional, so prompts and workflows
    saved before it existed still run (as "cpu", ComfyUI's start noise)."""
    return _choice(P.NOISE_DEVICES, "cpu", "Where the start noise is drawn. cpu: ComfyUI's noise, the same image on "
                                           "every machine. gpu: the GPU's own generator, as diffusers and Pony V7's "
                                           "noise node draw it, to match images made with diffusers on CUDA (on a "
                                           "machine without a GPU it is the same as cpu).")
