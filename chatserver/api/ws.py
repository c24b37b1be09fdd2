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

Live delivery (``chatserver.sessions.live``): a reply's frames also go to its
session's channel, and a socket follows the channel of its session (from
``?session_id`` or its latest chat) to forward other sockets' replies as
``live`` frames. A ``resume`` frame replays a reply from an offset and follows
it to its end. With ``--ws-resume-grace`` a reply outlives its closed socket
that long, and to its end once someone resumes it.

Tools. A reply's tool calls are pending once stored (``ChatService``): the
socket keeps them with the results received so far (``_Calls``); the
results that answer the last one (a ``tool_results`` frame answers all at
once) queue the continuation like a chat message. The
calls belong to the session, not the socket: a result for a call this socket
does not know is looked up in the session's history (the stored assistant
message holds the calls and their tools), so a client that reconnected (on
any server) answers them there; its continuation then has the server's
default params. A result for a call that is not pending (unknown, answered,
or abandoned: the session went on) is ``unknown_tool_call``, a
``tool_results`` frame that leaves one out ``missing_tool_results``; either
refusal takes none of the frame's results. A new chat
message in the session abandons pending calls: they stay in the history
unanswered. A continuation that fails, or is cancelled before it starts,
stores nothing: its calls are pending again and take their results again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field, replace
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
from chatserver.api.chat.serving import (
    ChatService,
    PendingCalls,
    ToolAnswers,
    Turn,
    pending_calls,
    session_not_found,
)
from chatserver.api.errors import to_api_error
from chatserver.api.origins import check_websocket_origin
from chatserver.api.ratelimit import ClientLimits, client_limits
from chatserver.api.request_id import request_id_of
from chatserver.api.state import API_KEYS, CHAT, LIVE, METRICS, ORIGINS, SETTINGS, WEBSOCKETS
from chatserver.config import Settings
from chatserver.errors import ApiError, retry_after_seconds
from chatserver.limits import FrameThrottle
from chatserver.metrics import Metrics
from chatserver.models.tools import ToolCall
from chatserver.protocol.sampling import RequestParams
from chatserver.protocol.ws import (
    AuthFrame,
    CancelFrame,
    ChatFrame,
    FrameError,
    ResumeFrame,
    ToolResultFrame,
    done_frame,
    encode,
    error_frame,
    live_frame,
    parse_client_frame,
    session_frame,
    token_frame,
    tool_calls_frame,
    tool_results_frame,
    user_frame,
)
from chatserver.sessions.live import (
    REPLY_FRAMES,
    START_FRAMES,
    LiveChannel,
    LiveUnavailable,
    ReplyInfo,
    ReplyPublisher,
    hold_detached,
    pos_key,
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
    answers: ToolAnswers | None = None  # a continuation: the results it answers
    cancelled: bool = False
    client_gone: bool = False  # cancelled because the socket closed
    stream: GenerationStream | None = None  # once generation started
    task: asyncio.Task[None] | None = None  # answering it, once taken from the queue
    publisher: ReplyPublisher | None = None  # its frames to the session's channel

    def cancel(self, client_gone: bool = False) -> None:
        self.cancelled = True
        self.client_gone = client_gone
        if self.stream is not None:
            self.stream.cancel(client_gone)
        elif self.task is not None:
            # Not started (waiting for its session's previous turn, a slot, its
            # prompt): stop waiting; there is nothing to store.
            self.task.cancel()


@dataclass(slots=True)
class _Calls:
    """One reply's tool calls waiting for their results, and those received so far."""

    session_id: str
    pending: PendingCalls
    params: RequestParams  # the continuation's: the chat's, without a forced call's grammar
    results: dict[str, str] = field(default_factory=dict)


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
        live: LiveChannel | None = None,
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
        self.live = live
        self.origin = secrets.token_hex(8)  # marks this socket's frames in channels
        self._follow: asyncio.Task[None] | None = None  # forwarding the session's channel
        # Resumed replies being relayed: id -> (session, task); and every reply this
        # socket resumed: id -> its start position, so it is not forwarded twice.
        self._resumes: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._adopted: dict[str, str] = {}
        self._calls: _Calls | None = None  # tool calls waiting for results

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

    async def _send_error(self, exc: BaseException, message_id: str | None) -> dict[str, Any]:
        """Send the error frame of `exc`; the frame (as others on the session may see it)."""
        err = to_api_error(exc)
        if err.code == "internal_error":
            log.error("websocket message %s failed", message_id, exc_info=exc)
        retry_after = None if err.retry_after is None else retry_after_seconds(err.retry_after)
        frame = error_frame(err.code, err.message, message_id, retry_after)
        await self._send(dict(frame))
        return frame

    async def _resume(self, session_id: str) -> None:
        try:
            found = await self.chat.sessions.exists(session_id, owner=self.caller.owner)
        except Exception as exc:
            await self._send_error(exc, None)
            return
        if not found:
            await self._send_error(session_not_found(session_id), None)
            return
        await self._attach(session_id)

    async def _attach(self, session_id: str) -> None:
        """Make `session_id` the socket's session: tell the client, forward its channel."""
        self.session_id = session_id
        after = None
        if self.live is not None:
            try:  # from here on: a reply starting after the session frame is not missed
                after = await self.live.last_pos(session_id)
            except LiveUnavailable as exc:
                log.warning("session %s: no live delivery to this socket: %s", session_id, exc)
        await self._send(session_frame(session_id))
        self._forward_session(session_id if after is not None else None, after)

    def _forward_session(self, session_id: str | None, after: str | None = None) -> None:
        if self._follow is not None:
            self._follow.cancel()
            self._follow = None
        if self.live is not None and session_id is not None and not self._closed:
            self._follow = asyncio.create_task(self._forward(self.live, session_id, after))

    async def _forward(self, live: LiveChannel, session_id: str, after: str | None) -> None:
        """Other sockets' replies in this socket's session, as live frames."""
        try:
            async with aclosing(live.follow(session_id, after)) as entries:
                async for entry in entries:
                    frame, reply_id = entry.frame, entry.frame.get("id")
                    if entry.origin == self.origin or frame.get("type") not in REPLY_FRAMES:
                        continue
                    if reply_id in self._adopted:  # this socket resumed it: sent plain
                        if frame["type"] not in START_FRAMES or pos_key(entry.pos) <= pos_key(
                            self._adopted[reply_id]
                        ):
                            continue
                        del self._adopted[reply_id]  # a newer reply under that id
                    await self._send(live_frame(session_id, frame))
        except LiveUnavailable as exc:
            log.warning("session %s: live delivery to a socket stopped: %s", session_id, exc)

    def _announce(self, live: LiveChannel, session_id: str, frame: dict[str, Any]) -> None:
        """Tell the server generating a resumed reply about its new client (resume, cancel)."""

        async def publish() -> None:
            try:
                await live.publish(session_id, self.origin, [frame])
            except LiveUnavailable as exc:
                log.warning("session %s: could not announce %s: %s", session_id, frame, exc)

        live.spawn(publish())

    async def _on_resume(self, frame: ResumeFrame) -> None:
        """Send a reply again from an offset (a client that reconnected), then follow it."""
        session_id = frame.session_id or self.session_id
        live = self.live
        if live is None or session_id is None:
            await self._send(
                error_frame(
                    "invalid_field",
                    "resume needs a session: connect with ?session_id=... or name 'session_id'",
                    frame.id,
                )
            )
            return
        if self._in_flight(frame.id):
            await self._send(
                error_frame("duplicate_id", f"message {frame.id!r} is already running", frame.id)
            )
            return
        try:
            found = await self.chat.sessions.exists(session_id, owner=self.caller.owner)
            reply = await live.find_reply(session_id, frame.id) if found else None
        except Exception as exc:
            await self._send_error(exc, frame.id)
            return
        if not found:
            await self._send_error(session_not_found(session_id), frame.id)
            return
        if reply is None:
            message = (
                f"no reply {frame.id!r} to resume in session {session_id!r} (unknown, or its "
                f"last frame is over {live.ttl:g} s old: --live-ttl)"
            )
            await self._send(error_frame("reply_not_found", message, frame.id))
            return
        if reply.finished and frame.offset > reply.length:
            message = (
                f"'offset' {frame.offset} is past the end of reply {frame.id!r} "
                f"({reply.length} characters)"
            )
            await self._send(error_frame("invalid_field", message, frame.id))
            return
        if session_id != self.session_id:
            await self._attach(session_id)
        self._adopted[frame.id] = reply.start
        if not reply.finished:
            self._announce(live, session_id, {"type": "resume", "id": frame.id})
        task = asyncio.create_task(self._relay(live, session_id, frame.id, reply, frame.offset))
        self._resumes[frame.id] = (session_id, task)

    async def _relay(
        self, live: LiveChannel, session_id: str, reply_id: str, reply: ReplyInfo, offset: int
    ) -> None:
        try:
            frames = live.reply_frames(session_id, reply_id, reply, offset)
            async with aclosing(frames) as replay:
                async for frame in replay:
                    await self._send(frame)
        except LiveUnavailable as exc:
            await self._send_error(exc, reply_id)
        finally:
            self._resumes.pop(reply_id, None)

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
        elif isinstance(frame, ResumeFrame):
            await self._on_resume(frame)
        elif isinstance(frame, ToolResultFrame):
            await self._on_tool_result(frame)
        else:
            await self._enqueue(frame)

    async def _on_tool_result(self, frame: ToolResultFrame) -> None:
        """Keep calls' results; the ones that complete a reply's queue its continuation."""
        refused = self._refused_results(frame)
        if refused is not None:
            await self._send(error_frame("unknown_tool_call", refused, frame.id))
            return
        calls = self._calls
        first = frame.call_ids[0]
        if (
            calls is None
            or first not in calls.pending.call_ids
            or frame.session_id not in (None, calls.session_id)
        ):
            calls = await self._stored_calls(frame)
            if calls is None:
                return
        ids = calls.pending.call_ids
        for call_id in frame.call_ids:
            if call_id not in ids:
                message = f"tool call {call_id!r} is not one of the reply's calls {list(ids)}"
                await self._send(error_frame("unknown_tool_call", message, frame.id))
                return
            if call_id in calls.results:
                message = f"tool call {call_id!r} already has a result"
                await self._send(error_frame("unknown_tool_call", message, frame.id))
                return
        missing = [i for i in ids if i not in calls.results and i not in frame.call_ids]
        if frame.whole and missing:
            message = f"'results' leaves tool calls {missing} unanswered: answer every call"
            await self._send(error_frame("missing_tool_results", message, frame.id))
            return
        calls.results.update(frame.results)
        if missing:
            return
        answers = ToolAnswers(ids, tuple(calls.results[i] for i in ids))
        chat = ChatFrame("", frame.id, calls.session_id, calls.params, calls.pending.tools)
        if await self._enqueue(chat, answers):
            self._calls = None
        else:  # refused (queue full, duplicate id): they may be sent again
            for call_id in frame.call_ids:
                del calls.results[call_id]

    def _refused_results(self, frame: ToolResultFrame) -> str | None:
        """Why results are refused at once: a queued or running continuation answers one."""
        jobs = [*self._pending, *([self._running] if self._running else [])]
        for call_id in frame.call_ids:
            if any(j.answers is not None and call_id in j.answers.call_ids for j in jobs):
                return f"tool call {call_id!r} is already answered (its continuation is queued)"
        return None

    async def _stored_calls(self, frame: ToolResultFrame) -> _Calls | None:
        """The session's pending calls from its history (another socket's, or before a
        reconnect); None, after an error frame, when the call is not one of them."""
        session_id = frame.session_id or self.session_id
        call_id = frame.call_ids[0]
        history = None
        if session_id is not None:
            try:
                history = await self.chat.sessions.messages(session_id, owner=self.caller.owner)
            except Exception as exc:
                await self._send_error(exc, frame.id)
                return None
            if history is None:
                await self._send_error(session_not_found(session_id), frame.id)
                return None
        pending = pending_calls(history or [])
        if session_id is None or pending is None or call_id not in pending.call_ids:
            where = "no session" if session_id is None else f"session {session_id!r}"
            message = (
                f"no tool call {call_id!r} is waiting for a result in {where} (unknown, "
                "answered, or abandoned by a later message)"
            )
            await self._send(error_frame("unknown_tool_call", message, frame.id))
            return None
        self._calls = _Calls(session_id, pending, RequestParams())
        return self._calls

    def _in_flight(self, message_id: str) -> bool:
        if self._running is not None and self._running.id == message_id:
            return True
        return message_id in self._resumes or any(job.id == message_id for job in self._pending)

    def _new_id(self) -> str:
        while True:
            self._counter += 1
            message_id = f"m{self._counter}"
            if not self._in_flight(message_id):
                return message_id

    async def _enqueue(self, frame: ChatFrame, answers: ToolAnswers | None = None) -> bool:
        """Queue a message (or a continuation); False, after an error frame, if refused."""
        message_id = frame.id or self._new_id()
        if frame.id is not None and self._in_flight(frame.id):
            await self._send(
                error_frame("duplicate_id", f"message {frame.id!r} is already queued", frame.id)
            )
            return False
        in_flight = len(self._pending) + (self._running is not None)
        if in_flight > self.settings.ws_queue:
            await self._send(
                error_frame(
                    "queue_full",
                    f"at most {self.settings.ws_queue} messages may wait on one socket",
                    message_id,
                )
            )
            return False
        self._pending.append(_Job(message_id, frame, answers))
        self._wakeup.set()
        return True

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
        if message_id in self._resumes and self.live is not None:
            # Resumed: the server generating it stops it if its own socket has gone
            # (then its done frame, cancelled, comes through the channel).
            self._announce(
                self.live, self._resumes[message_id][0], {"type": "cancel", "id": message_id}
            )
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
                frame.content if job.answers is None else job.answers,
                frame.params,
                owner=self.caller.owner,
                limits=self.limits,
                tools=frame.tools,
            ) as turn:
                stream = job.stream = turn.stream
                if job.cancelled:
                    stream.cancel(job.client_gone)
                if turn.session_id != self.session_id:
                    await self._attach(turn.session_id)
                if self.live is not None:
                    job.publisher = ReplyPublisher(self.live, turn.session_id, self.origin)
                    job.publisher.send(self._start_frame(job))
                offset = 0
                async for delta in stream:
                    # With tools, text that may be a call is held back: calls are never text.
                    offset = await self._tokens(job, turn.split(delta), offset)
                await self._tokens(job, turn.split_end(), offset)
        except Exception as exc:
            if (
                isinstance(exc, ApiError)
                and exc.code == "session_not_found"
                and not frame.session_id
            ):
                self.session_id = None  # expired or deleted: the next message starts a new one
                self._forward_session(None)
            sent = await self._send_error(exc, job.id)
            if job.publisher is not None:
                job.publisher.send(sent)
            return
        else:
            self._track_calls(job, turn)  # before the client hears of them
            frames = [tool_calls_frame(job.id, turn.calls)] if turn.calls else []
            frames.append(
                done_frame(
                    job.id,
                    turn.finish_reason,
                    stream.prompt_tokens,
                    stream.completion_tokens,
                    turn.stored,
                    cached_tokens=stream.cached_tokens,
                )
            )
            for sent in frames:
                await self._send(sent)
                if job.publisher is not None:
                    job.publisher.send(sent)
        finally:
            if job.publisher is not None:  # cut off (cancelled task): end it for followers
                job.publisher.finish(done_frame(job.id, "cancelled", 0, 0))

    def _start_frame(self, job: _Job) -> dict[str, Any]:
        """What a reply answers, as other sockets on the session see it start."""
        if job.answers is None:
            return user_frame(job.id, job.frame.content)
        results = [
            {"tool_call_id": m["tool_call_id"], "content": m["content"]}
            for m in job.answers.messages()
        ]
        return tool_results_frame(job.id, results)

    async def _tokens(self, job: _Job, parts: list[str | ToolCall], offset: int) -> int:
        """Send a reply's text parts as token frames (calls go in its tool_calls frame)."""
        for part in parts:
            if isinstance(part, str) and part:
                token = token_frame(job.id, part, offset)
                offset += len(part)
                await self._send(token)
                if job.publisher is not None:
                    job.publisher.send(token)
        return offset

    def _track_calls(self, job: _Job, turn: Turn) -> None:
        """A stored message abandons the session's pending calls; a stored reply's calls
        are pending until every one has its result."""
        if not turn.stored:
            return
        if self._calls is not None and self._calls.session_id == turn.session_id:
            self._calls = None
        pending = turn.pending()
        if pending is not None:
            params = replace(job.frame.params, grammar=None)
            self._calls = _Calls(turn.session_id, pending, params)

    async def _close(self, answers: asyncio.Task[None]) -> None:
        """Drop queued messages, cancel the running one, let the answer loop end."""
        self._closed = True
        self._pending.clear()
        running = self._running
        detached = running is not None and self._detach(running)
        if running is not None and not detached:
            running.cancel(client_gone=True)
        self._wakeup.set()
        live_tasks = [task for _, task in self._resumes.values()]
        if self._follow is not None:
            live_tasks.append(self._follow)
        for task in live_tasks:
            task.cancel()
        await asyncio.gather(*live_tasks, return_exceptions=True)
        if detached and self.live is not None:
            self.live.keep(answers)  # the answer loop ends with the detached reply
            return
        try:
            await asyncio.wait({answers}, timeout=CLOSE_GRACE_S)
        finally:
            if not answers.done():
                answers.cancel()
            elif not answers.cancelled() and answers.exception() is not None:
                log.error("websocket answer loop failed", exc_info=answers.exception())

    def _detach(self, job: _Job) -> bool:
        """Leave a running reply generating after its socket closed, for a resume elsewhere.

        For --ws-resume-grace seconds, and to its end once resumed
        (``hold_detached``); False (cancel it now) without a grace.
        """
        grace = self.settings.ws_resume_grace
        live, publisher, task = self.live, job.publisher, job.task
        if grace <= 0 or live is None or publisher is None or task is None or job.cancelled:
            return False

        def cancel() -> None:
            job.cancel(client_gone=True)

        holder = live.spawn(hold_detached(live, publisher.session_id, job.id, grace, cancel))
        task.add_done_callback(lambda _: holder.cancel())
        return True


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
            request.app[LIVE],
        )
        await _run_to_its_end(ws, chat_socket.run(request.query.get("session_id")))
    finally:
        sockets.discard(ws)
    return ws


async def _run_to_its_end(ws: web.WebSocketResponse, run: Coroutine[Any, Any, None]) -> None:
    """Run the socket, letting its clean-up finish after the client closed.

    Once a close handshake ends, aiohttp closes the transport and, with handler
    cancellation on, cancels this handler while the socket is still winding down
    its replies: every normally closed socket counted as 499 in /metrics. A
    cancel while the socket is still open cancels the socket with it.
    """
    task = asyncio.ensure_future(run)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not ws.closed:
            task.cancel()
            raise
        await task  # bounded: ChatSocket._close waits at most CLOSE_GRACE_S


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
