"""Chat prompts: the tokenizer's chat template, truncated from the oldest turns.

Runs in the tokenizer thread pool (fast tokenizers release the GIL). The
leading system message(s) and the newest message are always kept; whole
user/assistant turns are dropped from the oldest until the prompt leaves room
for the reply.
"""

from __future__ import annotations

from typing import Any

from chatserver.engine.types import Prompt
from chatserver.errors import bad_request


def render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
