"""The engine's error types, in a leaf module that imports nothing of the pack, so every room can raise them.

- `ParameterError`: a parameter is out of range or unknown; the message names the parameter (in the words of the
  place it came from), the value and what is allowed.
- `LoadError`: a file or folder cannot be loaded; the message names the file, what was found and the fix.
- `Interrupted`: ``should_stop()`` turned true; the work was cancelled between two model calls.
- `NumericError`: a run's numbers turned NaN or infinite; the message says where and what to change (nothing is
  decoded or saved from them).
"""
from __future__ import annotations

import re
import sys


class ParameterError(ValueError):
    """A parameter is out of range or unknown. The message names the parameter, the value and what is allowed."""


class LoadError(ValueError):
    """A checkpoint cannot be loaded; the message names the file, what was found and the fix.

    ``found``: what the file is instead, when it is another model ("sdxl", "flux", "sd3", "vae", "lora"...: the
    names of `aura_flow.weights.layouts.LOOKS_LIKE`), so a host can add where it loads such a file."""

    def __init__(self, message, *, found: str | None = None):
        super().__init__(message)
        self.found = found


class Interrupted(RuntimeError):
    """Raised when ``should_stop()`` turned true; the sampling was cancelled between two model calls."""


class NumericError(RuntimeError):
    """A run's numbers turned NaN or infinite (an overflow in the model, a damaged input); says where and the fix."""


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters: a hostile value must not make a huge one."""
    try:
        text = repr(value)
    except ValueError:  # an int over Python's 4300-digit conversion limit
        return f"<an integer of over {sys.get_int_max_str_digits()} digits>"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def reword(message: str, names: dict) -> str:
    """``message`` with each parameter ``name`` of ``names`` said as ``names[name]``, in the places where the engine
    names parameters: ``name=`` (``cfg=30``, ``vae=PATH``) and a name that opens the message or a clause
    (``prompt is ...``, ``prompt: ...``). The command line says them as flags, the nodes as their inputs."""
    for name in sorted(names, key=len, reverse=True):
        new = names[name]
        message = re.sub(rf"(?<![\w\-.']){re.escape(name)}=", lambda m: f"{new}=", message)
        message = re.sub(rf"(?:^|(?<=; )|(?<=\. )){re.escape(name)}(?= is |: )", lambda m: new, message)
    return message


__all__ = ["ParameterError", "LoadError", "Interrupted", "NumericError", "shown", "reword"]
