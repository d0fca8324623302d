"""The flags the commands share (one per hosted-API parameter, the speed mode, the output folder), built from the
parameter table so ranges and defaults are written once, and the wording of errors for a command line."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LoadError, ParameterError, reword
from ..images import check_output_folder  # noqa: F401  (re-exported: the commands check --out with it)
from ..params import DEFAULTS, DTYPES, LORA_STRENGTH, MAX_SEED, MIN_SHIFT, NOISE_DEVICES, OUTPUT_FORMATS, RANGES
from ..pipeline.modes import SPEED_NAMES


def _range(name: str) -> str:
    rng = RANGES[name]
    return f"{rng.lo:g}-{rng.hi:g}"


def add_generation_flags(p, *, remote: bool = False) -> None:
    """One flag per hosted-API parameter (``generate``, ``demo`` and ``remote``)."""
    from ..params import LOCAL_MAX_SIZE, LOCAL_MIN_SIZE, REMOTE_MAX_SIZE, REMOTE_MIN_SIZE, SIZE_STEP
    from ..sampling import registry

    lo, hi = (REMOTE_MIN_SIZE, REMOTE_MAX_SIZE) if remote else (LOCAL_MIN_SIZE, LOCAL_MAX_SIZE)
    size = f"{lo}-{hi}" + ("" if remote else f", a multiple of {SIZE_STEP}")
    p.add_argument("--prompt", default=DEFAULTS["prompt"], help="what to draw")
    p.add_argument("--negative-prompt", default=DEFAULTS["negative_prompt"], help="what to avoid")
    p.add_argument("--cfg", type=float, default=DEFAULTS["cfg"], help=f"guidance {_range('cfg')}; 1 skips the "
                                                                        "negative prompt")
    p.add_argument("--seed", type=int, default=None, help=f"0-{MAX_SEED}; random when omitted (the seed used is "
                                                          "printed)")
    p.add_argument("--shift", type=float, default=DEFAULTS["shift"], help=f"flow shift, {MIN_SHIFT:g} up to "
                                                                          f"{RANGES['shift'].hi:g}")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help=f"sampling steps {_range('steps')}")
    p.add_argument("--width", type=int, default=DEFAULTS["width"], help=f"image width {size}")
    p.add_argument("--height", type=int, default=DEFAULTS["height"], help=f"image height {size}")
    # choices are checked by the engine with the full list in the message; metavar keeps --help short
    p.add_argument("--sampler", default=DEFAULTS["sampler"], metavar="NAME",
                   help="one of: " + ", ".join(registry.REMOTE_SAMPLER_NAMES if remote else registry.SAMPLER_NAMES))
    p.add_argument("--scheduler", default=DEFAULTS["scheduler"], metavar="NAME",
                   help="one of: " + ", ".join(registry.REMOTE_SCHEDULER_NAMES if remote
                                               else registry.SCHEDULER_NAMES))
    p.add_argument("--number-of-images", type=int, default=DEFAULTS["number_of_images"],
                   help=_range("number_of_images"))
    p.add_argument("--output-format", default=DEFAULTS["output_format"], choices=OUTPUT_FORMATS)
    p.add_argument("--output-quality", type=int, default=DEFAULTS["output_quality"],
                   help=f"{_range('output_quality')} (webp/jpg)")
    p.add_argument("--out", default="out", help="folder to write the images into; existing files are never replaced")


def add_speed_flag(p) -> None:
    p.add_argument("--speed", default="auto", metavar="MODE",
                   help=f"one of: {', '.join(SPEED_NAMES)}. auto is the lossless padding fold on the CPU and exact "
                        "elsewhere; cfg_cutoff, step_cache and fast trade a measured bit of fidelity for time "
                        "(README: Speed and benchmarks)")


def add_model_flags(p, *, required: bool = False) -> None:
    """The local model's files, dtype and device (``generate``, ``batch``'s local and ray backends)."""
    p.add_argument("--checkpoint", required=required, help="diffusers folder, all-in-one or transformer .safetensors")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer folder (single files)")
    p.add_argument("--text-encoder", help="Pile-T5-XL .safetensors or folder (transformer-only files)")
    p.add_argument("--vae", help="SDXL VAE .safetensors or folder (transformer-only files)")
    p.add_argument("--dtype", default="auto", help=f"one of: {', '.join(DTYPES)}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")


def add_local_flags(p) -> None:
    """The local engine's own flags (``generate`` and ``demo``): LoRAs and where the start noise is drawn."""
    p.add_argument("--lora", dest="loras", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help=f"a LoRA .safetensors to apply, at STRENGTH ({LORA_STRENGTH.lo:g} to {LORA_STRENGTH.hi:g}, "
                        f"default 1; negative subtracts it); repeat for several. Only a number after the last ':' "
                        f"is a strength, so C:\\loras\\x.safetensors:0.8 works")
    p.add_argument("--noise-device", default="cpu", choices=NOISE_DEVICES,
                   help="cpu: ComfyUI's start noise, the same on every machine; gpu: drawn on the compute device, "
                        "as diffusers does on CUDA (the same as cpu when running on the CPU)")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_lora_flag(text: str) -> tuple[str, float]:
    """``PATH[:STRENGTH]`` -> (path, strength): only a number after the last ':' is a strength (a Windows drive
    letter ``C:`` stays part of the path). The strength is checked here, the file by `check_lora_flags`."""
    head, sep, tail = text.rpartition(":")
    strength = _number(tail) if sep else None
    if strength is None:
        if sep and head and len(head) > 1 and not any(c in tail for c in "/\\") and not Path(text).exists():
            raise ParameterError(f"--lora {text}: {tail!r} after the last ':' is not a strength; write "
                                 f"PATH:STRENGTH with a number, e.g. --lora {head}:0.8")
        return text, LORA_STRENGTH.default
    if not head:
        raise ParameterError(f"--lora {text}: no file before the strength; write PATH:STRENGTH, e.g. "
                             f"--lora style.safetensors{text}")
    if not (LORA_STRENGTH.lo <= strength <= LORA_STRENGTH.hi):  # NaN fails this too
        raise ParameterError(f"--lora {text}: strength {tail} is out of range; allowed: {LORA_STRENGTH.lo:g} to "
                             f"{LORA_STRENGTH.hi:g} (1 is the LoRA as trained, 0 turns it off)")
    return head, strength


def check_lora_flags(values) -> tuple:
    """Every ``--lora`` parsed and its file checked (header only), before the model loads: the checked entries."""
    from ..pipeline.loras import check_loras

    pairs = [parse_lora_flag(v) for v in values]
    for value, pair in zip(values, pairs):
        try:
            check_loras([pair])
        except (ParameterError, LoadError) as exc:
            raise type(exc)(f"--lora {value}: {exc}") from None
    return check_loras(pairs)


def generation_params(args) -> dict:
    return {k: getattr(args, k) for k in DEFAULTS}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default (except where there is none)."""

    def _get_help_string(self, action):
        if action.default in (None, "", argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def in_flag_words(message: str, parser: argparse.ArgumentParser) -> str:
    """An engine message in the words of a command line: ``cfg=30`` -> ``--cfg=30``, ``give one as tokenizer=PATH``
    -> ``give one as --tokenizer=PATH``, ``prompt is ...`` -> ``--prompt is ...``, for every parameter that is one of
    this command's flags."""
    return reword(message, {a.dest: "--" + a.dest.replace("_", "-") for a in parser._actions if a.option_strings})
