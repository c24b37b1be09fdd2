"""GET /openapi.json: an OpenAPI 3.1 document of every HTTP route, built from plain data.

It is the API reference and the contract ``tests/test_openapi.py`` fuzzes the
server against (schemathesis): every status a route can answer, the body of
each, and for errors the ``code`` values that status carries, so a new error
path that is not written down here fails that test. ``/ws`` is described as
the GET that upgrades; its frames (``chatserver.protocol.ws``) are JSON
Schemas under ``components.schemas`` (``WsClientFrame``, ``WsServerFrame``),
which ``tests/test_ws_fuzz.py`` holds every server frame to.

The document describes the server as configured: with API keys the protected
operations require the bearer scheme and list their 401, without keys they
need none (``--metrics-auth`` likewise for ``/metrics``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from chatserver import __version__
from chatserver.api.chat.protocol import MAX_LIST_LIMIT
from chatserver.api.chat.protocol import PARAM_NAMES as QUERY_PARAMS
from chatserver.api.openai.protocol import ROLES, UNSUPPORTED_CHAT, UNSUPPORTED_COMPLETION
from chatserver.api.state import API_KEYS, ENGINE, SETTINGS
from chatserver.config import DEFAULT_MODEL_NAME
from chatserver.protocol.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_PENALTY,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    PARAM_NAMES,
)
from chatserver.protocol.ws import MAX_ID_LENGTH, MAX_OFFSET
from chatserver.protocol.ws import PARAM_NAMES as WS_PARAMS

PATH = "/openapi.json"
Schema = dict[str, Any]

MAX_TOKENS = 1 << 20  # protocol/sampling.py's bounds
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FINISH_REASONS = ["stop", "length", "cancelled", "interrupted"]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Schema], required: list[str], **extra: Any) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
        **extra,
    }


# --- schemas -----------------------------------------------------------------

SAMPLING: dict[str, Schema] = {
    "max_tokens": {
        **_nullable({"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}),
        "description": "At most this many tokens (default --default-max-tokens), capped by "
        "the room left in the context.",
    },
    "temperature": {
        **_nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "description": "0 (or below 1e-5) decodes greedily.",
    },
    "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "top_k": {
        **_nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOKENS}),
        "description": "0 = off.",
    },
    "stop": {
        "anyOf": [
            {"$ref": "#/components/schemas/StopString"},
            {
                "type": "array",
                "items": {"$ref": "#/components/schemas/StopString"},
                "maxItems": MAX_STOP_STRINGS,
            },
            {"type": "null"},
        ]
    },
    "seed": {
        **_nullable({"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}),
        "description": "Reproducible sampling.",
    },
    "presence_penalty": _nullable(
        {"type": "number", "minimum": -MAX_PENALTY, "maximum": MAX_PENALTY}
    ),
    "frequency_penalty": _nullable(
        {"type": "number", "minimum": -MAX_PENALTY, "maximum": MAX_PENALTY}
    ),
    "logit_bias": {
        **_nullable(
            {
                "type": "object",
                "maxProperties": MAX_LOGIT_BIAS_ENTRIES,
                "propertyNames": {"pattern": "^(0|[1-9][0-9]{0,8})$"},
                "additionalProperties": {
                    "type": "number",
                    "minimum": -MAX_LOGIT_BIAS,
                    "maximum": MAX_LOGIT_BIAS,
                },
            }
        ),
        "description": "Token id (a decimal string) to a bias added to its logit; an id "
        "past the model's vocabulary is 400 invalid_parameter.",
    },
    "ignore_eos": {
        "type": ["boolean", "null"],
        "description": "Generate past the end-of-sequence token, to max_tokens or a stop string.",
    },
}


def _params(names: frozenset[str]) -> dict[str, Schema]:
    """The sampling parameters an endpoint reads (each module names its own set).

    One added to chatserver.protocol.sampling before it is described here is
    admitted with any value (tests/test_openapi.py fails until it is described).
    """
    undescribed = {"description": "Not described in this document yet."}
    return {name: SAMPLING.get(name, undescribed) for name in sorted(names)}


# Values that ask for nothing of an OpenAI parameter not honoured yet; each table in
# api/openai/protocol.py says which of them it accepts (any other is refused).
_NOTHING_ASKED: list[Any] = [[], "none", False, "", ["text"], {"type": "text"}, 1]


def _unsupported(table: dict[str, tuple[Any, str]]) -> dict[str, Schema]:
    properties = {}
    for name, (accepted, why) in table.items():
        values = [value for value in _NOTHING_ASKED if accepted(value)]
        properties[name] = {
            "enum": [*values, None],
            "description": f"{why}: other values are refused (unsupported_parameter).",
        }
    return properties


_FUNCTION_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
TOOL_CALL = _object(
    {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": _object(
            {"name": {"type": "string"}, "arguments": {"type": "string"}}, ["name", "arguments"]
        ),
    },
    ["id", "type", "function"],
)
# In a request's history: fields beside these are ignored, as everywhere in OpenAI bodies.
REQUEST_TOOL_CALL = {
    "type": "object",
    "properties": {
        "id": {"type": ["string", "null"]},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "arguments": {"type": ["string", "object"]},
            },
            "required": ["name"],
        },
    },
    "required": ["function"],
}
TOOL_CALL_DELTA = _object(
    {
        "index": {"type": "integer", "minimum": 0},
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": _object(
            {"name": {"type": "string"}, "arguments": {"type": "string"}}, ["arguments"]
        ),
    },
    ["index", "function"],
    description="A call's first delta has its id, type and name; the next its arguments.",
)
TOOL_PARAMS: dict[str, Schema] = {
    "tools": {
        "type": "array",
        "maxItems": 128,
        "items": {
            "type": "object",
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "properties": {
                        "name": _FUNCTION_NAME,
                        "description": {"type": ["string", "null"]},
                        "parameters": {
                            "type": ["object", "null"],
                            "description": "The arguments' JSON schema (of type object).",
                        },
                        "strict": {"type": ["boolean", "null"]},
                    },
                    "required": ["name"],
                },
            },
            "required": ["type", "function"],
        },
        "description": "Functions the model may call (in its system prompt, Hermes format).",
    },
    "tool_choice": {
        "anyOf": [
            {"enum": ["none", "auto", "required"]},
            {
                "type": "object",
                "properties": {
                    "type": {"const": "function"},
                    "function": {
                        "type": "object",
                        "properties": {"name": _FUNCTION_NAME},
                        "required": ["name"],
                    },
                },
                "required": ["type", "function"],
            },
        ],
        "description": "`required` and a named function are guaranteed by constrained "
        "decoding (arguments valid for the function's schema); `auto` is parsed from the "
        "model's reply. Default: `auto` with tools, else `none`.",
    },
    "parallel_tool_calls": {
        "type": "boolean",
        "description": "Whether a reply may make several calls (default true).",
    },
}

_LOGPROB_TOKEN = {
    "token": {"type": "string"},
    "logprob": {"type": "number", "maximum": 0},
    "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
}
CHAT_LOGPROBS = _nullable(
    _object(
        {
            "content": {
                "type": "array",
                "items": _object(
                    {
                        **_LOGPROB_TOKEN,
                        "top_logprobs": {
                            "type": "array",
                            "maxItems": 20,
                            "items": _object(_LOGPROB_TOKEN, ["token", "logprob", "bytes"]),
                        },
                    },
                    ["token", "logprob", "bytes", "top_logprobs"],
                ),
            },
            "refusal": {"type": "null"},
        },
        ["content", "refusal"],
        description="With `logprobs: true`: each generated token's logprob under the "
        "distribution it was sampled from (after temperature, top-k/top-p and any "
        "grammar; greedy: at temperature 1), and its `top_logprobs` alternatives.",
    )
)
TEXT_LOGPROBS = _nullable(
    _object(
        {
            "tokens": {"type": "array", "items": {"type": "string"}},
            "token_logprobs": {"type": "array", "items": {"type": "number", "maximum": 0}},
            "top_logprobs": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": {"type": "number"}},
            },
            "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        },
        ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    )
)
# The structured-output and logprobs parameters (api/openai/structured.py).
STRUCTURED_PARAMS: dict[str, Schema] = {
    "response_format": {
        "anyOf": [
            # Fields beside the ones read are ignored, as elsewhere in OpenAI bodies.
            _object(
                {"type": {"enum": ["text", "json_object"]}}, ["type"], additionalProperties=True
            ),
            _object(
                {
                    "type": {"const": "json_schema"},
                    "json_schema": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": 64},
                            "description": {"type": ["string", "null"]},
                            "schema": {"type": "object", "description": "A JSON schema."},
                            "strict": {"type": ["boolean", "null"]},
                        },
                        "required": ["name"],
                    },
                },
                ["type", "json_schema"],
                additionalProperties=True,
            ),
            {"type": "null"},
        ],
        "description": "Constrained decoding: the reply is guaranteed to be a JSON object "
        "(`json_object`) or valid for the schema (`json_schema`; `strict: true` refuses "
        "keywords that cannot be enforced, else they are ignored). Extensions: "
        '`{"type": "regex", "regex": "..."}` and `{"type": "grammar", "grammar": "<Lark>"}`. '
        "A schema, regex or grammar that does not compile is a 400.",
    },
    "logprobs": {
        "type": ["boolean", "null"],
        "description": "Return each token's logprob; with `top_logprobs` (0 to 20, only "
        "with `logprobs: true`) that many most likely alternatives too.",
    },
}

NATIVE_USAGE = _object(
    {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "cached_tokens": {
            "type": "integer",
            "minimum": 0,
            "description": "Of the prompt's tokens, those served from the KV prefix cache.",
        },
    },
    ["prompt_tokens", "completion_tokens", "cached_tokens"],
)
OPENAI_USAGE = _object(
    {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
        "prompt_tokens_details": _object(
            {
                "cached_tokens": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Of the prompt's tokens, those served from the KV prefix cache.",
                }
            },
            ["cached_tokens"],
        ),
    },
    ["prompt_tokens", "completion_tokens", "total_tokens"],
)
REQUEST_ID = {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"}

_STREAMING: dict[str, Schema] = {
    "n": {"enum": [1, None], "description": "Only 1 is supported."},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": _nullable(
        {"type": "object", "properties": {"include_usage": {"type": ["boolean", "null"]}}}
    ),
}

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "description": "Every error on the native routes (chatserver/api/errors.py).",
        **_object(
            {
                "error": _object(
                    {
                        "code": {"type": "string", "description": "Stable; match on it."},
                        "message": {"type": "string", "minLength": 1},
                        "param": {"type": "string", "description": "The field at fault."},
                        "request_id": REQUEST_ID,
                    },
                    ["code", "message", "request_id"],
                )
            },
            ["error"],
        ),
    },
    "OpenAIError": {
        "description": "Every error on the OpenAI routes (and any unknown /v1/ path), in "
        "OpenAI's shape.",
        **_object(
            {
                "error": _object(
                    {
                        "message": {"type": "string", "minLength": 1},
                        "type": {
                            "enum": ["invalid_request_error", "rate_limit_error", "server_error"]
                        },
                        "param": {"type": ["string", "null"]},
                        "code": {"type": "string"},
                        "request_id": REQUEST_ID,
                    },
                    ["message", "type", "param", "code", "request_id"],
                )
            },
            ["error"],
        ),
    },
    "StopString": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH},
    "QueryRequest": _object(
        {
            "message": {"type": "string", "minLength": 1},
            "session_id": {
                **_nullable({"type": "string", "minLength": 1}),
                "description": "Continue this session; without it a new one is created.",
            },
            **_params(QUERY_PARAMS),
        },
        ["message"],
        description="Unknown fields are refused (invalid_field).",
    ),
    "Usage": NATIVE_USAGE,
    "QueryResponse": _object(
        {
            "session_id": {"type": "string"},
            "reply": {"type": "string"},
            "finish_reason": {"enum": FINISH_REASONS},
            "usage": _ref("Usage"),
            "stored": {
                "type": "boolean",
                "description": "Whether the turn is in the session's history.",
            },
        },
        ["session_id", "reply", "finish_reason", "usage", "stored"],
    ),
    "SessionMessage": _object(
        {
            "role": {"enum": ["user", "assistant"]},
            "content": {"type": "string"},
            "cancelled": {"const": True, "description": "A reply cut short by its client."},
            "interrupted": {"const": True, "description": "A reply cut short by a shutdown."},
        },
        ["role", "content"],
    ),
    "Session": _object(
        {
            "session_id": {"type": "string"},
            "messages": {"type": "array", "items": _ref("SessionMessage")},
        },
        ["session_id", "messages"],
    ),
    "SessionList": _object(
        {
            "sessions": {
                "type": "array",
                "items": _object(
                    {
                        "session_id": {"type": "string"},
                        "created": {"type": "integer", "description": "Unix seconds."},
                        "last_used": {"type": "number", "description": "Unix seconds."},
                    },
                    ["session_id", "created", "last_used"],
                ),
                "maxItems": MAX_LIST_LIMIT,
            },
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass back as `cursor` for the next page; null on the last.",
            },
        },
        ["sessions", "next_cursor"],
    ),
    "ChatMessage": {
        "type": "object",
        "description": "An assistant message with `tool_calls` may have null content; a "
        "`tool` message answers the call named by `tool_call_id`.",
        "allOf": [
            {
                "anyOf": [
                    {
                        "properties": {
                            "role": {"const": "assistant"},
                            "tool_calls": {"type": "array", "minItems": 1},
                        },
                        "required": ["role", "tool_calls"],
                    },
                    {
                        "properties": {"content": {"type": ["string", "array"]}},
                        "required": ["content"],
                    },
                ]
            },
            {
                "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
                "then": {
                    "required": ["tool_call_id"],
                    "properties": {"tool_call_id": {"type": "string", "minLength": 1}},
                },
            },
            {
                "if": {"properties": {"role": {"not": {"const": "assistant"}}}},
                "then": {"properties": {"tool_calls": {"type": "null"}}},
            },
            {
                "if": {"properties": {"role": {"not": {"const": "tool"}}}},
                "then": {"properties": {"tool_call_id": {"type": "null"}}},
            },
        ],
        "properties": {
            "role": {
                "enum": list(ROLES),
                "description": "`developer` is taken as `system`.",
            },
            "tool_calls": {"type": ["array", "null"], "items": REQUEST_TOOL_CALL},
            "tool_call_id": {"type": ["string", "null"]},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "null"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                            "required": ["type", "text"],
                        },
                    },
                ]
            },
        },
        "required": ["role", "content"],
    },
    "ChatCompletionRequest": {
        "type": "object",
        "description": "Fields OpenAI does not define are ignored.",
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
            **_STREAMING,
            **_params(PARAM_NAMES),
            "max_completion_tokens": {
                **SAMPLING["max_tokens"],
                "description": "OpenAI's newer name for max_tokens; when set, max_tokens is "
                "not read.",
            },
            **_unsupported(UNSUPPORTED_CHAT),
            # null is the same as leaving a field out, as for every OpenAI field.
            **{name: _nullable(schema) for name, schema in TOOL_PARAMS.items()},
            **{name: _nullable(schema) for name, schema in STRUCTURED_PARAMS.items()},
        },
        "required": ["model", "messages"],
    },
    "CompletionRequest": {
        "type": "object",
        "description": "Legacy text completion: the prompt is tokenized as it is, no chat "
        "template. Fields OpenAI does not define are ignored.",
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "prompt": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "minItems": 1,
                        "maxItems": 1,
                    },
                ],
                "description": "One prompt (token ids and several prompts are refused).",
            },
            **_STREAMING,
            **_params(PARAM_NAMES),
            **_unsupported(UNSUPPORTED_COMPLETION),
            "logprobs": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": 20,
                "description": "Return each token's logprob and this many alternatives.",
            },
        },
        "required": ["model", "prompt"],
    },
    "OpenAIUsage": OPENAI_USAGE,
    "ChatCompletion": _object(
        {
            "id": {"type": "string", "pattern": "^chatcmpl-"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "null"},
            "choices": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": _object(
                    {
                        "index": {"const": 0},
                        "message": _object(
                            {
                                "role": {"const": "assistant"},
                                "content": {"type": ["string", "null"]},
                                "tool_calls": {"type": "array", "items": TOOL_CALL},
                            },
                            ["role", "content"],
                        ),
                        "logprobs": CHAT_LOGPROBS,
                        "finish_reason": {"enum": ["stop", "length", "tool_calls"]},
                    },
                    ["index", "message", "logprobs", "finish_reason"],
                ),
            },
            "usage": _ref("OpenAIUsage"),
        },
        ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"],
    ),
    "ChatCompletionChunk": _object(
        {
            "id": {"type": "string", "pattern": "^chatcmpl-"},
            "object": {"const": "chat.completion.chunk"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "null"},
            "choices": {
                "type": "array",
                "maxItems": 1,
                "items": _object(
                    {
                        "index": {"const": 0},
                        "delta": _object(
                            {
                                "role": {"const": "assistant"},
                                "content": {"type": ["string", "null"]},
                                "tool_calls": {"type": "array", "items": TOOL_CALL_DELTA},
                            },
                            [],
                        ),
                        "logprobs": CHAT_LOGPROBS,
                        "finish_reason": {"enum": ["stop", "length", "tool_calls", None]},
                    },
                    ["index", "delta", "logprobs", "finish_reason"],
                ),
            },
            "usage": {
                "anyOf": [_ref("OpenAIUsage"), {"type": "null"}],
                "description": "With stream_options.include_usage: null on every chunk but "
                "the last, which has no choices and the usage.",
            },
        },
        ["id", "object", "created", "model", "system_fingerprint", "choices"],
    ),
    "TextCompletion": _object(
        {
            "id": {"type": "string", "pattern": "^cmpl-"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "null"},
            "choices": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {
                    "allOf": [
                        _ref("TextChoice"),
                        {"properties": {"finish_reason": {"enum": ["stop", "length"]}}},
                    ]
                },
            },
            "usage": _ref("OpenAIUsage"),
        },
        ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"],
    ),
    "TextChoice": _object(
        {
            "index": {"const": 0},
            "text": {"type": "string"},
            "logprobs": TEXT_LOGPROBS,
            "finish_reason": {"enum": ["stop", "length", None]},
        },
        ["index", "text", "logprobs", "finish_reason"],
        description="finish_reason is null on every streamed chunk but the last.",
    ),
    "TextCompletionChunk": _object(
        {
            "id": {"type": "string", "pattern": "^cmpl-"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "null"},
            "choices": {"type": "array", "maxItems": 1, "items": _ref("TextChoice")},
            "usage": {
                "anyOf": [_ref("OpenAIUsage"), {"type": "null"}],
                "description": "With stream_options.include_usage: null on every chunk but "
                "the last, which has no choices and the usage.",
            },
        },
        ["id", "object", "created", "model", "system_fingerprint", "choices"],
    ),
    "Model": _object(
        {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "chatserver": {
                "type": "object",
                "description": "Extension: the precision that serves it (as /readyz, less "
                "the quality gate's detail).",
                "properties": {"precision": {"type": "object"}},
            },
        },
        ["id", "object", "created", "owned_by"],
    ),
    "ModelList": _object(
        {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
        ["object", "data"],
    ),
    "Health": _object({"status": {"const": "ok"}}, ["status"]),
    "Readiness": _object(
        {
            "status": {"enum": ["ready", "loading"]},
            "model": {"type": "string"},
            "generations": {"type": "integer", "minimum": 0},
            "precision": {
                "type": "object",
                "description": "dtype, kernels, device, CPU features, quality gate figures.",
            },
            "admission": _object(
                {
                    "admitted": {"type": "integer", "minimum": 0},
                    "waiting": {"type": "integer", "minimum": 0},
                    "running_slots": {"type": "integer", "minimum": 0},
                    "max_queue": {"type": "integer", "minimum": 0},
                },
                ["admitted", "waiting", "running_slots", "max_queue"],
            ),
            "workers": {
                "type": "array",
                "items": _object(
                    {
                        "worker": {"type": "integer"},
                        "generations": {"type": "integer", "minimum": 0},
                        "state": {"enum": ["ready", "loading", "restarting"]},
                        "restart_in_s": {"type": "number", "minimum": 0},
                    },
                    ["worker", "generations", "state"],
                ),
            },
            "reason": {"type": "string", "description": "Why not ready (503 only)."},
        },
        ["status", "model", "generations", "precision", "admission", "workers"],
    ),
}

# The WebSocket protocol (chatserver/protocol/ws.py), for reference and for tests.
WS_ERROR_CODES = [
    # the frame itself
    "invalid_json",
    "invalid_frame",
    "unknown_type",
    "invalid_field",
    "invalid_parameter",
    "frame_too_large",
    "unsupported_frame",
    # the socket's queue and cancels
    "queue_full",
    "duplicate_id",
    "unknown_id",
    "nothing_to_cancel",
    "unauthorized",
    "reply_not_found",
    # the turn (api/errors.py maps these once, for HTTP too)
    "session_not_found",
    "context_length_exceeded",
    "rate_limited",
    "server_busy",
    "not_ready",
    "worker_unavailable",
    "worker_failed",
    "request_timeout",
    "session_store_unavailable",
    "generation_failed",
    "internal_error",
]
_WS_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}
SCHEMAS |= {
    "WsChatFrame": _object(
        {
            "type": {"const": "chat"},
            "content": {"type": "string", "minLength": 1},
            "id": {**_nullable(_WS_ID), "description": "Without it the server assigns m1, m2, …"},
            "session_id": _nullable(_WS_ID),
            "params": _nullable(_object(_params(WS_PARAMS), [])),
        },
        ["type", "content"],
        description="Queued (up to --ws-queue) and answered in order. Unknown fields are ignored.",
    )
    | {"additionalProperties": True},
    "WsCancelFrame": {
        "type": "object",
        "properties": {
            "type": {"const": "cancel"},
            "id": {
                **_nullable(_WS_ID),
                "description": "The message to cancel; without it, the running one.",
            },
        },
        "required": ["type"],
    },
    "WsAuthFrame": {
        "type": "object",
        "description": "First, on a server with API keys, when the upgrade carried none.",
        "properties": {
            "type": {"const": "auth"},
            "id": _nullable(_WS_ID),
            "api_key": {"type": "string", "minLength": 1},
        },
        "required": ["type", "api_key"],
    },
    "WsResumeFrame": {
        "type": "object",
        "description": "Reply `id` again from character `offset` on (a client that reconnected), "
        "then live to its end: token frames, then its done or error frame.",
        "properties": {
            "type": {"const": "resume"},
            "id": _WS_ID,
            "offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
            "session_id": _nullable(_WS_ID),
        },
        "required": ["type", "id"],
    },
    "WsClientFrame": {
        "description": "A text frame holding one JSON object; anything else gets an error frame.",
        "oneOf": [
            _ref("WsChatFrame"),
            _ref("WsCancelFrame"),
            _ref("WsResumeFrame"),
            _ref("WsAuthFrame"),
        ],
    },
    "WsServerFrame": {
        "oneOf": [
            _object(
                {"type": {"const": "session"}, "session_id": {"type": "string"}},
                ["type", "session_id"],
                description="A session was created or resumed.",
            ),
            _object(
                {
                    "type": {"const": "token"},
                    "id": _WS_ID,
                    "content": {"type": "string"},
                    "offset": {"type": "integer", "minimum": 0},
                },
                ["type", "id", "content"],
                description="Reply text as it is generated; `offset`: where `content` starts "
                "in the reply, in code points (what `resume` takes).",
            ),
            _object(
                {
                    "type": {"const": "live"},
                    "session_id": {"type": "string"},
                    "frame": {
                        "type": "object",
                        "properties": {
                            "type": {"enum": ["user", "token", "done", "error"]},
                            "id": _WS_ID,
                        },
                        "required": ["type", "id"],
                    },
                },
                ["type", "session_id", "frame"],
                description="A reply another socket on this socket's session produced (any "
                "server on the Redis): its user message, then its token, done or error frames.",
            ),
            _object(
                {
                    "type": {"const": "done"},
                    "id": _WS_ID,
                    "finish_reason": {"enum": FINISH_REASONS},
                    "usage": _ref("Usage"),
                    "stored": {"type": "boolean"},
                },
                ["type", "id", "finish_reason", "usage"],
            ),
            _object(
                {
                    "type": {"const": "error"},
                    "id": _WS_ID,
                    "code": {"enum": WS_ERROR_CODES},
                    "message": {"type": "string", "minLength": 1},
                    "retry_after": {"type": "integer", "minimum": 1},
                    "request_id": REQUEST_ID,
                },
                ["type", "code", "message", "request_id"],
                description="`id` names the message refused, when known; `retry_after` "
                "comes with codes to retry later. The socket stays open (but see close "
                "codes 4401 and 1009).",
            ),
        ]
    },
}

# --- responses ---------------------------------------------------------------

HEADERS = {
    "X-Request-Id": {
        "description": "The request's id: the client's X-Request-Id when sane, else a new one.",
        "required": True,
        "schema": REQUEST_ID,
    },
    "Retry-After": {
        "description": "Whole seconds until a retry could succeed.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "WWW-Authenticate": {"required": True, "schema": {"type": "string", "pattern": "^Bearer "}},
}


def _headers(*names: str) -> dict[str, Any]:
    """X-Request-Id (on every response) and the named headers (components.headers)."""
    return {name: {"$ref": f"#/components/headers/{name}"} for name in ("X-Request-Id", *names)}


def _json(
    schema: Schema, description: str, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "description": description,
        "headers": headers or _headers(),
        "content": {"application/json": {"schema": schema}},
    }


def _error(
    description: str, codes: list[str], *, openai: bool = False, headers: Any = None
) -> dict[str, Any]:
    """An error response whose body is Error (or OpenAIError) with one of ``codes``."""
    shape = "OpenAIError" if openai else "Error"
    narrowed = {"properties": {"error": {"properties": {"code": {"enum": codes}}}}}
    listed = ", ".join(f"`{code}`" for code in codes)
    return _json({"allOf": [_ref(shape), narrowed]}, f"{description} ({listed})", headers)


def _errors(statuses: dict[int, tuple[str, list[str]]], *, openai: bool = False) -> dict[str, Any]:
    """Error responses by status; 429 always carries Retry-After, 503 where a wait is known."""
    responses = {}
    for status, (description, codes) in statuses.items():
        headers = _headers("Retry-After") if status == 503 else _headers()
        if status == 429:
            headers["Retry-After"] = {**HEADERS["Retry-After"], "required": True}
        responses[str(status)] = _error(description, codes, openai=openai, headers=headers)
    return responses


INTERNAL = ("a bug (logged)", ["internal_error"])
BAD_BODY = ["invalid_json", "invalid_field", "invalid_parameter", "context_length_exceeded"]
BUSY = ["server_busy", "not_ready", "worker_unavailable", "worker_failed"]


def _generation_errors(openai: bool) -> dict[int, tuple[str, list[str]]]:
    """What a route that generates may answer: /v1/query, or (``openai``) a completion."""
    if openai:
        bad = BAD_BODY + ["unsupported_parameter"]
        not_found = ("unknown model", ["model_not_found"])
        unavailable = BUSY + ["interrupted"]  # OpenAI has no finish reason for it
    else:
        bad = BAD_BODY
        not_found = ("unknown session (or another key's)", ["session_not_found"])
        unavailable = BUSY + ["session_store_unavailable"]
    return {
        400: ("the body, a parameter or the prompt's length is wrong", bad),
        404: not_found,
        413: ("the body is over --max-body-bytes", ["body_too_large"]),
        415: ("the body is not sent as application/json", ["unsupported_media_type"]),
        429: ("over --rate-limit or --token-rate-limit", ["rate_limited"]),
        500: ("the model failed, or a bug", ["generation_failed", "internal_error"]),
        503: ("retry later: see Retry-After where given", unavailable),
        504: ("past --request-timeout", ["request_timeout"]),
    }


def _operation(
    summary: str,
    tag: str,
    responses: dict[str, Any],
    *,
    secured: bool,
    description: str = "",
    parameters: Sequence[dict[str, Any]] = (),
    request_body: dict[str, Any] | None = None,
    openai: bool = False,
    security: list[dict[str, list]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "tags": [tag]}
    if description:
        operation["description"] = description
    operation["parameters"] = [{"$ref": "#/components/parameters/X-Request-Id"}, *parameters]
    if request_body is not None:
        operation["requestBody"] = request_body
    responses = dict(responses)
    if secured:
        responses["401"] = _error(
            "a missing or wrong API key",
            ["unauthorized"],
            openai=openai,
            headers=_headers("WWW-Authenticate"),
        )
        operation["security"] = security or [{"bearerAuth": []}]
    else:
        operation["security"] = []
    responses.setdefault("500", _error(*INTERNAL, openai=openai))
    operation["responses"] = dict(sorted(responses.items()))
    return operation


def _json_body(name: str, **examples: Any) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": _ref(name)}
    if examples:
        media["examples"] = {key: {"value": value} for key, value in examples.items()}
    return {"required": True, "content": {"application/json": media}}


def _sse_event_schema(chunk: str) -> Schema:
    """One event of a streamed completion: a chunk, an error event, or ``[DONE]``."""
    payload = {"anyOf": [_ref(chunk), _ref("OpenAIError")]}
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
        ]
    }
    return {"type": "object", "properties": {"data": data}, "required": ["data"]}


def _paths(auth: bool, metrics_auth: bool, model: str) -> dict[str, Any]:
    static_ok = {"description": "The file", "headers": _headers()}
    file_answers = {
        "206": {"description": "Part of the file (Range)", "headers": _headers()},
        "304": {
            "description": "Unchanged (If-None-Match, If-Modified-Since)",
            "headers": _headers(),
        },
        "416": {"description": "Range not satisfiable", "headers": _headers()},
    }
    session_id = {
        "name": "session_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    store_down = (503, ("the session store cannot be reached", ["session_store_unavailable"]))
    return {
        "/healthz": {
            "get": _operation(
                "Liveness: answers while the event loop runs",
                "health",
                {"200": _json(_ref("Health"), "Alive")},
                secured=False,
            )
        },
        "/readyz": {
            "get": _operation(
                "Readiness: 200 once a worker has loaded the model and serves",
                "health",
                {
                    "200": _json(_ref("Readiness"), "Ready"),
                    "503": _json(_ref("Readiness"), "Not ready; `reason` says why"),
                },
                secured=False,
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (text format)",
                "health",
                {
                    "200": {
                        "description": "The app's registry",
                        "headers": _headers(),
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                secured=auth and metrics_auth,
                description="Needs a key only with --metrics-auth on a server with keys.",
            )
        },
        "/openapi.json": {
            "get": _operation(
                "This document",
                "reference",
                {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                secured=auth,
            )
        },
        "/v1/query": {
            "post": _operation(
                "One message, one reply, in a session",
                "chat",
                {
                    "200": _json(_ref("QueryResponse"), "The reply"),
                    **_errors(_generation_errors(openai=False)),
                },
                secured=auth,
                description="Without session_id a new session is created. A client that "
                "disconnects cancels its reply.",
                request_body=_json_body(
                    "QueryRequest",
                    new_session={"message": "What is the capital of France?", "max_tokens": 16},
                ),
            )
        },
        "/v1/sessions": {
            "get": _operation(
                "The caller's sessions, most recently used first",
                "sessions",
                {
                    "200": _json(_ref("SessionList"), "A page"),
                    **_errors(
                        {
                            400: (
                                "an unknown parameter, a bad limit or cursor",
                                ["invalid_parameter", "invalid_cursor"],
                            ),
                            403: ("the server has no API keys", ["auth_required"]),
                            store_down[0]: store_down[1],
                        }
                    ),
                },
                secured=auth,
                description="Unknown query parameters are refused.",
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
            )
        },
        "/v1/sessions/{session_id}": {
            "get": _operation(
                "A session's history",
                "sessions",
                {
                    "200": _json(_ref("Session"), "The history"),
                    **_errors(
                        {
                            404: ("unknown session (or another key's)", ["session_not_found"]),
                            store_down[0]: store_down[1],
                        }
                    ),
                },
                secured=auth,
                parameters=[session_id],
            ),
            "delete": _operation(
                "Delete a session",
                "sessions",
                {
                    "204": {"description": "Deleted", "headers": _headers()},
                    **_errors(
                        {
                            404: ("unknown session (or another key's)", ["session_not_found"]),
                            store_down[0]: store_down[1],
                        }
                    ),
                },
                secured=auth,
                parameters=[session_id],
            ),
        },
        "/v1/chat/completions": {
            "post": _completion_operation(
                "OpenAI chat completions (stateless)",
                _json_body(
                    "ChatCompletionRequest",
                    **_streamed_or_not(
                        {"model": model, "messages": [{"role": "user", "content": "Hi!"}]}
                    ),
                ),
                "ChatCompletion",
                "ChatCompletionChunk",
                auth,
                "The prompt is the messages through the chat template: one longer than "
                "the context is refused, never truncated.",
            )
        },
        "/v1/completions": {
            "post": _completion_operation(
                "OpenAI legacy text completions (stateless)",
                _json_body(
                    "CompletionRequest",
                    **_streamed_or_not({"model": model, "prompt": "Once upon a time"}),
                ),
                "TextCompletion",
                "TextCompletionChunk",
                auth,
                "The prompt is the text as it is, no chat template: one longer than the "
                "context is refused, never truncated.",
            )
        },
        "/v1/models": {
            "get": _operation(
                "OpenAI: the models served (one)",
                "openai",
                {"200": _json(_ref("ModelList"), "The list")},
                secured=auth,
                openai=True,
            )
        },
        "/v1/models/{model}": {
            "get": _operation(
                "OpenAI: one model",
                "openai",
                {
                    "200": _json(_ref("Model"), "The model"),
                    **_errors({404: ("unknown model", ["model_not_found"])}, openai=True),
                },
                secured=auth,
                openai=True,
                parameters=[
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "example": model,
                    }
                ],
            )
        },
        "/": {
            "get": _operation(
                "The web chat page",
                "page",
                {
                    "200": {**static_ok, "content": {"text/html": {"schema": {"type": "string"}}}},
                    **file_answers,
                },
                secured=False,
            )
        },
        "/static/{name}": {
            "get": _operation(
                "The page's scripts, styles and icon, by exact name",
                "page",
                {
                    "200": {
                        **static_ok,
                        "content": {
                            "text/javascript": {"schema": {"type": "string"}},
                            "text/css": {"schema": {"type": "string"}},
                            "image/svg+xml": {"schema": {"type": "string"}},
                        },
                    },
                    **file_answers,
                    **_errors({404: ("no such file", ["not_found"])}),
                },
                secured=False,
                parameters=[
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            )
        },
        "/ws": {"get": _websocket_operation(auth)},
    }


def _streamed_or_not(body: dict[str, Any]) -> dict[str, Any]:
    """Examples of a completion request: answered whole, and streamed with usage."""
    body = {**body, "max_tokens": 16}
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    return {"whole": body, "streamed": streamed}


def _completion_operation(
    summary: str,
    request_body: dict[str, Any],
    answer: str,
    chunk: str,
    auth: bool,
    description: str,
) -> dict[str, Any]:
    return _operation(
        summary,
        "openai",
        {
            "200": {
                "description": "The completion; with `stream: true`, server-sent events, each "
                "a chunk (an error event if the reply fails once streaming), then `[DONE]`; "
                "`: keep-alive` comments while waiting",
                "headers": _headers(),
                "content": {
                    "application/json": {"schema": _ref(answer)},
                    "text/event-stream": {"schema": _sse_event_schema(chunk)},
                },
            },
            **_errors(_generation_errors(openai=True), openai=True),
        },
        secured=auth,
        openai=True,
        description=description + " A client that disconnects cancels it.",
        request_body=request_body,
    )


def _websocket_operation(auth: bool) -> dict[str, Any]:
    handshake = [
        ("Upgrade", {"const": "websocket"}),
        ("Connection", {"const": "Upgrade"}),
        ("Sec-WebSocket-Version", {"const": "13"}),
        ("Sec-WebSocket-Key", {"type": "string", "pattern": "^[A-Za-z0-9+/]{21}[AQgw]==$"}),
    ]
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "header", "required": True, "schema": schema}
        for name, schema in handshake
    ]
    parameters.append(
        {
            "name": "session_id",
            "in": "query",
            "description": "Resume this session (a `session` frame, or a "
            "`session_not_found` error frame).",
            "schema": {"type": "string"},
        }
    )
    if auth:
        parameters.append(
            {
                "name": "Sec-WebSocket-Protocol",
                "in": "header",
                "description": "`chatserver, bearer.KEY`: the key for clients that cannot "
                "set headers; the server picks `chatserver`, so the key is not echoed.",
                "schema": {"type": "string"},
            }
        )
    responses: dict[str, Any] = {
        "101": {
            "description": "Upgraded. Client frames: WsClientFrame; server frames: "
            "WsServerFrame (components.schemas).",
            "headers": _headers(),
        },
        **_errors(
            {
                400: ("not a valid WebSocket upgrade", ["invalid_upgrade"]),
                403: ("an Origin not in --cors-origin", ["origin_not_allowed"]),
            }
        ),
    }
    description = (
        "Chat over a WebSocket: many messages a socket, answered in order; "
        "frames are JSON text. Bad frames get an error frame and the socket stays open; "
        "frames over 4 × --max-frame-bytes close it with 1009."
    )
    if auth:
        description += (
            " With API keys, an upgrade carrying a wrong key is refused with 401; one "
            "carrying none is accepted and must send a WsAuthFrame first (else error "
            "frames `unauthorized`, and close code 4401 for a wrong key or none within 5 s)."
        )
    return _operation(
        "WebSocket chat (GET that upgrades)",
        "websocket",
        responses,
        secured=auth,
        description=description,
        parameters=parameters,
        # The key is optional on the upgrade: it may come in the first frame instead.
        security=[{"bearerAuth": []}, {"apiKeyQuery": []}, {}],
    )


INFO_DESCRIPTION = """\
A chat server for real language models: WebSocket chat, an HTTP query endpoint
and an OpenAI-compatible API.

