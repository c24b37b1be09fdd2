"""Responses API schemas: request checking, input items, response objects and stream events.

Pure data in OpenAI's exact shapes (those of the ``openai`` package's
``types/responses``), so the official clients and openai-agents work unchanged:
the same builders serve the JSON answer, the SSE stream and WebSocket mode.

As on the other OpenAI routes, a parameter this server does not honour is
refused with 400 ``unsupported_parameter`` naming it, unless its value asks for
nothing (``tools: []``, ``include: []``, ``truncation: "disabled"``...); fields
OpenAI does not define are ignored. Honoured: ``input`` (a string, or message,
``function_call`` and ``function_call_output`` items with text content),
``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``, ``stream``,
``include: ["message.output_text.logprobs"]`` and ``top_logprobs`` (each
output_text part's tokens, as chat's logprobs; not with tools in the prompt),
``store``, ``background`` (HTTP), ``previous_response_id``, ``metadata``,
``text.format`` (``text``, ``json_object``, ``json_schema``: constrained
decoding in the worker), ``truncation`` (``auto`` drops the oldest turns of a
conversation that outgrew the context, ``disabled``, the default, refuses it),
``user``/``safety_identifier``/``prompt_cache_key`` (accepted, echoed or
ignored: they ask nothing of the model), and chatserver's extensions ``seed``,
``top_k``, ``stop`` and ``ignore_eos`` (as on /v1/chat/completions).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from chatserver.api.openai import tools as tool_api
from chatserver.api.openai.protocol import ROLES, refuse_unsupported
from chatserver.api.openai.structured import json_schema_grammar, top_count
from chatserver.errors import ApiError, bad_request
from chatserver.models.tools import Tool, ToolCall, ToolCallParser, ToolChoice, call_grammar
from chatserver.protocol.sampling import RequestParams, parse_request_params
from chatserver.protocol.worker import GrammarSpec

# OpenAI's bounds on metadata: 16 pairs, keys of 64 characters, values of 512.
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_STREAM_ID = 64
# The ``include`` values honoured: the only output this server can add.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
INCLUDABLE = (LOGPROBS_INCLUDE,)
# GET /v1/responses/{id}/input_items: OpenAI's page bounds.
DEFAULT_ITEMS_LIMIT, MAX_ITEMS_LIMIT = 20, 100
MAX_ITEM_ID = 64


def _never(value: Any) -> bool:
    return False


def _is_empty(value: Any) -> bool:
    return value in ([], {})


# Parameters not honoured, each with the test of the values that ask for nothing.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "reasoning": (
        lambda v: isinstance(v, dict) and all(x is None for x in v.values()),
        "this model does not reason",
    ),
    "conversation": (_never, "conversations are not supported; chain with previous_response_id"),
    "prompt": (_never, "stored prompt templates are not supported"),
    "context_management": (_is_empty, "context management (compaction) is not supported"),
    "generate": (lambda v: v is True, "only generate=true is supported"),
    "moderation": (_never, "moderation is not supported"),
    "image": (_never, "images are not supported"),
    "service_tier": (
        lambda v: v in ("auto", "default"),
        "only service_tier 'auto' or 'default' is supported",
    ),
    "prompt_cache_retention": (
        lambda v: v == "in_memory",
        "the prefix cache is in memory only; 'in_memory' is accepted",
    ),
}
# Not over WebSocket, as OpenAI's WebSocket mode says.
UNSUPPORTED_WEBSOCKET: dict[str, tuple[Callable[[Any], bool], str]] = {
    "background": (lambda v: v is False, "background responses are not supported over WebSocket"),
}


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A checked ``POST /v1/responses`` body (or WebSocket ``response.create``)."""

    model: str
    # This turn's input items, normalised (see parse_input): what the history stores.
    items: list[dict[str, Any]]
    params: RequestParams
    # The same items in the shape GET .../input_items lists them, each with its id.
    input_items: list[dict[str, Any]] = field(default_factory=list)
    instructions: str | None = None
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Echoed in the response object as given (defaults filled in).
    text: dict[str, Any] = field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")
    parallel_tool_calls: bool = True
    user: str | None = None
    stream_id: str | None = None  # WebSocket mode's lane

    @property
    def logprobs(self) -> bool:
        """Whether output_text parts and deltas carry their tokens' logprobs."""
        return self.params.logprobs is not None

    @property
    def top_logprobs(self) -> int:
        return self.params.logprobs or 0

    @property
    def prompt_tools(self) -> tuple[Tool, ...]:
        """The tools the prompt lists: none when the model may not call any."""
        return () if self.tool_choice.mode == "none" else self.tools

    def output(self) -> OutputBuilder:
        """What turns this request's reply into output items and their events."""
        parser = None
        if self.prompt_tools:
            max_calls = None if self.parallel_tool_calls else 1
            parser = ToolCallParser(self.tools, max_calls, self.tool_choice.forced)
        return OutputBuilder(parser, logprobs=self.logprobs)


