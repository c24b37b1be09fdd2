"""What the engine hands to the API layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Prompt:
    """A tokenized chat prompt and the room left for the reply."""

    ids: list[int]
    max_new_tokens: int
    dropped_turns: int = 0


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Text decoded since the previous delta; never splits a UTF-8 character."""

    text: str


FINISH_REASONS = ("stop", "length", "cancelled", "error")