Errors are JSON with a stable `code` and a human `message` (`Error`); the
OpenAI routes (`/v1/chat/…`, `/v1/models…`) answer OpenAI's shape instead
(`OpenAIError`), so OpenAI clients raise their usual exceptions. Both carry the
request's id. Beside the statuses listed per operation, any path the server
has no route for answers 404 `not_found` (in OpenAI's shape under `/v1/`), and
a method a route does not take answers 405 `method_not_allowed` with `Allow`
(GET routes take HEAD too).
CORS preflights (OPTIONS with Access-Control-Request-Method) answer 204 for
the origins in --cors-origin and 403 `origin_not_allowed` for others.
"""


def build_document(
    *, auth: bool, metrics_auth: bool = False, model: str = DEFAULT_MODEL_NAME
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a server with (``auth``) or without API keys,
    serving ``model`` (the examples name it)."""
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "chatserver",
            "version": __version__,
            "description": INFO_DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "chat", "description": "The native chat API, with sessions"},
            {"name": "sessions"},
            {"name": "openai", "description": "OpenAI-compatible, stateless"},
            {"name": "websocket"},
            {"name": "health"},
            {"name": "page", "description": "The browser chat page"},
            {"name": "reference"},
        ],
        "paths": _paths(auth, metrics_auth, model),
        "components": {
            "schemas": SCHEMAS,
            "headers": HEADERS,
            "parameters": {
                "X-Request-Id": {
                    "name": "X-Request-Id",
                    "in": "header",
                    "description": "Your id for this request (1-64 of A-Z a-z 0-9 . _ : -).",
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "--api-key / --api-keys-file",
                },
                "apiKeyQuery": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "api_key",
                    "description": "/ws only (the access log redacts it)",
                },
            },
        },
    }
    return document


OPENAPI_BODY = web.AppKey("openapi_body", bytes)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_BODY], content_type="application/json")


async def _render(app: web.Application) -> None:
    """on_startup, after the cleanup contexts: the engine knows which model it serves."""
    document = build_document(
        auth=app[API_KEYS].required,
        metrics_auth=app[SETTINGS].metrics_auth,
        model=app[ENGINE].model_id,
    )
    app[OPENAPI_BODY] = json.dumps(document, ensure_ascii=False).encode()


def setup_routes(app: web.Application) -> None:
    """Serve the document of this app's configuration, rendered once at startup."""
    app.on_startup.append(_render)
    app.router.add_get(PATH, openapi_json)
