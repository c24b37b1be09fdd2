"""Request and response bodies of /v1/query and /v1/sessions: pure data, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chatserver.errors import bad_request
from chatserver.protocol.sampling import PARAM_NAMES, RequestParams, parse_request_params
from chatserver.sessions.base import Message, SessionPage

QUERY_FIELDS = PARAM_NAMES | {"message", "session_id"}
LIST_PARAMS = frozenset({"limit", "cursor"})
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100


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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, int]:
    """`cached_tokens`: of the prompt's tokens, those served from the KV prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
    }


def query_response(
    session_id: str,
    reply: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    stored: bool,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "reply": reply,
        "finish_reason": finish_reason,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
        "stored": stored,
    }


def session_response(session_id: str, messages: list[Message]) -> dict[str, Any]:
    return {"session_id": session_id, "messages": messages}


def parse_list_query(query: Mapping[str, str]) -> tuple[int, str | None]:
    """``limit`` and ``cursor`` of GET /v1/sessions; unknown parameters are refused."""
    unknown = sorted(set(query) - LIST_PARAMS)
    if unknown:
        raise bad_request("invalid_parameter", f"unknown parameter {unknown[0]!r}", unknown[0])
    raw = query.get("limit")
    limit = DEFAULT_LIST_LIMIT
    if raw is not None:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
            raise bad_request(
                "invalid_parameter",
                f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}",
                "limit",
            )
        limit = int(raw)
    return limit, query.get("cursor") or None


def session_list_response(page: SessionPage) -> dict[str, Any]:
    return {
        "sessions": [
            {"session_id": s.session_id, "created": s.created, "last_used": round(s.last_used, 3)}
            for s in page.sessions
        ],
        "next_cursor": page.next_cursor,
    }
