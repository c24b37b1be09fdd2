"""Request and response bodies of /v1/query and /v1/sessions: pure data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatserver.errors import bad_request
from chatserver.protocol.sampling import RequestParams, parse_request_params
from chatserver.sessions.base import Message

PARAM_NAMES = frozenset({"max_tokens", "temperature", "top_p", "top_k", "stop", "seed"})
QUERY_FIELDS = PARAM_NAMES | {"message", "session_id"}


@dataclass(frozen=True, slots=True)
class QueryRequest:
    message: str
    session_id: str | None
    params: RequestParams


def parse_query(body: dict[str, Any]) -> QueryRequest:
    """Check a /v1/query body; unknown fields are refused so typos do not pass silently."""
    unknown = sorted(set(body) - QUERY_FIELDS)
    if unknown:
        raise bad_request("invalid_field", f"unknown field {unknown[0]!r}", unknown[0])
    message = body.get("message")
    if not isinstance(message, str) or not message:
        raise bad_request("invalid_field", "'message' must be a non-empty string", "message")
    session_id = body.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or not session_id):
        raise bad_request("invalid_field", "'session_id' must be a non-empty string", "session_id")
    return QueryRequest(message, session_id, parse_request_params(body))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


def query_response(
    session_id: str, reply: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "reply": reply,
        "finish_reason": finish_reason,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def session_response(session_id: str, messages: list[Message]) -> dict[str, Any]:
    return {"session_id": session_id, "messages": messages}
