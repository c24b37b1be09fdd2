"""GET /ws: chat over a WebSocket, many messages per socket, answered in order.

Two tasks per socket: the handler reads frames (throttled) and queues chat
messages or applies cancels at once; an answer loop takes one queued message at
a time and streams its reply. So a cancel is seen while a reply streams, and a
socket never has more than one generation in the engine. When the socket goes
(client close, network loss, server shutdown) queued messages are dropped and
the running generation is cancelled, so its sequence leaves the batch.

The frames themselves are built and parsed in ``chatserver.protocol.ws``.

On a server with API keys, an upgrade that carried no key (``api/auth.py``)
must send ``{"type": "auth", "api_key": ...}`` first: until then every other
frame is refused with ``unauthorized`` (``?session_id`` waits too), and a wrong
key, or none within AUTH_TIMEOUT_S, gets ``unauthorized`` and close code 4401.

Every error frame goes out through ``ChatSocket._send``, which adds the
upgrade request's id and counts refusals in requests_rejected_total.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web

from chatserver.api.auth import (
    PRINCIPAL,
    KeyRing,
    Principal,
    fingerprint,
    principal,
    websocket_protocols,
)
from chatserver.api.chat.serving import ChatService, session_not_found
from chatserver.api.errors import to_api_error
from chatserver.api.origins import check_websocket_origin
from chatserver.api.ratelimit import ClientLimits, client_limits
from chatserver.api.request_id import request_id_of
from chatserver.api.state import API_KEYS, CHAT, METRICS, ORIGINS, SETTINGS, WEBSOCKETS
from chatserver.config import Settings
from chatserver.errors import ApiError, retry_after_seconds
from chatserver.limits import FrameThrottle
from chatserver.metrics import Metrics
from chatserver.protocol.ws import (
    AuthFrame,
    CancelFrame,
    ChatFrame,
    FrameError,
    done_frame,
    encode,
    error_frame,
    parse_client_frame,
    session_frame,
    token_frame,
)

if TYPE_CHECKING:
    from chatserver.engine.engine import GenerationStream

log = logging.getLogger(__name__)

# aiohttp closes the socket (1009) on frames over this many times max_frame_bytes;
# frames between the two limits get a frame_too_large error frame instead.
HARD_FRAME_FACTOR = 4
# How long a closing socket waits for its cancelled generation to wind down.
CLOSE_GRACE_S = 10.0
# An unauthenticated socket gets this long to send a valid auth frame.
AUTH_TIMEOUT_S = 5.0
# Close code for a missing or wrong API key (4000-4999: for applications).
CLOSE_UNAUTHORIZED = 4401


@dataclass(slots=True)
class _Job:
    """A chat message queued or being answered."""

    id: str
    frame: ChatFrame
    cancelled: bool = False
    client_gone: bool = False  # cancelled because the socket closed
    stream: GenerationStream | None = None  # once generation started
    task: asyncio.Task[None] | None = None  # answering it, once taken from the queue

    def cancel(self, client_gone: bool = False) -> None:
        self.cancelled = True
        self.client_gone = client_gone
        if self.stream is not None:
            self.stream.cancel(client_gone)
        elif self.task is not None:
            # Not started (waiting for its session's previous turn, a slot, its
            # prompt): stop waiting; there is nothing to store.
            self.task.cancel()


class ChatSocket:
    """The state of one /ws connection: current session, queue, running message."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        chat: ChatService,
        settings: Settings,
        limits: ClientLimits,
        caller: Principal,
        keys: KeyRing,
        request_id: str | None = None,
        metrics: Metrics | None = None,
    ):
        self.ws = ws
        self.chat = chat
        self.settings = settings
        self.limits = limits
        self.caller = caller
        self.keys = keys
        self.request_id = request_id  # the upgrade request's, put on error frames
        self.metrics = metrics
        self.session_id: str | None = None
        self._pending: deque[_Job] = deque()
        self._running: _Job | None = None
        self._wakeup = asyncio.Event()
        self._closed = False
        self._throttle = FrameThrottle(settings.ws_rate)
        self._counter = 0

    async def run(self, resume: str | None) -> None:
        answers = asyncio.create_task(self._answer_loop())
        try:
            if resume is not None:
                await self._resume(resume)
            async for msg in self.ws:
                await self._throttle.wait()
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self._send(
                        error_frame("unsupported_frame", "binary frames are not supported")
                    )
                elif msg.type == WSMsgType.ERROR:
                    log.debug("websocket error: %s", self.ws.exception())
                    break
        finally:
            await self._close(answers)

    async def _send(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "error":
            if self.request_id is not None:
                frame["request_id"] = self.request_id
            if self.metrics is not None:
                self.metrics.count_rejection(frame["code"])
        if self.ws.closed:
            return
        try:
            await self.ws.send_str(encode(frame))
        except ConnectionError:
            pass  # the reader sees the socket close and cleans up

    async def _send_error(self, exc: BaseException, message_id: str | None) -> None:
        err = to_api_error(exc)
        if err.code == "internal_error":
            log.error("websocket message %s failed", message_id, exc_info=exc)
        retry_after = None if err.retry_after is None else retry_after_seconds(err.retry_after)
        await self._send(error_frame(err.code, err.message, message_id, retry_after))

    async def _resume(self, session_id: str) -> None:
        try:
            found = await self.chat.sessions.exists(session_id, owner=self.caller.owner)
        except Exception as exc:
            await self._send_error(exc, None)
            return
        if not found:
            await self._send_error(session_not_found(session_id), None)
            return
        self.session_id = session_id
        await self._send(session_frame(session_id))

    async def _on_text(self, text: str) -> None:
        try:
            frame = parse_client_frame(text, self.settings.max_frame_bytes, auth=self.keys.required)
        except FrameError as err:
            await self._send(err.frame())
            return
        if isinstance(frame, AuthFrame):
            # Already authenticated: the same key again is harmless, another one is not.
            if self.keys.lookup(frame.api_key) != self.caller:
                await refuse(
                    self.ws, frame.id, "the API key is not valid for this socket", self.request_id
                )
        elif isinstance(frame, CancelFrame):
            await self._cancel(frame.id)
        else:
            await self._enqueue(frame)

    def _in_flight(self, message_id: str) -> bool:
        if self._running is not None and self._running.id == message_id:
            return True
        return any(job.id == message_id for job in self._pending)

    def _new_id(self) -> str:
        while True:
            self._counter += 1
            message_id = f"m{self._counter}"
            if not self._in_flight(message_id):
                return message_id

    async def _enqueue(self, frame: ChatFrame) -> None:
        message_id = frame.id or self._new_id()
        if frame.id is not None and self._in_flight(frame.id):
            await self._send(
                error_frame("duplicate_id", f"message {frame.id!r} is already queued", frame.id)
            )
            return
        in_flight = len(self._pending) + (self._running is not None)
        if in_flight > self.settings.ws_queue:
            await self._send(
                error_frame(
                    "queue_full",
                    f"at most {self.settings.ws_queue} messages may wait on one socket",
                    message_id,
                )
            )
            return
        self._pending.append(_Job(message_id, frame))
        self._wakeup.set()

    async def _cancel(self, message_id: str | None) -> None:
        running = self._running
        if running is not None and message_id in (None, running.id):
            running.cancel()
            return
        for job in self._pending:
            if job.id == message_id:
                self._pending.remove(job)
                await self._send(done_frame(job.id, "cancelled", 0, 0))
                return
        if message_id is None:
            await self._send(error_frame("nothing_to_cancel", "no message is being answered"))
        else:
            await self._send(
                error_frame("unknown_id", f"no message {message_id!r} to cancel", message_id)
            )

    async def _answer_loop(self) -> None:
        while not self._closed:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            job = self._running = self._pending.popleft()
            job.task = asyncio.create_task(self._answer(job))
            try:
                await job.task
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not job.cancelled or (task is not None and task.cancelling()):
                    raise
                # Cancelled before its reply started: answered like a queued one.
                await self._send(done_frame(job.id, "cancelled", 0, 0))
            except Exception as exc:  # one message failing must not stop the socket
                await self._send_error(exc, job.id)
            finally:
                self._running = None

    async def _answer(self, job: _Job) -> None:
        frame = job.frame
        try:
            # The turn is ChatService's: leaving the block early cancels it.
            async with self.chat.turn(
                frame.session_id or self.session_id,
                frame.content,
                frame.params,
                owner=self.caller.owner,
                limits=self.limits,
            ) as turn:
                stream = job.stream = turn.stream
                if job.cancelled:
                    stream.cancel(job.client_gone)
                if turn.session_id != self.session_id:
                    self.session_id = turn.session_id
                    await self._send(session_frame(turn.session_id))
                async for delta in stream:
                    if delta:
                        await self._send(token_frame(job.id, delta))
        except Exception as exc:
            if (
                isinstance(exc, ApiError)
                and exc.code == "session_not_found"
                and not frame.session_id
            ):
                self.session_id = None  # expired or deleted: the next message starts a new one
            await self._send_error(exc, job.id)
            return
        await self._send(
            done_frame(
                job.id,
                stream.finish_reason,
                stream.prompt_tokens,
                stream.completion_tokens,
                turn.stored,
                cached_tokens=stream.cached_tokens,
            )
        )

    async def _close(self, answers: asyncio.Task[None]) -> None:
        """Drop queued messages, cancel the running one, let the answer loop end."""
        self._closed = True
        self._pending.clear()
        if self._running is not None:
            self._running.cancel(client_gone=True)
        self._wakeup.set()
        try:
            await asyncio.wait({answers}, timeout=CLOSE_GRACE_S)
        finally:
            if not answers.done():
                answers.cancel()
            elif not answers.cancelled() and answers.exception() is not None:
                log.error("websocket answer loop failed", exc_info=answers.exception())


async def refuse(
    ws: web.WebSocketResponse, frame_id: str | None, message: str, request_id: str | None
) -> None:
    """The auth contract's answer to a missing or wrong key: an error frame, then 4401."""
    if ws.closed:
        return
    try:
        frame = error_frame("unauthorized", message, frame_id, request_id=request_id)
        await ws.send_str(encode(frame))
        await ws.close(code=CLOSE_UNAUTHORIZED, message=b"unauthorized")
    except ConnectionError:
        pass


async def authenticate(
    ws: web.WebSocketResponse, keys: KeyRing, settings: Settings, request_id: str | None
) -> Principal | None:
    """Wait for a valid auth frame; None when the socket was refused or went away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + AUTH_TIMEOUT_S
    throttle = FrameThrottle(settings.ws_rate)
    while (remaining := deadline - loop.time()) > 0:
        try:
            msg = await ws.receive(timeout=remaining)
        except TimeoutError:
            break
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return None
        await throttle.wait()
        frame_id = None
        if msg.type == WSMsgType.TEXT:
            try:
                frame = parse_client_frame(msg.data, settings.max_frame_bytes, auth=True)
            except FrameError as err:
                frame_id = err.frame_id
            else:
                if isinstance(frame, AuthFrame):
                    found = keys.lookup(frame.api_key)
                    if found is None:
                        log.info("/ws auth frame: refused API key %s", fingerprint(frame.api_key))
                        await refuse(ws, frame.id, "the API key is not valid", request_id)
                    return found
                frame_id = frame.id
        refused = error_frame(
            "unauthorized",
            'this server needs an API key: send {"type": "auth", "api_key": ...} first',
            frame_id,
            request_id=request_id,
        )
        try:
            await ws.send_str(encode(refused))
        except ConnectionError:
            return None
    await refuse(ws, "auth", f"no API key was sent within {AUTH_TIMEOUT_S:g} s", request_id)
    return None


async def chat_ws(request: web.Request) -> web.WebSocketResponse:
    settings = request.app[SETTINGS]
    keys = request.app[API_KEYS]
    check_websocket_origin(request, request.app[ORIGINS])
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat or None,
        max_msg_size=HARD_FRAME_FACTOR * settings.max_frame_bytes,
        # Token frames are a few bytes: permessage-deflate would save little and
        # cost ~300 KiB of zlib state per open socket.
        compress=False,
        protocols=websocket_protocols(request),
    )
    try:
        await ws.prepare(request)
    except web.HTTPBadRequest as exc:  # a plain GET, or a broken handshake
        detail = " ".join((exc.text or "").split())
        raise ApiError(
            400,
            "invalid_upgrade",
            "/ws takes WebSocket upgrades only (Upgrade: websocket, Connection: Upgrade, "
            f"Sec-WebSocket-Version: 13, Sec-WebSocket-Key): {detail}",
        ) from None
    sockets = request.app[WEBSOCKETS]
    sockets.add(ws)
    try:
        if keys.required and PRINCIPAL not in request:
            found = await authenticate(ws, keys, settings, request_id_of(request))
            if found is None:
                return ws
            request[PRINCIPAL] = found
        limits = client_limits(request)  # after auth: limits count against the key
        chat_socket = ChatSocket(
            ws,
            request.app[CHAT],
            settings,
            limits,
            principal(request),
            keys,
            request_id_of(request),
            request.app[METRICS],
        )
        await chat_socket.run(request.query.get("session_id"))
    finally:
        sockets.discard(ws)
    return ws


async def close_websockets(app: web.Application, wait: float) -> None:
    """on_shutdown: tell every client the server is going away, all at once.

    A close waits for the client's answer; a client that never reads would hold
    it for aiohttp's close timeout, so no more than ``wait`` seconds are spent
    on all of them together (the rest are cancelled with their handlers).
    """
    closes = [
        asyncio.create_task(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown"))
        for ws in list(app[WEBSOCKETS])
    ]
    if closes:
        await asyncio.wait(closes, timeout=wait)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/ws", chat_ws)
