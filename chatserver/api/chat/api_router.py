"""Routes of the native chat API: POST /v1/query, GET and DELETE /v1/sessions/{id}."""

from __future__ import annotations

from aiohttp import web

from chatserver.api.chat.protocol import parse_query, query_response, session_response
from chatserver.api.chat.serving import session_not_found
from chatserver.api.errors import read_json_object
from chatserver.api.ratelimit import client_limits
from chatserver.api.state import CHAT, SESSIONS


async def query(request: web.Request) -> web.Response:
    """Answer one message in a session; a client that disconnects cancels its reply."""
    chat = request.app[CHAT]
    body = parse_query(await read_json_object(request))
    limits = client_limits(request)
    await limits.admit()
    turn = await chat.start_turn(body.session_id, body.message, body.params)
    stream = turn.stream
    async with limits.metered(stream):
        async for _ in stream:
            pass
    stream.check()
    await chat.finish_turn(turn)
    return web.json_response(
        query_response(
            turn.session_id,
            stream.text,
            stream.finish_reason,
            stream.prompt_tokens,
            stream.completion_tokens,
        )
    )


async def get_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    messages = await request.app[SESSIONS].messages(session_id)
    if messages is None:
        raise session_not_found(session_id)
    return web.json_response(session_response(session_id, messages))


async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    if not await request.app[SESSIONS].delete(session_id):
        raise session_not_found(session_id)
    return web.Response(status=204)


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/query", query)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_delete("/v1/sessions/{session_id}", delete_session)
