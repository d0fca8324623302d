"""Parameter names, defaults, ranges and validation shared by the engine, the CLI, the nodes and the remote client.

Torch-free on purpose: the ComfyUI nodes build their widgets from these tables at import time.
Defaults and ranges are those of the hosted Aura Flow API (shared/seed/aura-flow-hosted-api.txt); the local
engine differs only in image size, where it accepts what ComfyUI accepts (multiples of 8 from 64 up).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import ParameterError, shown  # re-exported: aura_flow.params.ParameterError
from .prompts import check_prompt
from .sampling import registry  # names read when used: register_sampler adds to them at runtime

MAX_SEED = 2**64 - 1
OUTPUT_FORMATS = ("webp", "jpg", "png")
FORMAT_MAX_SIDE = {"webp": 16383, "jpg": 65535}  # the formats' own limits (png: 2**31)
# weight dtypes of the transformer and text encoder (fp8 is storage only; compute runs in bf16/fp16)
DTYPES = ("auto", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")

# Local sizes: multiples of 8 (the VAE's factor) from 64 up to ComfyUI's MAX_RESOLUTION (16384).
LOCAL_MIN_SIZE = 64
LOCAL_MAX_SIZE = 16384
SIZE_STEP = 8
# The hosted service's own limit.
REMOTE_MIN_SIZE = 512
REMOTE_MAX_SIZE = 2048
# where the start noise is drawn: ComfyUI's CPU generator, or the compute device's (diffusers' default on CUDA)
NOISE_DEVICES = ("cpu", "gpu")
# What one run may cost: the position grid is interpolated beyond 1024x1024, but attention grows with the square of
# the pixels; 4096x4096 per image (16x AuraFlow's size) and ten 2048x2048 images in all.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_BATCH_PIXELS = 10 * 2048 * 2048
# Images in one sampling (a latent batch from elsewhere; ComfyUI allows 4096): each costs a whole model pass with its
# own copy of the prompt, whatever its size.
MAX_LATENT_BATCH = 64
MIN_SHIFT = 0.01  # the smallest shift above 0 (ComfyUI's widget step); 0 itself is refused with its own reason



@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    default: float | int
    kind: type
    help: str


# name -> (range, default). Order is the hosted API's widget order used by both one-node generators.
RANGES: dict[str, Range] = {
    "cfg": Range(0.0, 20.0, 5.0, float, "classifier-free guidance scale; 1 disables the negative prompt pass"),
    "shift": Range(0.0, 10.0, 1.73, float, "timestep shift of the flow schedule; higher spends more steps at high noise"),
    "steps": Range(1, 100, 25, int, "number of sampling steps"),
    "number_of_images": Range(1, 10, 1, int, "how many images to generate"),
    "output_quality": Range(0, 100, 80, int, "webp/jpg quality, 0 worst to 100 best (ignored for png)"),
    "denoise": Range(0.0, 1.0, 1.0, float, "fraction of the schedule to run; below 1 starts from the given latent"),
}

DEFAULTS = {
    "prompt": "",
    "negative_prompt": "",
    "cfg": 5.0,
    "seed": None,
    "shift": 1.73,
    "steps": 25,
    "width": 1024,
    "height": 1024,
    "sampler": "uni_pc",
    "scheduler": "normal",
    "number_of_images": 1,
    "output_format": "webp",
    "output_quality": 80,
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(name: str, value, rng: Range | None = None):
    """Return ``value`` converted to the parameter's type, or raise ParameterError naming it and its range."""
    rng = rng or RANGES[name]
    if rng.kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ParameterError(f"{name}={shown(value)} is not an integer; allowed: {rng.lo}..{rng.hi}")
    else:
        if not _is_number(value) or not math.isfinite(float(value)):
            raise ParameterError(f"{name}={shown(value)} is not a finite number; allowed: {rng.lo}..{rng.hi}")
        value = float(value)
    if not (rng.lo <= value <= rng.hi):
        raise ParameterError(f"{name}={shown(value)} is out of range; allowed: {rng.lo}..{rng.hi}")
    return value


def check_size(name: str, value, *, remote: bool = False) -> int:
    lo, hi = (REMOTE_MIN_SIZE, REMOTE_MAX_SIZE) if remote else (LOCAL_MIN_SIZE, LOCAL_MAX_SIZE)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ParameterError(f"{name}={shown(value)} is not an integer; allowed: {lo}..{hi}")
    if not (lo <= value <= hi):
        raise ParameterError(f"{name}={shown(value)} is out of range; allowed: {lo}..{hi}"
                             + ("" if remote else f" in steps of {SIZE_STEP}"))
    if not remote and value % SIZE_STEP:
        lower = value - value % SIZE_STEP
        raise ParameterError(f"{name}={shown(value)} is not a multiple of {SIZE_STEP} (the VAE's downscale factor); "
                             f"use {lower} or {lower + SIZE_STEP}")
    return value