# --- input -------------------------------------------------------------------


def _text_of(content: Any, param: str, kinds: tuple[str, ...]) -> str:
    """A message's content: a string, or text parts (``input_text``/``output_text``) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(
            "invalid_field", "'content' must be a string or a list of content parts", param
        )
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            if kind in ("input_image", "input_file", "input_audio", "refusal"):
                raise bad_request(
                    "unsupported_parameter",
                    f"content parts of type {kind!r} are not supported (text only)",
                    f"{param}[{i}]",
                )
            raise bad_request(
                "invalid_field",
                f"a content part must be an object of type {' or '.join(map(repr, kinds))}",
                f"{param}[{i}]",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request("invalid_field", "a text part needs a string 'text'", param)
        texts.append(text)
    return "".join(texts)


def _string(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise bad_request("invalid_field", f"'{name}' must be a string", f"{param}.{name}")
    return value


def _item(raw: Any, param: str) -> dict[str, Any]:
    """One input item, normalised to ``{"type": "message", "role", "content": str}``,
    ``{"type": "function_call", "call_id", "name", "arguments"}`` or
    ``{"type": "function_call_output", "call_id", "output": str}``."""
    if not isinstance(raw, dict):
        raise bad_request("invalid_field", "each input item must be an object", param)
    kind = raw.get("type", "message")
    if kind == "message":
        role = raw.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(
                "invalid_field", f"'role' must be one of {', '.join(ROLES)}", f"{param}.role"
            )
        # Assistant messages carry output_text (as the API returned them); the
        # others input_text. Either is taken in both, as OpenAI does.
        text = _text_of(raw.get("content"), f"{param}.content", ("input_text", "output_text"))
        return {"type": "message", "role": role, "content": text}
    if kind == "function_call":
        return {
            "type": "function_call",
            "call_id": _string(raw, "call_id", param),
            "name": _string(raw, "name", param),
            "arguments": _string(raw, "arguments", param),
        }
    if kind == "function_call_output":
        output = raw.get("output")
        text = (
            output
            if isinstance(output, str)
            else _text_of(output, f"{param}.output", ("input_text", "output_text"))
        )
        return {
            "type": "function_call_output",
            "call_id": _string(raw, "call_id", param),
            "output": text,
        }
    if isinstance(kind, str) and kind:
        raise bad_request(
            "unsupported_parameter",
            f"input items of type {kind!r} are not supported (message, function_call and "
            "function_call_output are)",
            f"{param}.type",
        )
    raise bad_request("invalid_field", "an input item's 'type' must be a string", f"{param}.type")


def parse_input(raw: Any) -> list[dict[str, Any]]:
    """``input``: a string (one user message) or a non-empty list of input items."""
    if isinstance(raw, str):
        if not raw:
            raise bad_request("invalid_field", "'input' must not be empty", "input")
        return [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad_request(
            "invalid_field", "'input' must be a string or a non-empty list of input items", "input"
        )
    return [_item(item, f"input[{i}]") for i, item in enumerate(raw)]


_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def _item_id(raw: Any, kind: str, taken: set[str]) -> str:
    """The client's ``id`` for an item (one it passed back) when usable, else a new one:
    ids are unique within a response, so ``after`` names one item."""
    given = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(given, str) and 0 < len(given) <= MAX_ITEM_ID and given not in taken:
        item_id = given
    else:
        item_id = f"{_ID_PREFIXES[kind]}_{uuid.uuid4().hex}"
    taken.add(item_id)
    return item_id


def listed_item(item: dict[str, Any], item_id: str) -> dict[str, Any]:
    """A normalised input item as GET .../input_items lists it (OpenAI's ``ResponseItem``):
    a message's text is one part, ``output_text`` for the assistant, else ``input_text``."""
    if item["type"] != "message":
        return {"id": item_id, **item, "status": "completed"}
    text = item["content"]
    part = (
        output_text(text) if item["role"] == "assistant" else {"type": "input_text", "text": text}
    )
    return {
        "id": item_id,
        "type": "message",
        "role": item["role"],
        "content": [part],
        "status": "completed",
    }


def input_items(raw: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` (parse_input of ``raw``) as stored for listing, each with a stable id."""
    raws = raw if isinstance(raw, list) else [raw]
    taken: set[str] = set()
    return [
        listed_item(item, _item_id(r, item["type"], taken))
        for r, item in zip(raws, items, strict=True)
    ]


def parse_include(raw: Any) -> tuple[str, ...]:
    """``include``: a list of the values this server honours (INCLUDABLE); others are 400."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(value, str) for value in raw):
        raise bad_request("invalid_field", "'include' must be a list of strings", "include")
    for value in raw:
        if value not in INCLUDABLE:
            raise bad_request(
                "unsupported_parameter",
                f"'include' value {value!r} asks for output this server does not produce "
                f"(only {LOGPROBS_INCLUDE!r} is honoured)",
                "include",
            )
    return tuple(raw)


@dataclass(frozen=True, slots=True)
class ItemsQuery:
    """A checked GET /v1/responses/{id}/input_items query."""

    limit: int = DEFAULT_ITEMS_LIMIT
    order: str = "desc"
    after: str | None = None


def parse_items_query(query: Mapping[str, Sequence[str]]) -> ItemsQuery:
    """``limit`` (1..100), ``order`` (asc, desc), ``after`` (an item id) and ``include``
    (``include[]`` as the openai client sends it); ``query``: each name's values.
    Other parameters are ignored, as OpenAI's fields are."""

    def last(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    limit = DEFAULT_ITEMS_LIMIT
    raw = last("limit")
    if raw is not None:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_ITEMS_LIMIT:
            raise bad_request(
                "invalid_parameter",
                f"'limit' must be an integer from 1 to {MAX_ITEMS_LIMIT}",
                "limit",
            )
        limit = int(raw)
    order = last("order") or "desc"
    if order not in ("asc", "desc"):
        raise bad_request("invalid_parameter", "'order' must be 'asc' or 'desc'", "order")
    parse_include([*query.get("include", ()), *query.get("include[]", ())])
    return ItemsQuery(limit, order, last("after") or None)


def items_page(items: list[dict[str, Any]], query: ItemsQuery) -> dict[str, Any]:
    """One page of a response's input items: OpenAI's list object."""
    ordered = items if query.order == "asc" else items[::-1]
    start = 0
    if query.after is not None:
        ids = [item["id"] for item in ordered]
        if query.after not in ids:
            raise bad_request(
                "invalid_parameter",
                f"'after': no input item {query.after!r} in this response",
                "after",
            )
        start = ids.index(query.after) + 1
    page = ordered[start : start + query.limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + query.limit < len(ordered),
    }


def to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for normalised items, in the form models/tools.text_messages
    renders: function calls join the assistant message before them (or make one)
    as ``tool_calls``, each output is a ``tool`` message naming its call."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            messages.append({"role": ROLES[item["role"]], "content": item["content"]})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append(
                {"role": "tool", "content": item["output"], "tool_call_id": item["call_id"]}
            )
    return messages


def output_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as chat messages, for the conversation it continues."""
    normalised = []
    for item in items:
        if item["type"] == "message":
            text = "".join(part["text"] for part in item["content"])
            normalised.append({"type": "message", "role": "assistant", "content": text})
        else:
            normalised.append(item)
    return to_messages(normalised)


# --- request -----------------------------------------------------------------


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("invalid_field", "'model' must be a non-empty string", "model")
    return model


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request("invalid_field", f"'{name}' must be a boolean", name)
    return value


def _optional_string(body: dict[str, Any], name: str, most: int = 0) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or (most and not 0 < len(value) <= most):
        detail = f" of 1 to {most} characters" if most else ""
        raise bad_request("invalid_field", f"'{name}' must be a string{detail}", name)
    return value


def _metadata(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_METADATA_PAIRS:
        raise bad_request(
            "invalid_field",
            f"'metadata' must be an object of at most {MAX_METADATA_PAIRS} string pairs",
            "metadata",
        )
    for key, value in raw.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(value, str):
            raise bad_request(
                "invalid_field",
                f"'metadata' keys are at most {MAX_METADATA_KEY} characters, values strings",
                "metadata",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise bad_request(
                "invalid_field",
                f"'metadata' values are at most {MAX_METADATA_VALUE} characters",
                "metadata",
            )
    return dict(raw)


def _text_format(raw: Any) -> tuple[dict[str, Any], GrammarSpec | None]:
    """``text``: the echo ``{"format": ..., "verbosity": ...}`` and the grammar it asks for."""
    if raw is None:
        return {"format": {"type": "text"}, "verbosity": "medium"}, None
    if not isinstance(raw, dict):
        raise bad_request("invalid_field", "'text' must be an object", "text")
    verbosity = raw.get("verbosity")
    if verbosity not in (None, "medium"):
        raise bad_request("unsupported_parameter", "'verbosity' is not supported", "text.verbosity")
    fmt = raw.get("format")
    if fmt is None:
        fmt = {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    echo = {"format": fmt, "verbosity": "medium"}
    if kind == "text":
        return echo, None
    if kind == "json_object":
        return echo, GrammarSpec("json_object")
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request(
                "invalid_parameter",
                "a json_schema format needs a 'schema' object",
                "text.format.schema",
            )
        return echo, json_schema_grammar(fmt, "text.format")
    raise bad_request(
        "invalid_field",
        "'text.format.type' must be 'text', 'json_object' or 'json_schema'",
        "text.format",
    )


def _tools(body: dict[str, Any]) -> tuple[Tool, ...]:
    """``tools``: function tools in the Responses shape (``{"type": "function", "name",
    ...}``), checked by the chat API's parser (which takes them nested in ``function``)."""
    raw = body.get("tools")
    if not isinstance(raw, list):
        return tool_api.parse_tools({"tools": raw})
    nested = []
    for i, entry in enumerate(raw):
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind != "function":
            raise bad_request(
                "unsupported_parameter",
                f"only function tools are supported, not {kind!r}",
                f"tools[{i}].type",
            )
        fields = ("name", "description", "parameters", "strict")
        nested.append({"type": "function", "function": {k: entry[k] for k in fields if k in entry}})
    try:
        return tool_api.parse_tools({"tools": nested})
    except ApiError as err:
        if err.param:
            err.param = err.param.replace(".function", "")
        raise


def _tool_choice(body: dict[str, Any], tools: tuple[Tool, ...]) -> ToolChoice:
    """``tool_choice``: "none", "auto", "required" or ``{"type": "function", "name"}``."""
    raw = body.get("tool_choice")
    if isinstance(raw, dict) and raw.get("type") == "function" and "function" not in raw:
        raw = {"type": "function", "function": {"name": raw.get("name")}}
    return tool_api.parse_tool_choice({"tool_choice": raw}, tools)


def _logprobs(body: dict[str, Any], tools: tuple[Tool, ...]) -> int | None:
    """``include`` and ``top_logprobs`` (0..20): the alternatives to report with each
    token's logprob, or None for no logprobs. ``top_logprobs`` above 0 asks for them
    without ``include``. Not with tools in the prompt: the reply's tokens are then
    parsed into calls and text, and no token belongs to one output_text part."""
    wanted = LOGPROBS_INCLUDE in parse_include(body.get("include"))
    top = 0 if body.get("top_logprobs") is None else top_count(body, "top_logprobs")
    if not (wanted or top):
        return None
    if tools:
        raise bad_request(
            "unsupported_parameter",
            "logprobs are not reported when the model may call tools (tool_choice 'none' "
            "allows them)",
            "include" if wanted else "top_logprobs",
        )
    return top


def _params(body: dict[str, Any]) -> RequestParams:
    """Sampling parameters: OpenAI's, and the extensions every chatserver API takes."""
    names = ("max_output_tokens", "temperature", "top_p", "seed", "top_k", "stop", "ignore_eos")
    return parse_request_params(
        {name: body.get(name) for name in names}, max_tokens_key="max_output_tokens"
    )


def parse_create(body: dict[str, Any], *, websocket: bool = False) -> CreateRequest:
    """Check a create body (or a WebSocket ``response.create``); ApiError(400) naming the field."""
    model = _model(body)
    items = parse_input(body.get("input"))
    refuse_unsupported(body, UNSUPPORTED)
    if websocket:
        refuse_unsupported(body, UNSUPPORTED_WEBSOCKET)
    truncation = "disabled" if body.get("truncation") is None else body["truncation"]
    if truncation not in ("auto", "disabled"):
        raise bad_request(
            "invalid_field", "'truncation' must be 'auto' or 'disabled'", "truncation"
        )
    text, grammar = _text_format(body.get("text"))
    tools = _tools(body)
    choice = _tool_choice(body, tools)
    parallel = _bool(body, "parallel_tool_calls", True)
    call = call_grammar(tools, choice, parallel)
    if call is not None:
        if grammar is not None:
            raise bad_request(
                "invalid_parameter",
                "a forced 'tool_choice' cannot be combined with a 'text.format' schema",
                "tool_choice",
            )
        grammar = call
    params = _params(body)
    if grammar is not None:
        params = replace(params, grammar=grammar)
    logprobs = _logprobs(body, () if choice.mode == "none" else tools)
    if logprobs is not None:
        params = replace(params, logprobs=logprobs)
    store = _bool(body, "store", True)
    background = _bool(body, "background", False)
    stream = _bool(body, "stream", False)
    if background and not store:
        raise bad_request("invalid_field", "a background response must be stored", "store")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise bad_request("invalid_field", "'stream_options' must be an object", "stream_options")
    stream_id = None
    if websocket:
        stream_id = _optional_string(body, "stream_id", MAX_STREAM_ID)
    return CreateRequest(
        model=model,
        items=items,
        params=params,
        input_items=input_items(body.get("input"), items),
        instructions=_optional_string(body, "instructions"),
        stream=stream,
        store=store,
        background=background,
        previous_response_id=_optional_string(body, "previous_response_id"),
        metadata=_metadata(body.get("metadata")),
        text=text,
        truncation=truncation,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        user=_optional_string(body, "user"),
        stream_id=stream_id,
    )


# --- responses ---------------------------------------------------------------


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def function_call_id() -> str:
    return f"fc_{uuid.uuid4().hex}"


def tool_object(tool: Tool) -> dict[str, Any]:
    """A function tool as the response echoes it."""
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description or None,
        "parameters": tool.parameters or {"type": "object", "properties": {}},
        "strict": tool.strict,
    }


def tool_choice_object(choice: ToolChoice) -> Any:
    if choice.mode == "function":
        return {"type": "function", "name": choice.name}
    return choice.mode


def usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """The Responses API's usage: ``cached_tokens`` came from the worker's KV prefix cache."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def output_text(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An output_text part; ``logprobs``: its tokens' (api/openai/structured.chat_entry)."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def output_message(
    item_id: str, text: str | None, status: str, logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The assistant message item; ``text`` None: no content part yet (just added)."""
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [output_text(text, logprobs)],
    }


def response_object(
    request: CreateRequest,
    id: str,
    created_at: float,
    model: str,
    status: str,
    *,
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> dict[str, Any]:
    """A whole ``response`` object, as POST answers, GET retrieves and events carry."""
    finished = status in ("completed", "incomplete", "failed", "cancelled")
    return {
        "id": id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "background": request.background,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": None if incomplete_reason is None else {"reason": incomplete_reason},
        "instructions": request.instructions,
        "max_output_tokens": request.params.max_tokens,
        "max_tool_calls": None,
        "model": model,
        "output": output or [],
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": request.store,
        "temperature": temperature,
        "text": request.text,
        "tool_choice": tool_choice_object(request.tool_choice),
        "tools": [tool_object(t) for t in request.tools],
        "top_logprobs": request.top_logprobs,
        "top_p": top_p,
        "truncation": request.truncation,
        "usage": usage if finished else None,
        "user": request.user,
        "metadata": request.metadata,
    }


def deleted(id: str) -> dict[str, Any]:
    return {"id": id, "object": "response.deleted", "deleted": True}


def error_object(code: str, message: str) -> dict[str, Any]:
    """A failed response's ``error``."""
    return {"code": code, "message": message}


# --- stream events -----------------------------------------------------------


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """One stream event without its ``sequence_number`` (the transport numbers them)."""
    return {"type": kind, **fields}


def sse_event(data: dict[str, Any]) -> bytes:
    """One server-sent event as OpenAI sends them: ``event: <type>`` and its JSON."""
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def websocket_error(
    status: int,
    error_type: str,
    code: str,
    message: str,
    param: str | None = None,
    stream_id: str | None = None,
) -> dict[str, Any]:
    """WebSocket mode's ``error`` event (``ResponseWsError``): a request it could not start."""
    frame: dict[str, Any] = {
        "type": "error",
        "status": status,
        "error": {"type": error_type, "code": code, "message": message, "param": param},
    }
    if stream_id is not None:
        frame["stream_id"] = stream_id
    return frame


def function_call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    }


class OutputBuilder:
    """A reply's text as output items and their stream events (pure: no I/O).

    Without tools the reply is one message item, opened before any text. With
    tools the text goes through the tool-call parser: content opens a message
    item when it first appears, each call becomes a ``function_call`` item (added,
    its arguments in one delta, done), in the order the model wrote them. Events
    come without ``sequence_number`` (the run numbers them).

    With ``logprobs`` (never with a parser: parse_create refuses that), each
    delta carries the entries of the tokens it delivered and the message's part
    all of them.
    """

    def __init__(self, parser: ToolCallParser | None, *, logprobs: bool = False) -> None:
        self.parser = parser
        self.logprobs = logprobs and parser is None
        self.items: list[dict[str, Any]] = []  # finished items, in output order
        self._message: dict[str, Any] | None = None  # the open message item
        self._text = ""
        self._logprobs: list[dict[str, Any]] = []  # the open message's

    def start(self) -> list[dict[str, Any]]:
        return [] if self.parser is not None else self._open()

    def feed(
        self, delta: str, logprobs: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Events for a delta of the reply; ``logprobs``: the entries of its tokens."""
        if self.parser is not None:
            return self._emit(self.parser.feed(delta))
        if self.logprobs and logprobs:
            if not delta:  # tokens whose text never came (a stop string's)
                self._logprobs += logprobs
                return []
            return self._emit([delta], logprobs)
        return self._emit([delta])

    def close(self, status: str) -> list[dict[str, Any]]:
        """The reply ended: the open message's done events (its item ``status``)."""
        events = self._emit(self.parser.close()) if self.parser is not None else []
        return events + self._close_message(status)

    @property
    def open_items(self) -> list[dict[str, Any]]:
        """The items so far, the open message with its text so far."""
        if self._message is None:
            return list(self.items)
        part = output_text(self._text, self._logprobs)
        return [*self.items, {**self._message, "content": [part]}]

    def _index(self) -> int:
        return len(self.items)

    def _open(self) -> list[dict[str, Any]]:
        self._message = output_message(message_id(), None, "in_progress")
        self._text = ""
        self._logprobs = []
        ids = {"item_id": self._message["id"], "output_index": self._index(), "content_index": 0}
        return [
            event("response.output_item.added", output_index=self._index(), item=self._message),
            event("response.content_part.added", part=output_text(""), **ids),
        ]

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        message = self._message
        if message is None:
            return []
        index, text, logprobs = self._index(), self._text, self._logprobs
        ids = {"item_id": message["id"], "output_index": index, "content_index": 0}
        done = output_message(message["id"], text, status, logprobs)
        self._message = None
        self.items.append(done)
        return [
            event("response.output_text.done", text=text, logprobs=logprobs, **ids),
            event("response.content_part.done", part=output_text(text, logprobs), **ids),
            event("response.output_item.done", output_index=index, item=done),
        ]

    def _emit(
        self, parts: list[str | ToolCall], logprobs: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, str):
                if not part:
                    continue
                if self._message is None:
                    events += self._open()
                self._text += part
                self._logprobs += logprobs or []
                ids = {"item_id": self._message["id"], "output_index": self._index()}
                events.append(
                    event(
                        "response.output_text.delta",
                        delta=part,
                        logprobs=logprobs or [],
                        content_index=0,
                        **ids,
                    )
                )
                continue
            events += self._close_message("completed")
            item_id, index = function_call_id(), self._index()
            added = {**function_call_item(item_id, part, "in_progress"), "arguments": ""}
            done = function_call_item(item_id, part, "completed")
            ids = {"item_id": item_id, "output_index": index}
            events += [
                event("response.output_item.added", output_index=index, item=added),
                event("response.function_call_arguments.delta", delta=part.arguments, **ids),
                event("response.function_call_arguments.done", arguments=part.arguments, **ids),
                event("response.output_item.done", output_index=index, item=done),
            ]
            self.items.append(done)
        return events
