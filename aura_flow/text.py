"""Prompt tokenization and encoding with ComfyUI's semantics for Pile-T5.

Tokens, then the end token (2), padded with the pad token (1) to at least 256 and never truncated; the encoder
sees an attention mask over the real tokens and the end token, and the embeddings of padded positions are zeroed.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MIN_LENGTH = 256
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
        from .loader import LoadError, TOKENIZER_HINT

        path = Path(path)
        if path.is_dir() and ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception as exc:  # transformers raises many kinds here
                raise LoadError(f"{path}: cannot load the tokenizer ({exc}); {TOKENIZER_HINT}") from None
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
        ids = self._encode(text) + [self.end_id]
        n = len(ids)
        length = max(min_length, n)
        return ids + [self.pad_id] * (length - n), [1] * n + [0] * (length - n)


def encode_prompt(text_encoder, tokenizer: PromptTokenizer, text: str, device, dtype):
    """-> (1, tokens, d_model) context with padded positions zeroed."""
    import torch

    ids, mask = tokenizer(text)
    if len(ids) > MIN_LENGTH:
        log.info("prompt is %d tokens; encoded in full (no truncation)", len(ids))
    ids_t = torch.tensor([ids], dtype=torch.long, device=device)
    mask_t = torch.tensor([mask], dtype=torch.long, device=device)
    with torch.inference_mode():
        out = text_encoder(input_ids=ids_t, attention_mask=mask_t)[0]
    out = out * mask_t.unsqueeze(-1).to(out.dtype)
    return out.to(dtype)
