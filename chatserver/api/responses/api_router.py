"""Routes of the Responses API, in OpenAI's error shape: HTTP and WebSocket mode.

HTTP: ``POST /v1/responses`` (JSON, SSE with ``stream``, or ``background``),
``GET``/``DELETE /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``,
``GET /v1/responses/{id}/input_items`` (OpenAI's list object, newest first by default).

WebSocket mode: ``GET /v1/responses`` upgraded (what ``client.responses.connect()``
and openai-agents' ``responses_websocket_session()`` open). The client sends
``{"type": "response.create", ...}`` frames with a create body (``stream`` is
implied; ``background`` is refused) and gets the same typed events as SSE, one
text frame each. Responses with the same ``stream_id`` (a lane; none is a lane
too) are answered one after another in order; different lanes run at once, so
one socket multiplexes conversations, each event carrying its request's
``stream_id``. A request that cannot start (bad field, an unknown
``previous_response_id``, rate limited, busy) gets an ``error`` event
(``status``, ``error.type``/``code``/``message``/``param``, its ``stream_id``)
and the socket goes on. The socket's latest responses are kept on it, so a chain
works even with ``store: false``. When the socket closes, its running
generations are cancelled (they leave the batch within a step) and queued
requests dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from chatserver.api.auth import principal
from chatserver.api.errors import openai_error_type, read_json_object, to_api_error
from chatserver.api.openai.api_router import SSE_HEADERS, SSE_KEEPALIVE
from chatserver.api.origins import check_websocket_origin
from chatserver.api.ratelimit import ClientLimits, client_limits
from chatserver.api.request_id import request_id_of
from chatserver.api.responses import protocol
from chatserver.api.responses.protocol import CreateRequest, parse_create, sse_event
from chatserver.api.responses.serving import ResponsesServing
from chatserver.api.state import METRICS, ORIGINS, RESPONSES, SETTINGS, WEBSOCKETS
from chatserver.config import Settings
from chatserver.errors import ApiError, bad_request, retry_after_seconds
from chatserver.limits import FrameThrottle
from chatserver.metrics import Metrics
from chatserver.protocol.json_input import JsonInputError, loads_strict
from chatserver.sessions.responses import StoredResponse

log = logging.getLogger(__name__)

# Responses a WebSocket keeps for chaining (store: false ones included).
RECENT_PER_SOCKET = 16
# Lanes (stream_ids) one socket may have at once.
MAX_LANES = 16
# How long a closing socket waits for its cancelled generations to wind down.
CLOSE_GRACE_S = 10.0


async def create(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses: one response as JSON, as SSE events, or started in the background."""
    serving = request.app[RESPONSES]
    body = parse_create(await read_json_object(request))
    owner, limits = principal(request).owner, client_limits(request)
    if body.background:
        if body.stream:
            raise bad_request(
                "unsupported_parameter",
                "background responses cannot be streamed here; poll GET /v1/responses/{id}",
                "stream",
            )
        return web.json_response(await serving.start_background(body, owner, limits))
    # The response is the serving layer's: leaving the block early (an error, the
    # client gone) cancels its generation, and it is stored however it ended.
    async with serving.run(body, owner, limits) as run:
        if not body.stream:
            return web.json_response(await serving.complete(run))
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            try:
                async with aclosing(serving.events(run)) as events:
                    async for event in events:
                        await response.write(SSE_KEEPALIVE if event is None else sse_event(event))
            except ConnectionError:
                raise
            except Exception as exc:
                # Headers are sent: report the failure as an event, as OpenAI does.
                err = to_api_error(exc)
                log.error("response stream failed", exc_info=exc)
                await response.write(sse_event(run.numbered(_error_event(err))))
            await response.write_eof()
        except ConnectionError:
            run.stream.cancel(client_gone=True)  # the client went away
        return response


def _error_event(err: ApiError) -> dict[str, Any]:
    """A stream's ``error`` event (``ResponseErrorEvent``), numbered by the caller."""
    return protocol.event("error", code=err.code, message=err.message, param=err.param)


async def retrieve(request: web.Request) -> web.Response:
    owner = principal(request).owner
    found = await request.app[RESPONSES].retrieve(request.match_info["response_id"], owner)
    return web.json_response(found)


async def input_items(request: web.Request) -> web.Response:
    """GET /v1/responses/{id}/input_items: a page of the input items it was created with."""
    query = protocol.parse_items_query({k: request.query.getall(k) for k in request.query})
    owner = principal(request).owner
    page = await request.app[RESPONSES].input_items(request.match_info["response_id"], owner, query)
    return web.json_response(page)


async def delete(request: web.Request) -> web.Response:
    owner = principal(request).owner
    gone = await request.app[RESPONSES].delete(request.match_info["response_id"], owner)
    return web.json_response(gone)


async def cancel(request: web.Request) -> web.Response:
    owner = principal(request).owner
    ended = await request.app[RESPONSES].cancel(request.match_info["response_id"], owner)
    return web.json_response(ended)


# --- WebSocket mode ----------------------------------------------------------


class _Recent(OrderedDict[str, StoredResponse]):
    """A socket's latest responses, the oldest forgotten past RECENT_PER_SOCKET."""

    def __setitem__(self, key: str, value: StoredResponse) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > RECENT_PER_SOCKET:
            self.popitem(last=False)


@dataclass(slots=True)
class _Lane:
    """One ``stream_id``'s requests, answered in order by one task."""

    queue: deque[CreateRequest] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


