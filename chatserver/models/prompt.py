"""Chat prompts: the tokenizer's chat template, truncated from the oldest turns.

Runs in the tokenizer thread pool (fast tokenizers release the GIL). The
leading system message(s) and the newest message are always kept; whole
user/assistant turns are dropped from the oldest until the prompt leaves room
for the reply.

Message content is text, never control tokens: the template is rendered
around placeholders, its own markup is tokenized with special tokens parsed,
and each message's content with them split into plain text. Otherwise a user
typing `<|im_start|>system` would forge a system turn (it did: three such
markers became three control tokens).
"""

from __future__ import annotations

from typing import Any

from chatserver.engine.types import Prompt
from chatserver.errors import bad_request

# Private-use code points: no chat template writes them, and content never
# reaches the rendered text (it is swapped for these before rendering).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


def render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat template around `messages`, content tokenized as plain text."""
    marks = [f"{_MARK_OPEN}{i}{_MARK_CLOSE}" for i in range(len(messages))]
    placeheld = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
    text = tokenizer.apply_chat_template(placeheld, add_generation_prompt=True, tokenize=False)
    markup: list[str] = []
    contents: list[str] = []
    pos = 0
    for message, mark in zip(messages, marks, strict=True):
        at = text.find(mark, pos)
        if at < 0:  # a template that leaves this message out
            continue
        markup.append(text[pos:at])
        contents.append(message["content"])
        pos = at + len(mark)
    markup.append(text[pos:])
    markup_ids = tokenizer(markup, add_special_tokens=False)["input_ids"]
    content_ids = (
        tokenizer(contents, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if contents
        else []
    )
    ids: list[int] = list(markup_ids[0])
    for piece, after in zip(content_ids, markup_ids[1:], strict=True):
        ids += piece
        ids += after
    return ids


def build_prompt(
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_tokens: int,
    max_context: int,
    truncate: bool,
    max_token_chars: int = 0,
) -> Prompt:
    """The prompt's ids, oldest turns dropped (if `truncate`) until the reply has room.

    `max_token_chars` (the longest token of the vocabulary, in characters; 0: no
    bound) refuses or drops what cannot fit before any tokenizing: text of more
    than `max_context * max_token_chars` characters is more than `max_context`
    tokens, so a 1 MiB message costs a length check, not seconds of tokenizer time
    shared with everyone's replies.
    """
    if not messages:
        raise bad_request("invalid_request", "at least one message is required", "messages")
    head = 0
    while head < len(messages) - 1 and messages[head]["role"] == "system":
        head += 1
    system, turns = messages[:head], messages[head:]
    dropped = 0
    if max_token_chars:
        budget = max_context * max_token_chars
        chars = sum(len(m["content"]) for m in system + turns)
        while truncate and len(turns) > 1 and chars > budget:
            turns, cut = _drop_oldest_turn(turns)
            dropped += cut
            chars = sum(len(m["content"]) for m in system + turns)
        if chars > budget:
            raise bad_request(
                "context_length_exceeded",
                f"the prompt is {chars} characters, more than this model's context of "
                f"{max_context} tokens can hold (its longest token is {max_token_chars} "
                "characters)",
                "messages",
            )
    reserve = min(max_tokens, max_context // 2)
    while True:
        ids = render(tokenizer, system + turns)
        if not truncate or len(ids) + reserve <= max_context or len(turns) <= 1:
            break
        turns, cut = _drop_oldest_turn(turns)
        dropped += cut
    if len(ids) >= max_context:
        raise bad_request(
            "context_length_exceeded",
            f"the prompt is {len(ids)} tokens; this model's context holds {max_context} "
            "(prompt and reply together)",
            "messages",
        )
    return Prompt(ids, min(max_tokens, max_context - len(ids)), dropped)


def _drop_oldest_turn(turns: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest turn, then anything up to the next user message, so the
    conversation still alternates from a user message; returns (rest, dropped)."""
    cut = 1
    while cut < len(turns) - 1 and turns[cut]["role"] != "user":
        cut += 1
    return turns[cut:], cut
