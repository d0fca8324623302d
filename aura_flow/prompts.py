"""Prompt tokenization and encoding with ComfyUI's semantics for Pile-T5.

Prompt weighting is ComfyUI's: ``(words:1.3)`` sets a weight, ``(words)`` multiplies by 1.1 per level of nesting,
``\\(`` and ``\\)`` are literal parentheses. Each weighted segment is tokenized on its own; a weighted token's
embedding is moved away from the empty prompt's at its position: ``z = z_empty + w * (z - z_empty)``.

Tokens, then the end token (2), padded with the pad token (1) to at least 256 and never truncated; the encoder
sees an attention mask over the real tokens and the end token, and the embeddings of padded positions are zeroed.

Bounds (`check_prompt`, before any model work): at most `MAX_PROMPT_CHARS` characters of valid Unicode text and
`MAX_PROMPT_TOKENS` tokens (attention grows with the square of the length), weights finite within
`WEIGHT_RANGE` (ComfyUI takes any float; a NaN, an infinite or a 1e39 weight only makes a NaN image), parentheses
nested at most `MAX_NESTING` deep.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from .errors import LoadError, ParameterError

log = logging.getLogger(__name__)

TOKENIZER_HINT = ("give one as tokenizer=PATH: a Pile-T5 sentencepiece 'tokenizer.model' (ComfyUI ships one as "
                  "comfy/text_encoders/t5_pile_tokenizer/tokenizer.model) or a diffusers 'tokenizer' folder")

MIN_LENGTH = 256
MAX_PROMPT_CHARS = 16384
MAX_PROMPT_TOKENS = 2048  # 8x the 256 the model was trained with
WEIGHT_RANGE = (-10.0, 10.0)
MAX_NESTING = 100
PAD_ID = 1
END_ID = 2


class PromptTokenizer:
    """Either a sentencepiece ``tokenizer.model`` (as ComfyUI ships it) or a transformers tokenizer folder."""

    def __init__(self, encode_fn, source: str, pad_id: int = PAD_ID, end_id: int = END_ID):
        self._encode = encode_fn
        self.source = source
        self.pad_id = pad_id
        self.end_id = end_id

    @classmethod
    def load(cls, path) -> "PromptTokenizer":
        path = Path(path)
        if path.is_dir() and ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
            _refuse_code(path)
            from transformers import AutoTokenizer

            try:  # never code from the folder, never the network; a config value of a wrong type fails the probe
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
                tok("a photo", add_special_tokens=False, verbose=False)
            except Exception as exc:  # transformers raises many kinds here
                raise LoadError(f"{path}: cannot load the tokenizer ({str(exc)[:300]}); {TOKENIZER_HINT}") from None
            pad = tok.pad_token_id if tok.pad_token_id is not None else PAD_ID
            end = tok.eos_token_id if tok.eos_token_id is not None else END_ID
            return cls(lambda text: list(tok(text, add_special_tokens=False, verbose=False)["input_ids"]), str(path), pad, end)
        if path.is_dir() and (path / "tokenizer.model").exists():
            path = path / "tokenizer.model"
        if path.is_file():
            import sentencepiece

            try:
                sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
                raise LoadError(f"{path}: not a sentencepiece tokenizer model ({exc}); {TOKENIZER_HINT}") from None
            pad = sp.pad_id() if sp.pad_id() >= 0 else PAD_ID
            end = sp.eos_id() if sp.eos_id() >= 0 else END_ID
            return cls(lambda text: list(sp.encode(text)), str(path), pad, end)
        raise LoadError(f"{path}: no tokenizer there; {TOKENIZER_HINT}")

    @classmethod
    def from_sentencepiece_bytes(cls, data: bytes, source: str) -> "PromptTokenizer":
        """A sentencepiece model serialized into a checkpoint (ComfyUI saves Pile-T5's as ``spiece_model``)."""
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        return cls(lambda text: list(sp.encode(text)), source, sp.pad_id() if sp.pad_id() >= 0 else PAD_ID,
                   sp.eos_id() if sp.eos_id() >= 0 else END_ID)

    def __call__(self, text: str, min_length: int = MIN_LENGTH):
        """-> (ids, mask) lists of equal length >= min_length; never truncates."""
        ids, mask, _weights = self.weighted(text, min_length)
        return ids, mask

    def weighted(self, text: str, min_length: int = MIN_LENGTH):
        """-> (ids, mask, weights): the prompt's segments tokenized one by one with their weights, the end token,
        then padding to at least ``min_length``."""
        ids, weights = [], []
        for segment, weight in parse_weights(check_prompt("prompt", text)):
            seg_ids = self._encode(segment)
            ids += seg_ids
            weights += [weight] * len(seg_ids)
            if len(ids) >= MAX_PROMPT_TOKENS:
                raise ParameterError(f"prompt is over {MAX_PROMPT_TOKENS} tokens (with the end token); at most "
                                     f"{MAX_PROMPT_TOKENS}, about 8000 characters of English: shorten it")
        ids.append(self.end_id)
        weights.append(1.0)
        n = len(ids)
        pad = max(min_length, n) - n
        return ids + [self.pad_id] * pad, [1] * n + [0] * pad, weights + [1.0] * pad


def _refuse_code(folder: Path) -> None:
    """LoadError for a tokenizer folder that asks to run its own Python code (``auto_map``), before transformers
    sees it: the pack never runs code from a model folder."""
    from .weights.reader import read_json

    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model"):
        if (folder / name).exists() and not (folder / name).is_file():  # a FIFO would block transformers' read
            raise LoadError(f"{folder / name}: not a regular file. {TOKENIZER_HINT}")
    for name in ("tokenizer_config.json", "config.json"):
        if (folder / name).is_file() and read_json(folder / name, "tokenizer config").get("auto_map"):
            raise LoadError(f"{folder / name}: the tokenizer asks to run Python code from its folder (auto_map); "
                            f"code from a model folder is never run. {TOKENIZER_HINT}")


# Escaped parentheses are kept as two-character elements ("\\(") of a list of one-character ones while parsing, so
# no character a user can type stands in for them (ComfyUI itself swaps them for "\0\2" / "\0\1", which a prompt
# holding those control characters turns into parentheses); every prompt ComfyUI parses parses the same here.
_ESCAPED = {"\\(": "(", "\\)": ")"}


def _elements(text: str) -> list[str]:
    """``text`` as one-character elements, an escaped parenthesis as one two-character element."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i:i + 2] in _ESCAPED:
            out.append(text[i:i + 2])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return out


def _split_parentheses(elements: list[str]) -> list[list[str]]:
    """Top-level pieces: plain runs and whole ``( ... )`` groups (an unclosed group runs to the end)."""
    pieces, current, depth = [], [], 0
    for element in elements:
        if element == "(":
            if depth == 0:
                if current:
                    pieces.append(current)
                current = []
            current.append(element)
            depth += 1
        elif element == ")":
            depth -= 1
            current.append(element)
            if depth == 0:
                pieces.append(current)
                current = []
        else:
            current.append(element)
    if current:
        pieces.append(current)
    return pieces


def _text(piece: list[str]) -> str:
    return "".join(_ESCAPED.get(e, e) for e in piece)


def _shown(piece: list[str]) -> str:
    typed = "".join(piece)  # as the user wrote it, escapes included
    return repr(typed if len(typed) <= 60 else typed[:60] + "…")


def _check_weight(weight: float, piece: list[str], name: str) -> None:
    lo, hi = WEIGHT_RANGE
    if not math.isfinite(weight) or not lo <= weight <= hi:
        raise ParameterError(f"{name}: the weight {weight:g} of {_shown(piece)} is out of range; allowed: {lo:g}..{hi:g}"
                             " (finite; (word:1.3) sets one, each pair of parentheses multiplies by 1.1; write \\( "
                             "for a literal parenthesis)")


def _weights(elements: list[str], weight: float, name: str, depth: int = 0) -> list[tuple[str, float]]:
    if depth > MAX_NESTING:
        raise ParameterError(f"{name}: parentheses nested over {MAX_NESTING} deep; at most {MAX_NESTING} (write \\( "
                             "for a literal parenthesis)")
    out = []
    for piece in _split_parentheses(elements):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner, inner_weight = piece[1:-1], weight * 1.1
            colon = len(inner) - 1 - inner[::-1].index(":") if ":" in inner else -1
            if colon > 0:
                try:
                    inner_weight = float("".join(inner[colon + 1:]))  # an escaped parenthesis makes no number
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _weights(inner, inner_weight, name, depth + 1)
        else:
            if _text(piece).strip():  # a weight on nothing but spaces changes no token
                _check_weight(weight, piece, name)
            out.append((_text(piece), weight))
    return out


def parse_weights(text: str, name: str = "prompt") -> list[tuple[str, float]]:
    """ComfyUI's prompt weighting: ``"a (red:1.5) ((cat))"`` -> ``[("a ", 1.0), ("red", 1.5), (" ", 1.0),
    ("cat", 1.21)]``; ``\\(`` / ``\\)`` stay literal parentheses, and every other character (control characters
    included) stays itself. A weight outside `WEIGHT_RANGE` (or not finite) on any text is a ParameterError naming
    ``name``, the weight and the allowed range."""
    return _weights(_elements(text), 1.0, name)


def check_prompt(name: str, text, *, weights: bool = True) -> str:
    """``text`` when it is a prompt the engine can encode at a bounded cost: a string of valid Unicode (no lone
    surrogates, as a command line makes of bytes that are not UTF-8) of at most `MAX_PROMPT_CHARS` characters, and,
    with ``weights``, weights in range. Else a ParameterError naming ``name``."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ParameterError(f"{name} must be a string, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise ParameterError(f"{name} is {len(text):,} characters long; at most {MAX_PROMPT_CHARS:,}: shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate; \udc80-\udcff stand for bytes that were not UTF-8
        code = ord(text[exc.start])
        what = f"the byte {code - 0xDC00:#x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate {code:#x}"
        raise ParameterError(f"{name} is not valid UTF-8 text (character {exc.start + 1} is {what}); give it as "
                             "UTF-8 (on a command line, check the terminal's encoding)") from None
    if weights:
        parse_weights(text, name)
    return text


def encode_prompt(text_encoder, tokenizer: PromptTokenizer, text: str, device, dtype):
    """-> (1, tokens, d_model) context with padded positions zeroed and ComfyUI's prompt weights applied."""
    import torch

    ids, mask, weights = tokenizer.weighted(text)
    if len(ids) > MIN_LENGTH:
        log.info("prompt is %d tokens; encoded in full (no truncation)", len(ids))
    rows_ids, rows_mask = [ids], [mask]
    weighted = any(w != 1.0 for w in weights)
    if weighted:  # the empty prompt at the same length, the point weights scale away from
        rows_ids.append([tokenizer.end_id] + [tokenizer.pad_id] * (len(ids) - 1))
        rows_mask.append([1] + [0] * (len(ids) - 1))
    ids_t = torch.tensor(rows_ids, dtype=torch.long, device=device)
    mask_t = torch.tensor(rows_mask, dtype=torch.long, device=device)
    with torch.inference_mode():
        out = text_encoder(input_ids=ids_t, attention_mask=mask_t)[0]
    out = out * mask_t.unsqueeze(-1).to(out.dtype)
    z = out[:1]
    if weighted:
        w = torch.tensor(weights, dtype=z.dtype, device=z.device).view(1, -1, 1)
        z = out[1:] + (z - out[1:]) * w
    return z.to(dtype)
