"""The WebSocket chat protocol: client frames parsed and checked, server frames built.

Pure functions over plain data, no I/O, so every rule of the protocol is tested
without a socket; ``chatserver.api.ws`` only reads frames, calls these and
writes what they return.

Client -> server (JSON text frames)::

    {"type": "chat", "content": str, "session_id"?: str, "id"?: str,
     "params"?: {"max_tokens", "temperature", "top_p", "top_k", "stop", "seed"},
     "tools"?: [OpenAI function tools], "tool_choice"?: "none"|"auto"|"required"|
     {"type": "function", "function": {"name": str}}, "parallel_tool_calls"?: bool}
    {"type": "tool_results", "results": [{"tool_call_id": str, "content": str}],
     "id"?: str, "session_id"?: str}
    {"type": "tool_result", "tool_call_id": str, "content": str, "id"?: str,
     "session_id"?: str}
    {"type": "cancel", "id"?: str}
    {"type": "resume", "id": str, "offset"?: int, "session_id"?: str}
    {"type": "auth", "id"?: str, "api_key": str}   (only on a server with API keys)

Server -> client::

    {"type": "session", "session_id": str}
    {"type": "token", "id": str, "content": str, "offset": int}
    {"type": "tool_calls", "id": str, "calls": [{"id": str, "name": str, "arguments": str}]}
    {"type": "done", "id": str,
     "finish_reason": "stop"|"length"|"tool_calls"|"cancelled"|"interrupted",
     "usage": {"prompt_tokens": int, "completion_tokens": int}, "stored"?: bool}
    {"type": "error", "id"?: str, "code": str, "message": str, "retry_after"?: int,
     "request_id"?: str}

A sampling parameter outside ``params`` (``{"type": "chat", "max_tokens": 8}``)
is an ``invalid_field`` error, not ignored.

``retry_after`` (whole seconds) comes with codes a client should retry later:
``server_busy`` and ``rate_limited``.

Tools. A chat frame's ``tools``, ``tool_choice`` and ``parallel_tool_calls``
are OpenAI's, checked by the same rules (models/tools.py); a bad one is an
``invalid_field`` error frame whose message starts with the field's path
(``tools[0].function.name: ...``). "required" or a named function holds the
reply to a grammar: it is calls, each one's ``arguments`` valid for the tool's
schema. A reply that calls tools sends its text (if any) as token frames and
no text for the calls: a ``tool_calls`` frame (``arguments`` is JSON text),
then ``done`` with ``finish_reason: "tool_calls"``. An exchange::

    > {"type": "chat", "id": "q1", "content": "Weather in Paris?", "tools": [...]}
    < {"type": "tool_calls", "id": "q1", "calls": [{"id": "call_ab..", "name":
       "get_weather", "arguments": "{\"city\": \"Paris\"}"}]}
    < {"type": "done", "id": "q1", "finish_reason": "tool_calls", ...}
    > {"type": "tool_results", "id": "q2", "results": [{"tool_call_id":
       "call_ab..", "content": "18 C, sunny"}]}
    < {"type": "token", "id": "q2", ...} ... {"type": "done", "id": "q2", ...}

``tool_results`` answers every call of the reply at once (one missing is
``missing_tool_results``); ``tool_result`` answers one, and the one that
answers the last call starts the continuation. The continuation is a new
reply (id: the frame's ``id``, or one the server assigns) on the history with
the calls and their results, listing the same tools with ``tool_choice``
"auto". A result for a call that is not pending (unknown, answered, or
abandoned: the session went on with a chat message) is ``unknown_tool_call``.
The rest of the rules are chatserver.api.ws's.

Live delivery and resume (``chatserver.sessions.live``). A token frame's
``offset`` is where its ``content`` starts in the reply, in Unicode code
points (Python ``len``; in JavaScript ``[...text].length``, not ``.length``).
A socket on a session (``?session_id=``, or the session of its last chat)
also gets the replies other sockets on it produce, on any server sharing the
Redis, each frame wrapped::

    {"type": "live", "session_id": str, "frame": F}

where F is ``{"type": "user", "id": str, "content": str}`` (the message that
started the reply) or, for a continuation, ``{"type": "tool_results", "id": str,
"results": [{"tool_call_id": str, "content": str}]}``, then the token,
tool_calls, done or error frames its own client got.
``resume`` asks for reply ``id`` of the socket's session (or ``session_id``)
from character ``offset`` on (default 0), finished or still running, while
the session's channel retains it (``--live-ttl`` s after its last frame):
the answer is plain token frames from ``offset`` on, then its done or error
frame, as if it ran on this socket (and a session frame first when the
socket changes session). Errors: ``reply_not_found`` (unknown id, or past
retention), ``invalid_field`` (an ``offset`` past a finished reply's end, no
session). Ids should be unique within a session to resume: the newest reply
of an id is the one resumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from chatserver.errors import ApiError
from chatserver.models.tools import ToolCall, ToolUse, call_grammar, parse_tool_use
from chatserver.protocol.json_input import JsonInputError, loads_strict
from chatserver.protocol.sampling import PARAM_NAMES, RequestParams, parse_request_params

MAX_ID_LENGTH = 128


@dataclass(frozen=True, slots=True)
class ChatFrame:
    """A user message to answer; ``id`` None means the server assigns one."""

    content: str
    id: str | None = None
    session_id: str | None = None
    params: RequestParams = RequestParams()  # with the grammar of a forced tool_choice
    tools: ToolUse = ToolUse()


@dataclass(frozen=True, slots=True)
class ToolResultFrame:
    """Results of a reply's pending tool calls; ``id`` names the continuation they may start.

    ``tool_results`` carries every call still unanswered (``whole``: missing ones
    are refused); ``tool_result`` one of them, the last one starting the continuation.
    """

    results: tuple[tuple[str, str], ...]  # (tool_call_id, content), distinct ids
    id: str | None = None
    session_id: str | None = None
    whole: bool = False

    @property
    def call_ids(self) -> tuple[str, ...]:
        return tuple(call_id for call_id, _ in self.results)


@dataclass(frozen=True, slots=True)
class CancelFrame:
    """Cancel message ``id`` (running or queued); None cancels the running one."""

    id: str | None = None


@dataclass(frozen=True, slots=True)
class ResumeFrame:
    """Send reply ``id`` again from character ``offset`` on, then follow it live."""

    id: str
    offset: int = 0
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuthFrame:
    """The socket's API key, for clients that cannot send headers (browsers)."""

    api_key: str
    id: str | None = None

    def __repr__(self) -> str:  # never the key, not even in a traceback
        return f"AuthFrame(id={self.id!r})"


