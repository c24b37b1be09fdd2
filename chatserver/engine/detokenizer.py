"""Incremental detokenization that never emits a broken UTF-8 character.

Decoding token by token breaks characters that span tokens (byte-level BPE)
and loses the spaces some tokenizers attach to the next token. Like TGI and
vLLM we decode a short window twice: the text up to the last emitted token
and the text including the new ones, and emit the difference only when it
does not end in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text that became complete."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""


class StopStringMatcher:
    """Hold back text that might begin a stop string; cut at the first full match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            emit = self.pending[: min(hits)]
            self.pending = ""
            return emit, True
        cut = max(0, len(self.pending) - self.holdback)
        emit, self.pending = self.pending[:cut], self.pending[cut:]
        return emit, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest
