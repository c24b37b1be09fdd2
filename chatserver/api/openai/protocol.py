"""OpenAI chat and text completions schemas: request checking and response/chunk builders.

Pure data in OpenAI's exact shapes, so the official clients (and anything
written against api.openai.com) work unchanged. OpenAI parameters this server
does not honour yet are refused with a 400 naming them (``unsupported_parameter``),
except for the values that ask for nothing (``tools: []``, ``logprobs: false``…),
so a caller never gets an answer that silently ignored what it asked for.
Fields OpenAI does not define are ignored, as OpenAI-compatible servers do,
since clients send many optional ones of their own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from chatserver.api.openai import structured
from chatserver.api.openai import tools as tool_api
from chatserver.errors import bad_request
from chatserver.models.tools import Tool, ToolCall, ToolCallParser, ToolChoice, call_grammar
from chatserver.protocol.sampling import RequestParams, parse_request_params

# OpenAI's "developer" role is its newer name for "system".
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _never(value: Any) -> bool:
    return False


def _is_none(value: Any) -> bool:
    return value == "none"


def _is_false(value: Any) -> bool:
    return value is False


def _is_empty_list(value: Any) -> bool:
    return value == []


# OpenAI parameters not honoured yet, each with the test of the values that ask
# for nothing and so are accepted; a field left out or null is never refused.
UNSUPPORTED_CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (_is_empty_list, "function calling is not supported yet"),
    "function_call": (_is_none, "function calling is not supported yet; only 'none' is accepted"),
    "modalities": (lambda v: v == ["text"], "only the 'text' modality is supported"),
    "audio": (_never, "audio output is not supported"),
    "web_search_options": (_never, "web search is not supported"),
    "reasoning_effort": (_never, "this model does not reason"),
    "verbosity": (_never, "'verbosity' is not supported"),
    "store": (_is_false, "stored completions are not supported"),
}
UNSUPPORTED_COMPLETION: dict[str, tuple[Callable[[Any], bool], str]] = {
    "echo": (_is_false, "'echo' is not supported yet"),
    "suffix": (lambda v: v == "", "'suffix' (insertion) is not supported"),
}


def refuse_unsupported(
    body: dict[str, Any], unsupported: dict[str, tuple[Callable[[Any], bool], str]]
) -> None:
    """400 ``unsupported_parameter`` for the first parameter asking what is not honoured."""
    for name, (accepted, why) in unsupported.items():
        value = body.get(name)
        if value is not None and not accepted(value):
            raise bad_request("unsupported_parameter", f"'{name}': {why}", name)


MAX_N = 16  # choices a request may ask for: each is a sequence in the batch


def _count(body: dict[str, Any], name: str) -> int | None:
    """An integer 1..MAX_N (2.0 is 2, as JSON Schema reads it), or None when left out."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_N:
        raise bad_request(
            "invalid_parameter", f"'{name}' must be an integer between 1 and {MAX_N}", name
        )
    return value


def parse_n(body: dict[str, Any]) -> int:
    """``n``: how many choices to generate for the one prompt (null: 1)."""
    return _count(body, "n") or 1


def _check_best_of(body: dict[str, Any], n: int) -> None:
    """``best_of`` may only restate ``n``: ranking more candidates than are returned
    (by their logprobs, on the server) is not done."""
    best_of = _count(body, "best_of")
    if best_of is not None and best_of != n:
        raise bad_request(
            "unsupported_parameter",
            f"'best_of' must equal 'n' ({n}): generating more candidates than are returned "
            "is not supported",
            "best_of",
        )


