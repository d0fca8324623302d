"""The engine's error types, in a leaf module that imports nothing of the pack, so every room can raise them.

- `ParameterError`: a parameter is out of range or unknown; the message names the parameter (in the words of the
  place it came from), the value and what is allowed.
- `LoadError`: a file or folder cannot be loaded; the message names the file, what was found and the fix.
- `Interrupted`: ``should_stop()`` turned true; the work was cancelled between two model calls.
"""
from __future__ import annotations


class ParameterError(ValueError):
    """A parameter is out of range or unknown. The message names the parameter, the value and what is allowed."""


class LoadError(ValueError):
    """A checkpoint cannot be loaded; the message names the file, what was found and the fix."""


class Interrupted(RuntimeError):
    """Raised when ``should_stop()`` turned true; the sampling was cancelled between two model calls."""


__all__ = ["ParameterError", "LoadError", "Interrupted"]
