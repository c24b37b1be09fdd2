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
) -> Prompt:
    if not messages:
        raise bad_request("invalid_request", "at least one message is required", "messages")
    head = 0
    while head < len(messages) - 1 and messages[head]["role"] == "system":
        head += 1
    system, turns = messages[:head], messages[head:]
    reserve = min(max_tokens, max_context // 2)
    dropped = 0
    while True:
        ids = render(tokenizer, system + turns)
        if not truncate or len(ids) + reserve <= max_context or len(turns) <= 1:
            break
        # Drop the oldest turn, then anything up to the next user message, so
        # the conversation still alternates from a user message.
        cut = 1
        while cut < len(turns) - 1 and turns[cut]["role"] != "user":
            cut += 1
        turns = turns[cut:]
        dropped += cut
    if len(ids) >= max_context:
        raise bad_request(
            "context_length_exceeded",
            f"the prompt is {len(ids)} tokens; this model's context holds {max_context} "
            "(prompt and reply together)",
            "messages",
        )
    return Prompt(ids, min(max_tokens, max_context - len(ids)), dropped)
