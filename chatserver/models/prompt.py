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

Truncation is linear: each message's content is tokenized once, turns are
dropped by their token counts, and only the template's markup (placeholders,
a few tokens a message) is rendered again for the turns kept. It drops in
large steps, on a grid fixed to the oldest message: the cut moves only when
the conversation has grown by another quarter of the context, never by one
turn each time. So the prompt's start (system prompt and the oldest kept turn)
stays the same for many turns in a row, and a KV prefix cache can reuse it.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from chatserver.engine.types import Prompt
from chatserver.errors import bad_request
from chatserver.models.tools import Tool, text_messages

# Private-use code points: no chat template writes them, and content never
# reaches the rendered text (it is swapped for these before rendering).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
# History is dropped a 1/DROP_STEPS of the context at a time (of the character
# bound before tokenizing, of max_context tokens after).
DROP_STEPS = 4


def render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat template around `messages`, content tokenized as plain text."""
    markup, placed = _markup(tokenizer, messages)
    return _join(markup, _contents(tokenizer, [messages[i]["content"] for i in placed]))


def _markup(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[list[int]], list[int]]:
    """The template's own text around the contents, tokenized, and where contents go.

    Returns (markup, placed): ``markup[j]`` comes before the content of message
    ``placed[j]`` and ``markup[-1]`` after the last one; a message the template
    leaves out is not in ``placed``. Costs a few tokens a message whatever the
    contents' length: they are rendered as placeholders.
    """
    marks = [f"{_MARK_OPEN}{i}{_MARK_CLOSE}" for i in range(len(messages))]
    placeheld = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
    text = tokenizer.apply_chat_template(placeheld, add_generation_prompt=True, tokenize=False)
    pieces: list[str] = []
    placed: list[int] = []
    pos = 0
    for i, mark in enumerate(marks):
        at = text.find(mark, pos)
        if at < 0:  # a template that leaves this message out
            continue
        pieces.append(text[pos:at])
        placed.append(i)
        pos = at + len(mark)
    pieces.append(text[pos:])
    return [list(ids) for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]], placed


def _contents(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, special-token markers split into plain text; one call for all."""
    if not texts:
        return []
    plain = _plain_text_twin(tokenizer)
    if plain is not None:
        found = plain(texts, add_special_tokens=False)["input_ids"]
    else:
        found = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [list(ids) for ids in found]


_twins: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_twins_lock = threading.Lock()


def _plain_text_twin(tokenizer: Any) -> Any | None:
    """A copy of a fast tokenizer that always splits special-token markers; None for others.

    A fast tokenizer holds "split special tokens" as a flag of its Rust
    tokenizer, and a call passing ``split_special_tokens`` sets that shared
    flag for every thread. Asked per call, another thread's markup was
    tokenized under it now and then (test_prompt's threads test: 40 of 600
    prompts, `<|im_start|>` as plain text). The twin keeps the flag set and the
    original never has it set, so neither is written while threads use them.
    Slow tokenizers take the argument per call without state: None.
    """
    if getattr(tokenizer, "_tokenizer", None) is None or not hasattr(
        tokenizer, "split_special_tokens"
    ):
        return None
    with _twins_lock:
        twin = _twins.get(tokenizer)
        if twin is None:
            twin = copy.deepcopy(tokenizer)
            twin.split_special_tokens = True
            twin._tokenizer.encode_special_tokens = True
            _twins[tokenizer] = twin
    return twin


def _join(markup: list[list[int]], contents: list[list[int]]) -> list[int]:
    ids = list(markup[0])
    for piece, after in zip(contents, markup[1:], strict=True):
        ids += piece
        ids += after
    return ids


def check_chars(chars: int, max_context: int, max_token_chars: int) -> None:
    """Refuse a prompt of `chars` characters that cannot be `max_context` tokens or fewer.

    No token of the vocabulary is longer than `max_token_chars` (0: unknown, no
    check), so more than ``max_context * max_token_chars`` characters is more than
    `max_context` tokens, known without tokenizing anything.
    """
    if max_token_chars and chars > max_context * max_token_chars:
        raise bad_request(
            "context_length_exceeded",
            f"the prompt is {chars} characters, more than this model's context of "
            f"{max_context} tokens can hold (its longest token is {max_token_chars} "
            "characters)",
            "messages",
        )


def warm_up(tokenizer: Any) -> None:
    """Build one short prompt, so the server's first request does not pay the one-time
    costs: the plain-text twin's deep copy and the chat template's compilation made
    the first build_prompt of a two-word message take 84 ms against 0.55 ms for the
    next (the default model's tokenizer; Intel(R) Xeon(R) Processor, torch CPU
    capability AVX512, VNNI avx_vnni; 2026-12-06)."""
    build_prompt(tokenizer, [{"role": "user", "content": "Hello there"}], 1, 1 << 20, False)


