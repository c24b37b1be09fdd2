"""Logprob entries as the API layer reads them: token ids given their text and bytes.

The worker sends (token id, logprob, top alternatives) for sequences that
asked (protocol/worker.py ``StepOutput.logprobs``); the engine turns the ids
into the text and UTF-8 bytes of each token here, in its detokenize thread,
so the API formats them without a tokenizer. A token's bytes are its own
(byte-level BPE tokens can hold part of a character); its text is those bytes
decoded with U+FFFD for an incomplete character, as OpenAI reports them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    text: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token, its logprob, and the most likely alternatives at its step
    (most likely first; empty when the request asked for none)."""

    token_id: int
    text: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable characters back to the bytes they stand for."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    codes = list(printable)
    for b in range(256):
        if b not in printable:
            codes.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for c, b in zip(chars, codes, strict=True)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """Token id -> (text, bytes) for one tokenizer, remembered (a vocabulary is finite)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._known: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        known = self._known.get(token_id)
        if known is None:
            known = self._known[token_id] = self._text(token_id)
        return known

    def _text(self, token_id: int) -> tuple[str, bytes]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece not in self.tokenizer.all_special_tokens:
            decoder = _byte_decoder()
            if piece and all(c in decoder for c in piece):  # byte-level BPE
                raw = bytes(decoder[c] for c in piece)
                return raw.decode("utf-8", errors="replace"), raw
            byte = _BYTE_TOKEN.fullmatch(piece)  # SentencePiece byte fallback
            if byte:
                raw = bytes([int(byte.group(1), 16)])
                return raw.decode("utf-8", errors="replace"), raw
        text = self.tokenizer.decode([token_id])
        return text, text.encode()

    def entry(
        self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...]
    ) -> TokenLogprob:
        text, raw = self.get(token_id)
        alternatives = tuple(TopLogprob(i, *self.get(i), lp) for i, lp in top)
        return TokenLogprob(token_id, text, raw, logprob, alternatives)
