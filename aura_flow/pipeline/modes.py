"""The speed modes by name, torch-free: `SpeedOptions`, the named `MODES`, and `resolve` ("auto" and names ->
options for a device). The machinery that runs them is aura_flow/pipeline/speed.py, whose docstring describes each.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ParameterError, shown

__all__ = ["SpeedOptions", "MODES", "SPEED_NAMES", "PSNR_BOUNDS", "resolve", "check"]


def _device_type(device) -> str:
    return getattr(device, "type", None) or str(device).split(":")[0]


@dataclass(frozen=True)
class SpeedOptions:
    """Which opt-in speed-ups to use; the defaults are the exact path."""

    fold_padding: bool = False  # fold the prompt's padding tokens into one (exact up to float rounding)
    compile: bool = False
    cfg_cutoff: float | None = None  # fraction of steps after which the uncond pass is estimated, in (0, 1]
    cache_threshold: float = 0.0  # relative L1 change of the first block's modulated input below which to skip

    def __post_init__(self):
        if self.cfg_cutoff is not None and not 0.0 < self.cfg_cutoff <= 1.0:
            raise ParameterError(f"cfg_cutoff={self.cfg_cutoff!r}: give a fraction of the steps in (0, 1], or None")
        if not 0.0 <= self.cache_threshold < 1.0:
            raise ParameterError(f"cache_threshold={self.cache_threshold!r}: give a value in [0, 1); 0 turns it off")

    @property
    def exact(self) -> bool:
        return not (self.fold_padding or self.compile) and self.cfg_cutoff is None and self.cache_threshold == 0.0


# Named modes (also the benchmark's rows). The lossy settings were chosen on the medium preset (python -m
# benchmarks.run) for at least 1.5x at 30 dB or more there; PSNR_BOUNDS are what tests/test_speed.py holds them to
# on the tiny one. Random weights change little between steps, so these PSNRs flatter the lossy modes: with a
# trained model expect lower ones at the same settings.
MODES = {
    "exact": SpeedOptions(),
    "fold_padding": SpeedOptions(fold_padding=True),
    "compile": SpeedOptions(compile=True),
    "cfg_cutoff": SpeedOptions(cfg_cutoff=0.15),
    "step_cache": SpeedOptions(cache_threshold=0.08),
    "fast": SpeedOptions(fold_padding=True, cfg_cutoff=0.15, cache_threshold=0.08),  # all but compile, stacked
}
PSNR_BOUNDS = {"exact": math.inf, "fold_padding": 80.0, "compile": 50.0, "cfg_cutoff": 30.0, "step_cache": 30.0,
               "fast": 30.0}


# every name a speed input accepts: "auto" first, then the modes
SPEED_NAMES = ("auto", *MODES)


def check(speed):
    """``speed`` as given when it is None, a name of `SPEED_NAMES` or a `SpeedOptions`; else ParameterError."""
    if speed is None or isinstance(speed, SpeedOptions) or speed in SPEED_NAMES:
        return speed
    if isinstance(speed, str):
        raise ParameterError(f"speed={shown(speed)} is not known; valid: {', '.join(SPEED_NAMES)}")
    raise ParameterError(f"speed must be a SpeedOptions or one of {', '.join(SPEED_NAMES)}, got "
                         f"{type(speed).__name__}")


def resolve(speed, device=None) -> SpeedOptions | None:
    """None, "auto", a mode name or a `SpeedOptions` -> `SpeedOptions`, or None for the exact path.

    "auto" (what ``generate`` uses unless told otherwise) is the padding fold on the CPU, where it measured 1.6-1.8x
    at 256^2 with the same image to 1e-5, and the exact path elsewhere: on CUDA the fold's key bias keeps SDPA off
    its flash kernel, and with ~6% padding at 1024^2 that trade has not been measured to pay. A mode named by a
    string builds on that default: on the CPU it folds the padding too, so no mode is slower than "auto". A
    `SpeedOptions` is taken exactly as given.
    """
    speed = check(speed)
    if speed is None:
        return None
    cpu = device is None or _device_type(device) == "cpu"
    if speed == "auto":
        return MODES["fold_padding"] if cpu else None
    if isinstance(speed, str):
        speed = MODES[speed]
        if cpu and not speed.exact:
            speed = dataclasses.replace(speed, fold_padding=True)
    return None if speed.exact else speed