@dataclass(frozen=True, slots=True)
class ChatCompletionRequest:
    model: str
    # role/content dicts; an assistant one may have "tool_calls" ([{id, name,
    # arguments}]), a "tool" one "tool_call_id" (models/tools.text_messages).
    messages: list[dict[str, Any]]
    params: RequestParams
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")
    parallel_tool_calls: bool = True

    @property
    def prompt_tools(self) -> tuple[Tool, ...]:
        """The tools the prompt lists: none when the model may not call any."""
        return () if self.tool_choice.mode == "none" else self.tools

    def tool_parser(self) -> ToolCallParser | None:
        """What splits the reply into content and calls; None when no tool may be called."""
        if not self.prompt_tools:
            return None
        max_calls = None if self.parallel_tool_calls else 1
        return ToolCallParser(self.tools, max_calls, self.tool_choice.forced)


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A legacy ``/v1/completions`` request: raw text, no chat template."""

    model: str
    prompt: str
    params: RequestParams
    stream: bool = False
    include_usage: bool = False
    n: int = 1


AnyCompletionRequest = ChatCompletionRequest | CompletionRequest


def _content_text(content: Any, index: int) -> str:
    """A message's content: a string, or a list of text parts joined."""
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request("invalid_field", "only text content parts are supported", param)
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request("invalid_field", "a text part needs a string 'text'", param)
            texts.append(text)
        return "".join(texts)
    raise bad_request("invalid_field", "'content' must be a string or a list of text parts", param)


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("invalid_field", "'messages' must be a non-empty list", "messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad_request("invalid_field", "each message must be an object", f"messages[{i}]")
        role = message.get("role")
        role = ROLES.get(role) if isinstance(role, str) else None  # {} is unhashable: a 500
        if role is None:
            raise bad_request(
                "invalid_field",
                f"'role' must be one of {', '.join(ROLES)}",
                f"messages[{i}].role",
            )
        messages.append(_message(role, message, i))
    return messages


def _message(role: str, message: dict[str, Any], i: int) -> dict[str, Any]:
    """One message; an assistant's with ``tool_calls`` may have no content, a tool's
    result names the call it answers."""
    content = message.get("content")
    calls = message.get("tool_calls")
    if calls is not None and role != "assistant":
        raise bad_request(
            "invalid_field",
            "only an assistant message can have 'tool_calls'",
            f"messages[{i}].tool_calls",
        )
    if message.get("tool_call_id") is not None and role != "tool":
        raise bad_request(
            "invalid_field",
            "only a tool message can have a 'tool_call_id'",
            f"messages[{i}].tool_call_id",
        )
    if role == "assistant" and calls is not None and calls != []:  # [] asks for nothing
        parsed = tool_api.history_tool_calls(calls, f"messages[{i}].tool_calls")
        text = "" if content is None else _content_text(content, i)
        return {"role": role, "content": text, "tool_calls": parsed}
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise bad_request(
                "invalid_field",
                "a 'tool' message needs the 'tool_call_id' it answers",
                f"messages[{i}].tool_call_id",
            )
        return {"role": role, "content": _content_text(content, i), "tool_call_id": call_id}
    return {"role": role, "content": _content_text(content, i)}


def _optional_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request("invalid_field", f"'{name}' must be a boolean", name)
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("invalid_field", "'model' must be a non-empty string", "model")
    return model


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("invalid_field", "'stream_options' must be an object", "stream_options")
    return stream, _optional_bool(options or {}, "include_usage")


def parse_chat_completion(body: dict[str, Any]) -> ChatCompletionRequest:
    """Check a /v1/chat/completions body; raise ApiError(400) naming the bad field."""
    model = _model(body)
    messages = _messages(body.get("messages"))
    n = parse_n(body)
    refuse_unsupported(body, UNSUPPORTED_CHAT)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = parse_request_params(body, max_tokens_key=key)
    params = structured.with_chat_options(params, body)
    stream, include_usage = _streaming(body)
    tools = tool_api.parse_tools(body)
    choice = tool_api.parse_tool_choice(body, tools)
    parallel = tool_api.parse_parallel(body)
    grammar = call_grammar(tools, choice, parallel)
    if grammar is not None:
        if params.grammar is not None:
            raise bad_request(
                "invalid_parameter",
                "a forced 'tool_choice' cannot be combined with a 'response_format' schema",
                "tool_choice",
            )
        params = replace(params, grammar=grammar)
    return ChatCompletionRequest(
        model, messages, params, stream, include_usage, n, tools, choice, parallel
    )


def _prompt(raw: Any) -> str:
    """One prompt: a string, or a list holding one (not several prompts at once)."""
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        raise bad_request(
            "invalid_field",
            "'prompt' must be a non-empty string, or a list of one "
            "(token-id prompts and several prompts are not supported)",
            "prompt",
        )
    return raw


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    """Check a /v1/completions body; raise ApiError(400) naming the bad field."""
    model = _model(body)
    prompt = _prompt(body.get("prompt"))
    n = parse_n(body)
    _check_best_of(body, n)
    refuse_unsupported(body, UNSUPPORTED_COMPLETION)
    params = structured.with_completion_options(parse_request_params(body), body)
    stream, include_usage = _streaming(body)
    return CompletionRequest(model, prompt, params, stream, include_usage, n)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def openai_finish_reason(reason: str | None, tool_calls: bool = False) -> str:
    # "cancelled" only happens when the client went away, so nobody reads it.
    if reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens``: served from the KV prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _envelope(
    obj: str, id: str, created: int, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """What every completion object and chunk starts with."""
    return {
        "id": id,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }


def _choice(index: int, content: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    """A choice: ``text`` (text completions), ``message`` or ``delta`` (chat)."""
    return {"index": index, **content, "logprobs": None, "finish_reason": finish_reason}


def choice(
    text: bool,
    index: int,
    reply: str | None,
    finish_reason: str,
    tool_calls: list[ToolCall] | None = None,
) -> dict[str, Any]:
    """One choice of a whole completion; ``reply`` is None when the message is only
    ``tool_calls``."""
    if text:
        return _choice(index, {"text": reply}, finish_reason)
    message: dict[str, Any] = {"role": "assistant", "content": reply}
    if tool_calls:
        message["tool_calls"] = [tool_api.tool_call_object(c) for c in tool_calls]
    return _choice(index, {"message": message}, finish_reason)


def completion(
    text: bool,
    id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any],
) -> dict[str, Any]:
    """A whole ``chat.completion``, or a ``text_completion`` when ``text``."""
    obj = "text_completion" if text else "chat.completion"
    return {**_envelope(obj, id, created, model, choices), "usage": usage}


def chunk(
    text: bool,
    id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | str,
    finish_reason: str | None = None,
    include_usage: bool = False,
    index: int = 0,
) -> dict[str, Any]:
    """One streamed chunk with one choice, choice ``index`` (``delta`` is the text itself
    for a text completion); ``usage: null`` when usage comes last."""
    content = {"text": delta} if text else {"delta": delta}
    obj = "text_completion" if text else "chat.completion.chunk"
    body = _envelope(obj, id, created, model, [_choice(index, content, finish_reason)])
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(
    text: bool, id: str, created: int, model: str, usage: dict[str, Any]
) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    obj = "text_completion" if text else "chat.completion.chunk"
    return {**_envelope(obj, id, created, model, []), "usage": usage}


def model_card(
    model_id: str, created: int, precision: dict[str, Any] | None = None
) -> dict[str, Any]:
    """OpenAI's model object; ``chatserver`` is our extension: what actually serves it."""
    card: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "chatserver",
    }
    if precision:
        card["chatserver"] = {"precision": precision}
    return card


def model_list(
    model_id: str, created: int, precision: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model_id, created, precision)]}


def sse_event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


SSE_DONE = sse_event("[DONE]")
