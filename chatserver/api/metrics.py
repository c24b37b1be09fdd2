"""GET /metrics, and the server-side series that no handler owns.

The route renders the app's registry (chatserver/metrics.py) in Prometheus
text format. Besides it: a middleware counting every HTTP answer by route
template and status, the open-WebSocket gauge read at scrape time, and the
event-loop lag sampler, which runs as a cleanup context.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from chatserver.api.state import METRICS, WEBSOCKETS
from chatserver.metrics import sample_event_loop_lag

UNMATCHED = "unmatched"
# nginx's code for "the client closed the connection before the answer".
CLIENT_CLOSED = "499"


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def route_label(request: web.Request) -> str:
    """The matched route's template ("/v1/sessions/{session_id}"), never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


@web.middleware
async def http_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each answer once, by route and final status (outside the error middleware).

    A WebSocket counts as 101 when it closes; a handler cancelled because its
    client left counts as 499.
    """
    status = "500"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        request.app[METRICS].http_requests.labels(route_label(request), status).inc()


async def event_loop_sampler(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: sample the event loop's lag while the app runs."""
    task = asyncio.create_task(sample_event_loop_lag(app[METRICS].event_loop_lag))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    """Route, sampler and scrape-time gauges; build_app puts the middleware in its list."""
    sockets = app[WEBSOCKETS]
    app[METRICS].websocket_connections.set_function(lambda: len(sockets))
    app.cleanup_ctx.append(event_loop_sampler)
    app.router.add_get("/metrics", metrics)