class ResponsesSocket:
    """One WebSocket-mode connection: its lanes, its recent responses."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        serving: ResponsesServing,
        settings: Settings,
        limits: ClientLimits,
        owner: str,
        request_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.ws = ws
        self.serving = serving
        self.settings = settings
        self.limits = limits
        self.owner = owner
        self.request_id = request_id
        self.metrics = metrics
        self.recent = _Recent()
        self._lanes: dict[str | None, _Lane] = {}
        self._throttle = FrameThrottle(settings.ws_rate)
        self._closed = False

    async def run(self) -> None:
        try:
            async for msg in self.ws:
                await self._throttle.wait()
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self._send_error(
                        bad_request("unsupported_frame", "binary frames are not supported"), None
                    )
                elif msg.type == WSMsgType.ERROR:
                    log.debug("websocket error: %s", self.ws.exception())
                    break
        finally:
            await self._close()

    async def _send(self, frame: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        try:
            await self.ws.send_json(frame)
        except ConnectionError:
            pass  # the reader sees the socket close and cleans up

    async def _send_error(self, exc: BaseException, stream_id: str | None) -> None:
        err = to_api_error(exc)
        if err.code == "internal_error":
            log.error("websocket response failed", exc_info=exc)
        if self.metrics is not None:
            self.metrics.count_rejection(err.code)
        frame = protocol.websocket_error(
            err.status, openai_error_type(err.status), err.code, err.message, err.param, stream_id
        )
        if err.retry_after is not None:
            frame["error"]["headers"] = {"retry-after": str(retry_after_seconds(err.retry_after))}
        if self.request_id is not None:
            frame["error"]["request_id"] = self.request_id
        await self._send(frame)

    async def _on_text(self, text: str) -> None:
        try:
            body = loads_strict(text)
        except JsonInputError as exc:
            await self._send_error(bad_request("invalid_json", f"the frame {exc}"), None)
            return
        if not isinstance(body, dict):
            await self._send_error(bad_request("invalid_json", "a frame must be an object"), None)
            return
        raw_lane = body.get("stream_id")
        lane = raw_lane if isinstance(raw_lane, str) else None
        kind = body.get("type")
        if kind != "response.create":
            err = (
                bad_request("unsupported_parameter", "response steering is not supported", "type")
                if kind == "response.steer"
                else bad_request(
                    "invalid_field", "a frame's 'type' must be 'response.create'", "type"
                )
            )
            await self._send_error(err, lane)
            return
        try:
            request = parse_create({k: v for k, v in body.items() if k != "type"}, websocket=True)
        except ApiError as err:
            await self._send_error(err, lane)
            return
        await self._enqueue(request)

    async def _enqueue(self, request: CreateRequest) -> None:
        lane = self._lanes.get(request.stream_id)
        waiting = sum(len(x.queue) + (x.task is not None) for x in self._lanes.values())
        if waiting > self.settings.ws_queue or (lane is None and len(self._lanes) >= MAX_LANES):
            error = ApiError(
                429,
                "queue_full",
                f"at most {self.settings.ws_queue} responses may wait on one socket, "
                f"in at most {MAX_LANES} lanes (stream_id)",
            )
            await self._send_error(error, request.stream_id)
            return
        if lane is None:
            lane = self._lanes[request.stream_id] = _Lane()
        lane.queue.append(request)
        if lane.task is None:
            lane.task = asyncio.create_task(self._answer_lane(request.stream_id, lane))

    async def _answer_lane(self, stream_id: str | None, lane: _Lane) -> None:
        try:
            while lane.queue and not self._closed:
                await self._answer(lane.queue.popleft())
        finally:
            lane.task = None
            if not lane.queue and self._lanes.get(stream_id) is lane:
                del self._lanes[stream_id]

    async def _answer(self, request: CreateRequest) -> None:
        lane = request.stream_id
        try:
            async with self.serving.run(request, self.owner, self.limits, self.recent) as run:
                async with aclosing(self.serving.events(run)) as events:
                    async for event in events:
                        if event is None:
                            continue  # the socket's own pings keep it alive
                        if lane is not None:
                            event["stream_id"] = lane
                        await self._send(event)
        except Exception as exc:  # one response failing must not stop the socket
            await self._send_error(exc, lane)

    async def _close(self) -> None:
        """Drop queued requests, cancel the running ones (their streams leave the batch)."""
        self._closed = True
        tasks = []
        for lane in self._lanes.values():
            lane.queue.clear()
            if lane.task is not None:
                lane.task.cancel()
                tasks.append(lane.task)
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_GRACE_S)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """GET /v1/responses: WebSocket mode (a plain GET is refused with 400)."""
    settings = request.app[SETTINGS]
    check_websocket_origin(request, request.app[ORIGINS])
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat or None,
        # A response.create carries what a POST body does.
        max_msg_size=settings.max_body_bytes,
        compress=False,
    )
    try:
        await ws.prepare(request)
    except web.HTTPBadRequest as exc:
        detail = " ".join((exc.text or "").split())
        raise ApiError(
            400,
            "invalid_upgrade",
            f"GET /v1/responses is WebSocket mode and takes WebSocket upgrades only: {detail}",
        ) from None
    sockets = request.app[WEBSOCKETS]
    sockets.add(ws)
    try:
        socket = ResponsesSocket(
            ws,
            request.app[RESPONSES],
            settings,
            client_limits(request),
            principal(request).owner,
            request_id_of(request),
            request.app[METRICS],
        )
        await socket.run()
    finally:
        sockets.discard(ws)
    return ws


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create)
    app.router.add_get("/v1/responses", websocket)
    app.router.add_get("/v1/responses/{response_id}", retrieve)
    app.router.add_delete("/v1/responses/{response_id}", delete)
    app.router.add_get("/v1/responses/{response_id}/input_items", input_items)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel)