def check_area(width: int, height: int, number: int, *, names=("width", "height", "number_of_images")) -> None:
    """The pixels of one run, bounded: ``width`` x ``height`` per image and times ``number`` in all."""
    w, h, n = names
    if width * height > MAX_IMAGE_PIXELS:
        raise ParameterError(f"{w}={width} x {h}={height} is {width * height:,} pixels; at most {MAX_IMAGE_PIXELS:,} "
                             "(4096x4096) per image: generate smaller and upscale")
    if width * height * number > MAX_BATCH_PIXELS:
        raise ParameterError(f"{n}={number} images of {width}x{height} are {width * height * number:,} pixels; at most "
                             f"{MAX_BATCH_PIXELS:,} (ten 2048x2048) in one run: make fewer images at a time")


def check_shift(value) -> float:
    """The flow shift: a number in 0..10 (the hosted API's range) other than 0, which would make every noise level 0
    and leave nothing to sample."""
    value = check_range("shift", value)
    if value == 0.0:
        raise ParameterError(f"shift={value!r} makes every noise level 0, so nothing would be sampled; allowed: above "
                             f"0 up to {RANGES['shift'].hi:g} (AuraFlow's default is {RANGES['shift'].default})")
    if value < MIN_SHIFT:  # below this the float32 noise levels collapse to 0 and some schedules turn NaN
        raise ParameterError(f"shift={value!r} is too small: the noise levels collapse to 0; allowed: {MIN_SHIFT:g} up "
                             f"to {RANGES['shift'].hi:g} (AuraFlow's default is {RANGES['shift'].default})")
    return value


# a LoRA's strength: 1 is the LoRA as trained, 0 turns it off, negative values subtract it
LORA_STRENGTH = Range(-10.0, 10.0, 1.0, float, "how strongly the LoRA applies: 1 as trained, 0 off, negative "
                                               "subtracts it")


def check_seed(seed) -> int:
    """A seed from 0 to 2**64-1; None draws a random one (the caller reports the seed it used)."""
    if seed is None:
        return random.SystemRandom().randrange(0, 2**53)
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ParameterError(f"seed={shown(seed)} is not an integer; allowed: 0..{MAX_SEED}")
    if not (0 <= seed <= MAX_SEED):
        raise ParameterError(f"seed={shown(seed)} is out of range; allowed: 0..{MAX_SEED}")
    return seed


def check_choice(name: str, value, choices) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ParameterError(f"{name}={shown(value)} is not known; valid names: {', '.join(choices)}")
    return value


def check_noise_device(value) -> str:
    if value not in NOISE_DEVICES:
        raise ParameterError(f"noise_device={shown(value)} is not known; valid: cpu (ComfyUI's start noise, the same "
                             f"on every machine) or gpu (drawn on the compute device, as diffusers does on CUDA)")
    return value


def validate_generation(params: dict, *, remote: bool = False) -> dict:
    """Validate and normalise a full set of hosted-API parameters (missing ones take their defaults).

    Raises ParameterError on the first bad one, before any model work. Unknown keys are refused too, so a typo
    is not silently ignored.
    """
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    p = {**DEFAULTS, **{k: v for k, v in params.items()}}
    out = {
        # bounded length, valid text, and (locally, where they are parsed) weights in range
        "prompt": check_prompt("prompt", p["prompt"], weights=not remote),
        "negative_prompt": check_prompt("negative_prompt", p["negative_prompt"], weights=not remote),
        "cfg": check_range("cfg", p["cfg"]),
        "seed": check_seed(p["seed"]),
        "shift": check_shift(p["shift"]),
        "steps": check_range("steps", p["steps"]),
        "width": check_size("width", p["width"], remote=remote),
        "height": check_size("height", p["height"], remote=remote),
        "sampler": check_choice("sampler", p["sampler"],
                                registry.REMOTE_SAMPLER_NAMES if remote else registry.SAMPLER_NAMES),
        "scheduler": check_choice("scheduler", p["scheduler"],
                                  registry.REMOTE_SCHEDULER_NAMES if remote else registry.SCHEDULER_NAMES),
        "number_of_images": check_range("number_of_images", p["number_of_images"]),
        "output_format": check_choice("output_format", p["output_format"], OUTPUT_FORMATS),
        "output_quality": check_range("output_quality", p["output_quality"]),
    }
    if not remote:  # the hosted service has its own limits (512..2048)
        check_area(out["width"], out["height"], out["number_of_images"])
        check_format_size(out["output_format"], out["width"], out["height"])
    return out


def check_format_size(fmt: str, width: int, height: int, name: str = "output_format") -> None:
    """An image format that can hold the size: webp stops at 16383 pixels a side (jpg at 65535)."""
    limit = FORMAT_MAX_SIDE.get(fmt)
    if limit and max(width, height) > limit:
        raise ParameterError(f"{name}={fmt!r} holds at most {limit} pixels a side, and the image is {width}x{height}; "
                             "save it as png")
