"""Every failure a client sees, as JSON with a stable code, built in one place.

Native routes answer ``{"error": {"code", "message"}}``; the OpenAI routes
answer OpenAI's ``{"error": {"message", "type", "param", "code"}}`` so that
OpenAI clients raise their usual exceptions. The middleware turns ApiError,
aiohttp's own HTTP errors (404, 405, 413) and anything unexpected (500, logged)
into one of those bodies. Both shapes carry the request's id as
``error.request_id`` (api/request_id.py), and every error answered here that
refuses a request counts in requests_rejected_total (chatserver/metrics.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from chatserver.api.request_id import request_id_of
from chatserver.api.state import METRICS
from chatserver.engine.errors import (
    GenerationFailed,
    NotReady,
    ReplyInterrupted,
    RequestTimedOut,
    WorkerLost,
    WorkerUnavailable,
)
from chatserver.errors import ApiError, bad_request, retry_after_seconds
from chatserver.limits.admission import ServerBusy
from chatserver.limits.rate import REQUESTS, RateLimited
from chatserver.protocol.json_input import JsonInputError, loads_strict
from chatserver.sessions import SessionBusy, SessionStoreUnavailable

log = logging.getLogger(__name__)

# Retry hints where no rate is known: a failed worker restarts (reloading the
# model takes seconds); a store that timed out may answer again at once.
WORKER_RETRY_AFTER_S = 5.0
STORE_RETRY_AFTER_S = 1.0

_HTTP_CODES = {
    404: ("not_found", "no route for {method} {path}"),
    405: ("method_not_allowed", "{method} is not allowed on {path}"),
    413: ("body_too_large", "the request body is too large"),
}


def to_api_error(exc: BaseException, request: web.Request | None = None) -> ApiError:
    """The client-facing form of any exception a handler let escape."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, web.HTTPException):
        code, template = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        if request is None:
            return ApiError(exc.status, code, exc.reason)
        return ApiError(exc.status, code, template.format(method=request.method, path=request.path))
    if isinstance(exc, ServerBusy):
        return ApiError(503, "server_busy", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, NotReady):
        return ApiError(503, "not_ready", str(exc))
    if isinstance(exc, WorkerUnavailable):
        return ApiError(503, "worker_unavailable", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, WorkerLost):
        return ApiError(503, "worker_failed", str(exc), retry_after=WORKER_RETRY_AFTER_S)
    if isinstance(exc, ReplyInterrupted):
        return ApiError(503, "interrupted", str(exc), retry_after=WORKER_RETRY_AFTER_S)
    if isinstance(exc, RequestTimedOut | SessionBusy):
        return ApiError(504, "request_timeout", str(exc))
    if isinstance(exc, GenerationFailed):
        return ApiError(500, "generation_failed", str(exc))
    if isinstance(exc, RateLimited):
        return rate_limited(exc)
    if isinstance(exc, SessionStoreUnavailable):
        return ApiError(
            503,
            "session_store_unavailable",
            "the session store is unavailable",
            retry_after=STORE_RETRY_AFTER_S,
        )
    return ApiError(500, "internal_error", "internal server error")


def rate_limited(exc: RateLimited) -> ApiError:
    wait = retry_after_seconds(exc.retry_after)
    what = "requests" if exc.limit == REQUESTS else "generated tokens"
    return ApiError(
        429,
        "rate_limited",
        f"rate limit reached: {exc.per_minute} {what} per minute per client; retry in {wait} s",
        retry_after=exc.retry_after,
    )


def openai_error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(
    err: ApiError, *, openai: bool = False, request_id: str | None = None
) -> dict[str, Any]:
    if not openai:
        body = err.body()
    else:
        body = {
            "error": {
                "message": err.message,
                "type": openai_error_type(err.status),
                "param": err.param,
                "code": err.code,
            }
        }
    if request_id is not None:
        body["error"]["request_id"] = request_id
    return body


def error_response(
    err: ApiError, *, openai: bool = False, request_id: str | None = None
) -> web.Response:
    response = web.json_response(
        error_body(err, openai=openai, request_id=request_id), status=err.status
    )
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(retry_after_seconds(err.retry_after))
    return response


def error_middleware(is_openai: Callable[[web.Request], bool]) -> Middleware:
    """JSON errors for every route; ``is_openai`` picks the body shape per request."""

    def answer(request: web.Request, err: ApiError) -> web.Response:
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.count_rejection(err.code)
        return error_response(err, openai=is_openai(request), request_id=request_id_of(request))

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = answer(request, to_api_error(exc, request))
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except ApiError as err:
            return answer(request, err)
        except Exception as exc:
            err = to_api_error(exc)
            if err.code == "internal_error":
                log.exception("%s %s failed", request.method, request.path)
            else:
                log.warning("%s %s: %s", request.method, request.path, exc)
            return answer(request, err)

    return middleware


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 ApiError saying what is wrong."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413,
            "body_too_large",
            f"the request body is larger than {request.client_max_size} bytes",
        ) from None
    if request.content_type != "application/json":
        # Not only tidiness: a foreign web page can POST text/plain without asking
        # (api/origins.py), but not application/json.
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the body as JSON with 'Content-Type: application/json' "
            f"(got {request.content_type!r})",
        )
    try:
        body = loads_strict(raw)
    except JsonInputError as exc:
        raise bad_request("invalid_json", f"the request body {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("invalid_json", "the request body must be a JSON object")
    return body
