"""Routes of the OpenAI-compatible API; errors here use OpenAI's error shape."""

from __future__ import annotations

import logging
from contextlib import aclosing

from aiohttp import web

from chatserver.api.errors import error_body, read_json_object, to_api_error
from chatserver.api.openai.protocol import (
    SSE_DONE,
    AnyCompletionRequest,
    parse_chat_completion,
    parse_completion,
    sse_event,
)
from chatserver.api.ratelimit import client_limits
from chatserver.api.request_id import request_id_of
from chatserver.api.state import OPENAI

log = logging.getLogger(__name__)

PATH_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/models", "/v1/responses")
# An SSE comment: clients ignore it, proxies see a live connection.
SSE_KEEPALIVE = b": keep-alive\n\n"

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def is_openai_request(request: web.Request) -> bool:
    """OpenAI's routes, and any /v1/ path no route knows: an OpenAI client calling an
    endpoint we lack (/v1/embeddings, say) gets a 404 it can read."""
    if request.path.startswith(PATH_PREFIXES):
        return True
    # A request no route matched carries the error its route will raise.
    failed = request.match_info.get_info().get("http_exception")
    return request.path.startswith("/v1/") and isinstance(failed, web.HTTPNotFound)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """One chat completion (``n`` choices), as JSON or as SSE chunks."""
    return await _serve(request, parse_chat_completion(await read_json_object(request)))


async def completions(request: web.Request) -> web.StreamResponse:
    """One legacy text completion (``n`` choices), as JSON or as SSE chunks."""
    return await _serve(request, parse_completion(await read_json_object(request)))


async def _serve(request: web.Request, body: AnyCompletionRequest) -> web.StreamResponse:
    """One completion, as JSON or as SSE chunks; a client that goes away cancels it
    (all its choices)."""
    serving = request.app[OPENAI]
    # The completion is the serving layer's: leaving the block early (an error, the
    # client gone) cancels its generations; their tokens are charged either way.
    async with serving.completion(body, client_limits(request)) as streams:
        if not body.stream:
            return web.json_response(await serving.complete(body, streams))
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            try:
                async with aclosing(serving.chunks(body, streams)) as chunks:
                    async for chunk in chunks:
                        await response.write(SSE_KEEPALIVE if chunk is None else sse_event(chunk))
            except ConnectionError:
                raise
            except Exception as exc:
                # Headers are sent: report the failure as an event, as OpenAI does.
                err = to_api_error(exc)
                if err.code == "internal_error":
                    log.error("completion stream failed", exc_info=exc)
                error = error_body(err, openai=True, request_id=request_id_of(request))
                await response.write(sse_event(error))
            await response.write(SSE_DONE)
            await response.write_eof()
        except ConnectionError:
            for stream in streams:
                stream.cancel(client_gone=True)  # the client went away
        return response


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAI].models())


async def get_model(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAI].model(request.match_info["model"]))


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