def build_prompt(
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_tokens: int,
    max_context: int,
    truncate: bool,
    max_token_chars: int = 0,
    tools: Sequence[Tool] = (),
) -> Prompt:
    """The prompt's ids, oldest turns dropped (if `truncate`) until the reply has room.

    Messages may carry tool calls and tool results, and `tools` the functions the
    model may call: models/tools.py writes them into the messages as text first.

    `max_token_chars` (the longest token of the vocabulary, in characters; 0: no
    bound) refuses or drops what cannot fit before any tokenizing: text of more
    than `max_context * max_token_chars` characters is more than `max_context`
    tokens, so a 1 MiB message costs a length check, not seconds of tokenizer time
    shared with everyone's replies.

    The ids are always exactly ``render()`` of the messages kept. Tokenizer work
    is the same whatever is dropped: one render of the template's markup and
    one tokenizing of every content, plus, when turns are dropped, one more
    render of the markup alone.
    """
    if not messages:
        raise bad_request("invalid_request", "at least one message is required", "messages")
    messages = text_messages(messages, tools)
    head = 0
    while head < len(messages) - 1 and messages[head]["role"] == "system":
        head += 1
    system, turns = messages[:head], messages[head:]
    dropped = 0
    if max_token_chars:
        budget = max_context * max_token_chars
        sizes = [len(m["content"]) for m in turns]
        chars = sum(len(m["content"]) for m in system) + sum(sizes)
        if truncate and chars > budget:
            dropped = drop_point(turns, sizes, chars - budget, max(1, budget // DROP_STEPS))
            chars -= sum(sizes[:dropped])
            turns = turns[dropped:]
        check_chars(chars, max_context, max_token_chars)
    reserve = min(max_tokens, max_context // 2)
    room = max_context - reserve
    kept = system + turns
    markup, placed = _markup(tokenizer, kept)
    contents = _contents(tokenizer, [kept[i]["content"] for i in placed])
    length = sum(map(len, markup)) + sum(map(len, contents))
    if truncate and length > room and len(turns) > 1:
        step = max(1, max_context // DROP_STEPS)
        ids, cut = _truncated(
            tokenizer, system, turns, markup, placed, contents, length - room, step
        )
        dropped += cut
    else:
        ids = _join(markup, contents)
    if len(ids) >= max_context:
        raise bad_request(
            "context_length_exceeded",
            f"the prompt is {len(ids)} tokens; this model's context holds {max_context} "
            "(prompt and reply together)",
            "messages",
        )
    return Prompt(ids, min(max_tokens, max_context - len(ids)), dropped)


def _truncated(
    tokenizer: Any,
    system: list[dict[str, str]],
    turns: list[dict[str, str]],
    markup: list[list[int]],
    placed: list[int],
    contents: list[list[int]],
    excess: int,
    step: int,
) -> tuple[list[int], int]:
    """The ids with enough oldest turns dropped to lose `excess` tokens; (ids, dropped).

    Each turn's cost is its content and the markup before it, from the render
    of everything; the kept messages' markup is rendered again (cheap) and
    their contents' ids reused. With a template that renders a message the same
    wherever it stands (ChatML and most others) the estimate is exact; else the
    loop drops a step more until the prompt fits.
    """
    head = len(system)
    room = sum(map(len, markup)) + sum(map(len, contents)) - excess
    content_of = dict(zip(placed, contents, strict=True))  # by index in system + turns
    costs = [0] * len(turns)
    for j, i in enumerate(placed):
        if i >= head:
            costs[i - head] = len(markup[j]) + len(contents[j])
    cut = 0
    while True:
        cut = max(drop_point(turns, costs, excess, step), min(cut + 1, len(turns) - 1))
        kept = system + turns[cut:]
        kept_markup, kept_placed = _markup(tokenizer, kept)
        full = [i if i < head else i + cut for i in kept_placed]
        new = [(f, kept[i]["content"]) for i, f in zip(kept_placed, full, strict=True)]
        new = [(f, text) for f, text in new if f not in content_of]
        if new:  # a template that places a message only once others are gone
            tokenized = _contents(tokenizer, [text for _, text in new])
            content_of.update(zip((f for f, _ in new), tokenized, strict=True))
        ids = _join(kept_markup, [content_of[f] for f in full])
        if len(ids) <= room or cut >= len(turns) - 1:
            return ids, cut
        excess += len(ids) - room


def drop_point(turns: list[dict[str, str]], costs: list[int], excess: int, step: int) -> int:
    """How many of the oldest turns' messages to drop to shed `excess` (tokens or characters).

    Never one turn at a time: what is dropped is rounded up to the next
    multiple of `step`, counted from the oldest message, then to the next user
    message (the conversation goes on from a user message). As history grows
    the cut stays on the same message until another `step` must go, so the
    prompt's start is the same for many turns. The newest message is always
    kept (the result is at most ``len(turns) - 1``).
    """
    line = -(-excess // step) * step
    shed = 0
    for i in range(1, len(turns)):
        shed += costs[i - 1]
        if shed >= line and turns[i]["role"] == "user" and not turns[i].get("tool_response"):
            return i
    return len(turns) - 1
