"""OpenAI chat completions schemas: request checking and response/chunk builders.

Pure data in OpenAI's exact shapes, so the official clients (and anything
written against api.openai.com) work unchanged. Unknown request fields are
ignored, as OpenAI-compatible servers do, since clients send many optional ones.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from chatserver.errors import bad_request
from chatserver.protocol.sampling import RequestParams, parse_request_params

# OpenAI's "developer" role is its newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True, slots=True)
class ChatCompletionRequest:
    model: str
    messages: list[dict[str, str]]
    params: RequestParams
    stream: bool = False
    include_usage: bool = False


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


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("invalid_field", "'messages' must be a non-empty list", "messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad_request("invalid_field", "each message must be an object", f"messages[{i}]")
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad_request(
                "invalid_field",
                f"'role' must be one of {', '.join(ROLES)}",
                f"messages[{i}].role",
            )
        messages.append({"role": role, "content": _content_text(message.get("content"), i)})
    return messages


def _optional_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request("invalid_field", f"'{name}' must be a boolean", name)
    return value


def parse_chat_completion(body: dict[str, Any]) -> ChatCompletionRequest:
    """Check a /v1/chat/completions body; raise ApiError(400) naming the bad field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("invalid_field", "'model' must be a non-empty string", "model")
    messages = _messages(body.get("messages"))
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad_request("invalid_parameter", "only n=1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = parse_request_params(body, max_tokens_key=key)
    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("invalid_field", "'stream_options' must be an object", "stream_options")
    include_usage = _optional_bool(options or {}, "include_usage")
    return ChatCompletionRequest(model, messages, params, stream, include_usage)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def openai_finish_reason(reason: str | None) -> str:
    # "cancelled" only happens when the client went away, so nobody reads it.
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    id: str,
    created: int,
    model: str,
    delta: dict[str, str],
    finish_reason: str | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with one choice; ``usage: null`` if usage comes last."""
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(
    id: str, created: int, model: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


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
