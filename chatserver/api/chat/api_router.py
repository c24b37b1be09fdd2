"""Routes of the native chat API: POST /v1/query, GET /v1/sessions, GET and DELETE
/v1/sessions/{id}; each sees only the caller's sessions (api/auth.py)."""

from __future__ import annotations

from aiohttp import web

from chatserver.api.auth import principal
from chatserver.api.chat.protocol import (
    parse_list_query,
    parse_query,
    query_response,
    session_list_response,
    session_response,
)
from chatserver.api.chat.serving import session_not_found
from chatserver.api.errors import read_json_object
from chatserver.api.ratelimit import client_limits
from chatserver.api.state import CHAT, SESSIONS
from chatserver.errors import ApiError, bad_request
from chatserver.sessions.base import InvalidCursor


async def query(request: web.Request) -> web.Response:
    """Answer one message in a session; a client that disconnects cancels its reply."""
    chat = request.app[CHAT]
    body = parse_query(await read_json_object(request))
    async with chat.turn(
        body.session_id,
        body.message,
        body.params,
        owner=principal(request).owner,
        limits=client_limits(request),
    ) as turn:
        await turn.stream.collect()
    stream = turn.stream
    return web.json_response(
        query_response(
            turn.session_id,
            stream.text,
            stream.finish_reason,
            stream.prompt_tokens,
            stream.completion_tokens,
            bool(turn.stored),
            stream.cached_tokens,
        )
    )


async def get_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    messages = await request.app[SESSIONS].messages(session_id, owner=principal(request).owner)
    if messages is None:
        raise session_not_found(session_id)
    return web.json_response(session_response(session_id, messages))


async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    if not await request.app[SESSIONS].delete(session_id, owner=principal(request).owner):
        raise session_not_found(session_id)
    return web.Response(status=204)


async def list_sessions(request: web.Request) -> web.Response:
    """The caller's sessions, most recently used first, a page at a time."""
    caller = principal(request)
    if not caller.authenticated:
        # Without keys every client is the same anonymous owner: a listing
        # would hand anyone everyone's session ids.
        raise ApiError(
            403,
            "auth_required",
            "listing sessions needs API keys on the server (--api-key or --api-keys-file)",
        )
    limit, cursor = parse_list_query(request.query)
    try:
        page = await request.app[SESSIONS].list_sessions(
            owner=caller.owner, limit=limit, cursor=cursor
        )
    except InvalidCursor:
        raise bad_request(
            "invalid_cursor", "'cursor' is not one this server gave", "cursor"
        ) from None
    return web.json_response(session_list_response(page))


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/query", query)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_delete("/v1/sessions/{session_id}", delete_session)
