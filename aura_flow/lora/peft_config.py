"""peft's adapter config, as a LoRA file carries it (diffusers' ``lora_adapter_metadata`` header entry, or peft's
``adapter_config.json`` beside the file): every value the scale depends on checked when the file is opened, and
``alpha_pattern`` / ``rank_pattern`` matched as peft matches them, in bounded work.

peft's rule (``peft.utils.other.get_pattern_key``): the first pattern ``p`` in the mapping's order for which
``re.match(rf"(.*\\.)?({p})$", layer_name)`` holds. Here a pattern that is a plain dotted name (nearly all of them)
is matched without a regular expression, by the same rule; any other is at most `MAX_PATTERN` characters, must
compile as Python's ``re`` would, and runs under a time limit (the `regex` package, which transformers already
requires) with a budget for the whole file, so a pattern written to backtrack for ever is a `LoadError` naming it,
not a hang.
"""
from __future__ import annotations

import json
import math
import re
import time

from ..errors import LoadError, shown

MAX_PATTERNS = 1024  # entries of alpha_pattern / rank_pattern (one a layer at most: AuraFlow has ~250 linears)
MAX_PATTERN = 256  # characters of one pattern (peft's are module names or short expressions)
MAX_RANK = 1 << 16
MATCH_SECONDS = 0.02  # one pattern against one layer name
BUDGET_SECONDS = 2.0  # all the pattern matching of one file
MAX_SIDECAR_BYTES = 1 << 20  # an adapter_config.json (a few kB)
_PLAIN = re.compile(r"[A-Za-z0-9_.]+")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def checked_config(config, source: str, field: str) -> dict:
    """``config`` (parsed JSON) when the values that set a LoRA's scale are well formed; else LoadError naming the
    file, the field and what is expected. Keys of other components (``text_encoder…``, ``unet.``) are dropped and
    diffusers' ``transformer.`` prefix removed."""
    def bad(name, value, expected):
        raise LoadError(f"{source}: {field} {name}={shown(value)}: expected {expected}. The file's peft metadata is "
                        "damaged; fix or remove it (the LoRA's tensors alone then set its scale)")

    if not isinstance(config, dict):
        bad("(the whole config)", config, "a JSON object of peft's LoraConfig values")
    config = {k.removeprefix("transformer."): v for k, v in config.items()
              if isinstance(k, str) and not k.startswith(("text_encoder", "unet."))}
    if "lora_alpha" in config and config["lora_alpha"] is not None and not _number(config["lora_alpha"]):
        bad("lora_alpha", config["lora_alpha"], "a finite number")
    if config.get("r") is not None and not (isinstance(config["r"], int) and not isinstance(config["r"], bool)
                                            and 1 <= config["r"] <= MAX_RANK):
        bad("r", config["r"], f"a whole number 1..{MAX_RANK}")
    if not isinstance(config.get("use_rslora", False), bool):
        bad("use_rslora", config["use_rslora"], "true or false")
    for name, valid, expected in (("alpha_pattern", _number, "finite numbers"),
                                  ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool)
                                   and 1 <= v <= MAX_RANK, f"whole numbers 1..{MAX_RANK}")):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or len(patterns) > MAX_PATTERNS:
            bad(name, patterns, f"an object of at most {MAX_PATTERNS} layer-name patterns")
        for pattern, value in patterns.items():
            if len(pattern) > MAX_PATTERN:
                bad(name, pattern, f"patterns of at most {MAX_PATTERN} characters")
            if not valid(value):
                bad(f"{name}[{shown(pattern, 40)}]", value, expected)
            if not _PLAIN.fullmatch(pattern):
                try:
                    re.compile(pattern)
                except (re.error, RecursionError, OverflowError):
                    bad(name, pattern, "regular expressions as Python's re reads them")
    return config


def parse_json(text, source: str, field: str):
    """JSON text of a peft config, or LoadError naming the file and the field."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise LoadError(f"{source}: {field} is not readable JSON ({exc.__class__.__name__}: {str(exc)[:120]}); fix "
                        "or remove it") from None


def read_sidecar(path, source: str):
    """peft's ``adapter_config.json`` beside a LoRA, size-bounded."""
    size = path.stat().st_size
    if size > MAX_SIDECAR_BYTES:
        raise LoadError(f"{path}: {size:,} bytes is too large for a peft adapter config (at most "
                        f"{MAX_SIDECAR_BYTES:,}); is it the right file?")
    return parse_json(path.read_bytes(), str(path), "adapter_config.json")


class PatternMatcher:
    """peft's ``get_pattern_key`` over one file's patterns, with plain-name fast paths and a bound on the work."""

    def __init__(self, source: str):
        self.source = source
        self.spent = 0.0

    def first(self, patterns: dict, layer_name: str, field: str):
        """The value of the first pattern of ``patterns`` that matches ``layer_name`` as peft matches, or None."""
        for pattern, value in patterns.items():
            if self._matches(pattern, layer_name, field):
                return value
        return None

    def _matches(self, pattern: str, name: str, field: str) -> bool:
        if _PLAIN.fullmatch(pattern):
            # (.*\.)?(p)$ with p a plain name: p covers the last len(p) characters ("." matching any one), which
            # are the whole name or follow a dot
            n = len(pattern)
            tail = name[-n:] if n <= len(name) else None
            return tail is not None and (n == len(name) or name[-n - 1] == ".") and \
                all(p == "." or p == c for p, c in zip(pattern, tail))
        try:
            import regex
        except ImportError:  # transformers requires it; without it, no bound on the work: refuse the pattern
            raise LoadError(f"{self.source}: {field} pattern {shown(pattern)} is a regular expression, which is "
                            "matched only with the regex package (pip install regex)") from None
        left = BUDGET_SECONDS - self.spent
        start = time.perf_counter()
        try:
            hit = regex.match(rf"(.*\.)?({pattern})$", name, timeout=max(min(MATCH_SECONDS, left), 1e-3))
        except TimeoutError:
            hit = None
            left = -1.0
        except (regex.error, RecursionError, OverflowError, ValueError):
            raise LoadError(f"{self.source}: {field} pattern {shown(pattern)} is no regular expression this "
                            "loader can match; fix the metadata or remove the entry") from None
        self.spent += time.perf_counter() - start
        if left <= 0 or self.spent > BUDGET_SECONDS:
            raise LoadError(f"{self.source}: {field} pattern {shown(pattern)} takes too long to match the layer names "
                            f"(over {MATCH_SECONDS * 1000:g} ms for {name}, or {BUDGET_SECONDS:g} s for the file): a "
                            "regular expression that backtracks without end. Write the layer names plainly")
        return hit is not None


__all__ = ["checked_config", "parse_json", "read_sidecar", "PatternMatcher"]
