"""Which web pages may drive this server from a browser.

A chat server on localhost is reachable from every page its user visits:
without checks, any site could open `/ws` (browsers send no preflight for
WebSockets) or POST a "simple" text/plain body to `/v1/query`. So:

* JSON endpoints take `application/json` only (errors.read_json_object: 415
  otherwise); that type is not "simple", so a foreign page's browser must ask
  first (a CORS preflight), and
* only the origins in `--cors-origin` get a preflight answer and
  `Access-Control-Allow-Origin`; `/ws` refuses any other `Origin` with 403.

Same-origin use (the bundled page at `/`) and clients that send no `Origin`
(programs, the openai client, curl) are always allowed.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from chatserver.api.errors import error_response
from chatserver.api.request_id import request_id_of
from chatserver.errors import ApiError

PREFLIGHT_MAX_AGE_S = 600


def parse_origins(spec: str) -> frozenset[str]:
    """`--cors-origin`: comma-separated origins, e.g. `https://chat.example.com`."""
    return frozenset(o.strip().rstrip("/").lower() for o in spec.split(",") if o.strip())


def _same_origin(origin: str, request: web.Request) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()


def allowed(request: web.Request, origins: frozenset[str]) -> bool:
    """True for no Origin, the server's own origin, or a configured one."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return _same_origin(origin, request) or origin.rstrip("/").lower() in origins


def check_websocket_origin(request: web.Request, origins: frozenset[str]) -> None:
    if not allowed(request, origins):
        raise ApiError(
            403,
            "origin_not_allowed",
            f"WebSocket connections from {request.headers['Origin']!r} are not allowed "
            "(the server's --cors-origin lists the web origins it serves)",
        )


def cors_middleware(origins: frozenset[str]) -> Middleware:
    """CORS headers and preflight answers for the configured origins, and for no others."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        listed = origin.rstrip("/").lower() in origins
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not listed:  # outside the error middleware: answer here
                refused = ApiError(403, "origin_not_allowed", f"origin {origin!r} is not allowed")
                return error_response(refused, openai=False, request_id=request_id_of(request))
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": "GET, POST, DELETE",
                    "Access-Control-Allow-Headers": "Content-Type, Authorization",
                    "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
                    "Vary": "Origin",
                },
            )
        response = await handler(request)
        if listed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    return middleware