ClientFrame = ChatFrame | CancelFrame | ResumeFrame | AuthFrame | ToolResultFrame

# The largest resume offset accepted (no reply is anywhere near this long).
MAX_OFFSET = 1 << 30
# The most results a tool_results frame carries (as many as a request has tools).
MAX_RESULTS = 128


class FrameError(Exception):
    """A client frame was refused; becomes one error frame, the socket stays open."""

    def __init__(self, code: str, message: str, frame_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame_id = frame_id

    @classmethod
    def from_api_error(cls, err: ApiError, frame_id: str | None = None) -> FrameError:
        """The error of a shared check; its message starts with the field it names."""
        message = err.message
        if err.param is not None and not message.startswith(f"'{err.param}'"):
            message = f"{err.param}: {message}"
        return cls(err.code, message, frame_id)

    def frame(self) -> dict[str, Any]:
        return error_frame(self.code, self.message, self.frame_id)


def _optional_str(obj: dict[str, Any], name: str, frame_id: str | None) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise FrameError(
            "invalid_field",
            f"'{name}' must be a non-empty string of at most {MAX_ID_LENGTH} characters",
            frame_id,
        )
    return value


def parse_client_frame(text: str, max_bytes: int, *, auth: bool = False) -> ClientFrame:
    """One text frame as a ClientFrame (chat, cancel, resume, tool_result, auth), or FrameError.

    ``max_bytes`` is the soft frame limit (settings.max_frame_bytes): larger
    frames are refused with ``frame_too_large`` before any JSON parsing.
    ``auth`` says whether the server takes API keys: without keys an auth
    frame is an ``unknown_type``, which tells a client to drop its key.
    """
    if len(text) > max_bytes or len(text.encode()) > max_bytes:
        raise FrameError("frame_too_large", f"text frames are limited to {max_bytes} bytes")
    try:
        obj = loads_strict(text)
    except JsonInputError as exc:
        raise FrameError("invalid_json", f"the frame {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError("invalid_frame", "a frame must be a JSON object")

    # The id first, so that every later error can name the message it refuses.
    frame_id = _optional_str(obj, "id", None)

    kind = obj.get("type")
    if kind == "cancel":
        return CancelFrame(frame_id)
    if kind == "resume":
        return _resume_frame(obj, frame_id)
    if kind == "tool_result":
        result = _tool_result(obj, "", frame_id)
        return ToolResultFrame((result,), frame_id, _optional_str(obj, "session_id", frame_id))
    if kind == "tool_results":
        return _tool_results_frame(obj, frame_id)
    if kind == "auth" and auth:
        api_key = obj.get("api_key")
        if not isinstance(api_key, str) or not api_key:
            raise FrameError("invalid_field", "'api_key' must be a non-empty string", frame_id)
        return AuthFrame(api_key, frame_id)
    if kind != "chat":
        if not isinstance(kind, str):
            raise FrameError("invalid_field", "'type' must be a string", frame_id)
        expected = (
            "'chat', 'cancel', 'resume', 'tool_results', 'tool_result' or 'auth'"
            if auth
            else "'chat', 'cancel', 'resume', 'tool_results' or 'tool_result'"
        )
        raise FrameError(
            "unknown_type", f"unknown frame type {kind!r}; expected {expected}", frame_id
        )

    # A sampling parameter beside "content" would otherwise be ignored without a word
    # (a reply of the default length where the client asked for 32 tokens).
    misplaced = sorted(PARAM_NAMES & set(obj))
    if misplaced:
        name = misplaced[0]
        raise FrameError(
            "invalid_field",
            f'{name!r} belongs in \'params\': {{"params": {{"{name}": ...}}}}',
            frame_id,
        )
    content = obj.get("content")
    if not isinstance(content, str) or not content:
        raise FrameError("invalid_field", "'content' must be a non-empty string", frame_id)
    session_id = _optional_str(obj, "session_id", frame_id)
    raw_params = obj.get("params")
    if raw_params is None:
        raw_params = {}
    if not isinstance(raw_params, dict):
        raise FrameError("invalid_field", "'params' must be an object", frame_id)
    unknown = sorted(set(raw_params) - PARAM_NAMES)
    if unknown:
        raise FrameError(
            "invalid_parameter", f"unknown parameter {unknown[0]!r} in 'params'", frame_id
        )
    try:
        params = parse_request_params(raw_params)
        tools = parse_tool_use(obj)
    except ApiError as err:
        raise FrameError.from_api_error(err, frame_id) from None
    grammar = call_grammar(tools.tools, tools.choice, tools.parallel)
    if grammar is not None:
        params = replace(params, grammar=grammar)
    return ChatFrame(content, frame_id, session_id, params, tools)


def _tool_result(obj: dict[str, Any], where: str, frame_id: str | None) -> tuple[str, str]:
    """One result, ``{"tool_call_id", "content"}``; ``where`` prefixes its fields' names."""
    call_id = _optional_str(obj, "tool_call_id", frame_id)
    if call_id is None:
        raise FrameError(
            "invalid_field", f"'{where}tool_call_id' (the call answered) is required", frame_id
        )
    content = obj.get("content")
    if not isinstance(content, str):
        raise FrameError(
            "invalid_field", f"'{where}content' (the tool's result) must be a string", frame_id
        )
    return call_id, content


def _tool_results_frame(obj: dict[str, Any], frame_id: str | None) -> ToolResultFrame:
    raw = obj.get("results")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_RESULTS:
        raise FrameError(
            "invalid_field",
            f"'results' must be a list of 1 to {MAX_RESULTS} "
            "{'tool_call_id': str, 'content': str}",
            frame_id,
        )
    results: list[tuple[str, str]] = []
    for i, entry in enumerate(raw):
        where = f"results[{i}]."
        if not isinstance(entry, dict):
            raise FrameError("invalid_field", f"'results[{i}]' must be an object", frame_id)
        result = _tool_result(entry, where, frame_id)
        if any(result[0] == seen for seen, _ in results):
            raise FrameError(
                "invalid_field", f"'results' answers tool call {result[0]!r} twice", frame_id
            )
        results.append(result)
    session_id = _optional_str(obj, "session_id", frame_id)
    return ToolResultFrame(tuple(results), frame_id, session_id, whole=True)


def _resume_frame(obj: dict[str, Any], frame_id: str | None) -> ResumeFrame:
    if frame_id is None:
        raise FrameError("invalid_field", "'id' (the message to resume) is required")
    offset = obj.get("offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise FrameError(
            "invalid_field", f"'offset' must be an integer from 0 to {MAX_OFFSET}", frame_id
        )
    return ResumeFrame(frame_id, offset, _optional_str(obj, "session_id", frame_id))


def session_frame(session_id: str) -> dict[str, Any]:
    return {"type": "session", "session_id": session_id}


def token_frame(message_id: str, content: str, offset: int | None = None) -> dict[str, Any]:
    """`offset`: where `content` starts in the reply, in code points."""
    frame: dict[str, Any] = {"type": "token", "id": message_id, "content": content}
    if offset is not None:
        frame["offset"] = offset
    return frame


def tool_calls_frame(message_id: str, calls: list[ToolCall]) -> dict[str, Any]:
    """The calls a reply made, in order; ``arguments`` is JSON text, as OpenAI sends it."""
    return {
        "type": "tool_calls",
        "id": message_id,
        "calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls],
    }


def tool_results_frame(message_id: str, results: list[dict[str, str]]) -> dict[str, Any]:
    """The results a continuation answers, as other sockets on the session see it start."""
    return {"type": "tool_results", "id": message_id, "results": results}


def user_frame(message_id: str, content: str) -> dict[str, Any]:
    """The message a reply answers, as other sockets on the session see it start."""
    return {"type": "user", "id": message_id, "content": content}


def live_frame(session_id: str, frame: dict[str, Any]) -> dict[str, Any]:
    """Another socket's reply frame, forwarded to a socket on the same session."""
    return {"type": "live", "session_id": session_id, "frame": frame}


def done_frame(
    message_id: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    stored: bool | None = None,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """`cached_tokens`: of the prompt's tokens, those served from the KV prefix cache."""
    frame: dict[str, Any] = {
        "type": "done",
        "id": message_id,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_tokens": cached_tokens,
        },
    }
    if stored is not None:
        frame["stored"] = stored
    return frame


def error_frame(
    code: str,
    message: str,
    message_id: str | None = None,
    retry_after: int | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error"}
    if message_id is not None:
        frame["id"] = message_id
    frame["code"] = code
    frame["message"] = message
    if retry_after is not None:
        frame["retry_after"] = retry_after
    if request_id is not None:
        frame["request_id"] = request_id
    return frame


def encode(frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))
