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
from chatserver.api.openai.protocol import MAX_N, ROLES, UNSUPPORTED_CHAT, UNSUPPORTED_COMPLETION
from chatserver.api.responses.protocol import (
    INCLUDABLE,
    MAX_ITEM_ID,
    MAX_ITEMS_LIMIT,
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
)
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
_NOTHING_ASKED: list[Any] = [[], "none", False, "", ["text"], {"type": "text"}]


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
        "model's reply. Default: `auto` with tools, else `none`; anything but `none` "
        "without `tools` is 400 invalid_field.",
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

# best_of left out or null, or equal to n (n left out or null being 1).
BEST_OF_IS_N: list[Schema] = [
    {"properties": {"best_of": {"type": "null"}}},
    {"properties": {"n": {"type": "null"}, "best_of": {"const": 1}}},
    *(
        {"properties": {"n": {"const": k}, "best_of": {"const": k}}, "required": ["n"]}
        for k in range(1, MAX_N + 1)
    ),
]
CHOICE_INDEX = {"type": "integer", "minimum": 0, "maximum": MAX_N - 1}

_STREAMING: dict[str, Schema] = {
    "n": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": MAX_N,
        "description": "Choices to generate, each a separate generation of the one prompt "
        "(with seed, choice i samples with seed + i); usage counts the prompt once and the "
        "completions of all. More than the server runs or queues at once is a 400.",
    },
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
            "role": {"enum": ["user", "assistant", "tool"]},
            "content": {"type": "string"},
            "cancelled": {"const": True, "description": "A reply cut short by its client."},
            "interrupted": {"const": True, "description": "A reply cut short by a shutdown."},
            "tool_calls": {
                "type": "array",
                "description": "An assistant message's calls (/ws tools).",
                "items": _object(
                    {
                        "id": {"type": "string"},
                        "name": _FUNCTION_NAME,
                        "arguments": {"type": "string", "description": "JSON text."},
                    },
                    ["id", "name", "arguments"],
                ),
            },
            "tools": {
                "type": "array",
                "items": {"type": "object"},
                "description": "With tool_calls: the tools the reply chose from.",
            },
            "parallel_tool_calls": {"type": "boolean"},
            "tool_call_id": {"type": "string", "description": "A tool result's call."},
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
            "best_of": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": MAX_N,
                "description": "Must equal n (1 when n is left out): generating more "
                "candidates than are returned is not supported (unsupported_parameter).",
            },
            "logprobs": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": 20,
                "description": "Return each token's logprob and this many alternatives.",
            },
        },
        "required": ["model", "prompt"],
        "anyOf": BEST_OF_IS_N,
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
                "maxItems": MAX_N,
                "items": _object(
                    {
                        "index": CHOICE_INDEX,
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
                        "index": CHOICE_INDEX,
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
                "maxItems": MAX_N,
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
            "index": CHOICE_INDEX,
            "text": {"type": "string"},
            "logprobs": TEXT_LOGPROBS,
            "finish_reason": {"enum": ["stop", "length", None]},
        },
        ["index", "text", "logprobs", "finish_reason"],
        description="finish_reason is null on every streamed chunk but each choice's last.",
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
    "unknown_tool_call",
    "missing_tool_results",
    # the turn (api/errors.py maps these once, for HTTP too)
    "session_not_found",
    "tool_calls_abandoned",
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
            **{name: _nullable(schema) for name, schema in TOOL_PARAMS.items()},
        },
        ["type", "content"],
        description="Queued (up to --ws-queue) and answered in order. Unknown fields are ignored.",
    )
    | {"additionalProperties": True},
    "WsToolResultsFrame": {
        "type": "object",
        "description": "The results of every pending tool call of a reply (one left out: "
        "`missing_tool_results`); queues the continuation, a new reply with id `id` (or "
        "m1, m2, …) on the history with the calls and their results.",
        "properties": {
            "type": {"const": "tool_results"},
            "results": {
                "type": "array",
                "minItems": 1,
                "maxItems": 128,
                "items": {
                    "type": "object",
                    "properties": {
                        "tool_call_id": _WS_ID,
                        "content": {"type": "string"},
                    },
                    "required": ["tool_call_id", "content"],
                },
            },
            "id": _nullable(_WS_ID),
            "session_id": _nullable(_WS_ID),
        },
        "required": ["type", "results"],
    },
    "WsToolResultFrame": {
        "type": "object",
        "description": "The result of one pending tool call; the one that answers a reply's "
        "last call queues the continuation, a new reply with id `id` (or m1, m2, …).",
        "properties": {
            "type": {"const": "tool_result"},
            "tool_call_id": _WS_ID,
            "content": {"type": "string"},
            "id": _nullable(_WS_ID),
            "session_id": _nullable(_WS_ID),
        },
        "required": ["type", "tool_call_id", "content"],
    },
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
            _ref("WsToolResultsFrame"),
            _ref("WsToolResultFrame"),
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
                            "type": {
                                "enum": [
                                    "user",
                                    "tool_results",
                                    "token",
                                    "tool_calls",
                                    "done",
                                    "error",
                                ]
                            },
                            "id": _WS_ID,
                        },
                        "required": ["type", "id"],
                    },
                },
                ["type", "session_id", "frame"],
                description="A reply another socket on this socket's session produced (any "
                "server on the Redis): its user message (or the tool results it continues "
                "from), then its token, tool_calls, done or error frames.",
            ),
            _object(
                {
                    "type": {"const": "tool_calls"},
                    "id": _WS_ID,
                    "calls": {
                        "type": "array",
                        "minItems": 1,
                        "items": _object(
                            {
                                "id": {"type": "string", "minLength": 1},
                                "name": _FUNCTION_NAME,
                                "arguments": {
                                    "type": "string",
                                    "description": "JSON text (an object).",
                                },
                            },
                            ["id", "name", "arguments"],
                        ),
                    },
                },
                ["type", "id", "calls"],
                description="The reply's tool calls (never sent as token text), before its "
                "done frame (finish_reason tool_calls); answer them with tool_results.",
            ),
            _object(
                {
                    "type": {"const": "done"},
                    "id": _WS_ID,
                    "finish_reason": {"enum": [*FINISH_REASONS, "tool_calls"]},
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

# --- the Responses API (api/responses) ----------------------------------------------

# A message's (or a tool output's) text: a string, or text parts (fields beside
# ``type`` and ``text`` are ignored).
_RESPONSE_TEXT: Schema = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "type": {"enum": ["input_text", "output_text"]},
                    "text": {"type": "string"},
                },
                "required": ["type", "text"],
            },
        },
    ]
}
_ITEM_ID: Schema = {
    "description": "Kept as the item's id in GET .../input_items when a string of 1 to "
    f"{MAX_ITEM_ID} characters not used by an earlier item of the input; else one is made.",
}
_RESPONSE_TOOL: Schema = {
    "type": "object",
    "properties": {
        "type": {"const": "function"},
        "name": _FUNCTION_NAME,
        "description": {"type": ["string", "null"]},
        "parameters": {
            "type": ["object", "null"],
            "properties": {"type": {"const": "object"}},
            "description": "The arguments' JSON schema (of type object).",
        },
        "strict": {"type": ["boolean", "null"]},
    },
    "required": ["type", "name"],
    "description": "Only function tools; their names are unique within the request.",
}
# Parameters not honoured (api/responses/protocol.UNSUPPORTED): the values that ask
# for nothing, any other is 400 unsupported_parameter.
_RESPONSES_UNSUPPORTED: dict[str, Schema] = {
    "reasoning": {"type": ["object", "null"], "additionalProperties": {"type": "null"}},
    "conversation": {"type": "null"},
    "prompt": {"type": "null"},
    "context_management": {
        "anyOf": [
            {"type": "array", "maxItems": 0},
            {"type": "object", "maxProperties": 0},
            {"type": "null"},
        ]
    },
    "generate": {"enum": [True, None]},
    "moderation": {"type": "null"},
    "image": {"type": "null"},
    "service_tier": {"enum": ["auto", "default", None]},
    "prompt_cache_retention": {"enum": ["in_memory", None]},
}
_RESPONSE_STATUSES = ["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
_RESPONSE_LOGPROB = _object(
    {
        **_LOGPROB_TOKEN,
        "top_logprobs": {
            "type": "array",
            "maxItems": 20,
            "items": _object(_LOGPROB_TOKEN, ["token", "logprob", "bytes"]),
        },
    },
    ["token", "logprob", "bytes", "top_logprobs"],
)

SCHEMAS |= {
    "ResponseInputItem": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "type": {"const": "message"},
                    "role": {"enum": list(ROLES)},
                    "content": _RESPONSE_TEXT,
                    "id": _ITEM_ID,
                },
                "required": ["role", "content"],
                "description": "A message (`type` may be left out).",
            },
            {
                "type": "object",
                "properties": {
                    "type": {"const": "function_call"},
                    "call_id": {"type": "string"},
                    "name": {"type": "string"},
                    "arguments": {"type": "string", "description": "JSON text."},
                    "id": _ITEM_ID,
                },
                "required": ["type", "call_id", "name", "arguments"],
            },
            {
                "type": "object",
                "properties": {
                    "type": {"const": "function_call_output"},
                    "call_id": {"type": "string"},
                    "output": _RESPONSE_TEXT,
                    "id": _ITEM_ID,
                },
                "required": ["type", "call_id", "output"],
            },
        ],
        "description": "Text only; fields beside these are ignored.",
    },
    "ResponseCreateRequest": {
        "type": "object",
        "description": "Fields OpenAI does not define are ignored. Refused with 400 besides "
        "what the schema says: `tool_choice` other than `none`/`auto` without `tools`, a "
        "forced `tool_choice` with a `text.format` schema, logprobs (`include` or "
        "`top_logprobs`) when the model may call tools, `background` with `stream` or with "
        "`store: false`, a `text.format` schema that does not compile, and a "
        "`previous_response_id` this deployment does not have "
        "(`previous_response_not_found`).",
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input": {
                "anyOf": [
                    {"type": "string", "minLength": 1, "description": "One user message."},
                    {"type": "array", "minItems": 1, "items": _ref("ResponseInputItem")},
                ]
            },
            "instructions": {
                "type": ["string", "null"],
                "description": "A system message before the conversation (not carried over "
                "by `previous_response_id`).",
            },
            "previous_response_id": {
                "type": ["string", "null"],
                "description": "Continue that response's conversation (from the session "
                "store: memory, or Redis shared by every instance).",
            },
            "max_output_tokens": SAMPLING["max_tokens"],
            **{
                name: SAMPLING[name]
                for name in ("temperature", "top_p", "seed", "top_k", "stop", "ignore_eos")
            },
            "stream": {
                "type": ["boolean", "null"],
                "description": "Server-sent events: `response.created` … "
                "`response.output_text.delta` … `response.completed`.",
            },
            "store": {
                "type": ["boolean", "null"],
                "description": "Keep the response for GET, input_items and chaining "
                "(default true).",
            },
            "background": {
                "type": ["boolean", "null"],
                "description": "Answer at once (`queued`); poll GET /v1/responses/{id}.",
            },
            "stream_options": {"type": ["object", "null"]},
            "metadata": {
                "type": ["object", "null"],
                "maxProperties": MAX_METADATA_PAIRS,
                "propertyNames": {"maxLength": MAX_METADATA_KEY},
                "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE},
            },
            "text": {
                "type": ["object", "null"],
                "properties": {
                    "format": {
                        "anyOf": [
                            {
                                "type": "object",
                                "properties": {"type": {"enum": ["text", "json_object"]}},
                                "required": ["type"],
                            },
                            {
                                "type": "object",
                                "properties": {
                                    "type": {"const": "json_schema"},
                                    "name": {"type": "string", "minLength": 1, "maxLength": 64},
                                    "description": {"type": ["string", "null"]},
                                    "schema": {"type": "object", "description": "A JSON schema."},
                                    "strict": {"type": ["boolean", "null"]},
                                },
                                "required": ["type", "name", "schema"],
                            },
                            {"type": "null"},
                        ],
                        "description": "Constrained decoding, as chat's `response_format`.",
                    },
                    "verbosity": {"enum": ["medium", None]},
                },
            },
            "truncation": {
                "enum": ["auto", "disabled", None],
                "description": "`auto` drops the oldest turns of a conversation that outgrew "
                "the context; `disabled` (the default) refuses it.",
            },
            "tools": {"type": ["array", "null"], "maxItems": 128, "items": _RESPONSE_TOOL},
            "tool_choice": {
                "anyOf": [
                    {"enum": ["none", "auto", "required"]},
                    _object(
                        {"type": {"const": "function"}, "name": _FUNCTION_NAME},
                        ["type", "name"],
                        additionalProperties=True,
                    ),
                    {"type": "null"},
                ],
                "description": TOOL_PARAMS["tool_choice"]["description"],
            },
            "parallel_tool_calls": {"type": ["boolean", "null"]},
            "include": {
                "type": ["array", "null"],
                "items": {"enum": list(INCLUDABLE)},
                "description": "`message.output_text.logprobs`: each output_text part's "
                "tokens' logprobs (in the part and in each `response.output_text.delta`).",
            },
            "top_logprobs": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": 20,
                "description": "Alternatives per token; above 0 asks for logprobs without "
                "`include`.",
            },
            "user": {"type": ["string", "null"]},
            **_RESPONSES_UNSUPPORTED,
        },
        "required": ["model", "input"],
    },
    "Response": {
        "type": "object",
        "description": "OpenAI's `response` object (the `openai` package's `Response`).",
        "properties": {
            "id": {"type": "string", "pattern": "^resp_"},
            "object": {"const": "response"},
            "created_at": {"type": "integer"},
            "status": {"enum": _RESPONSE_STATUSES},
            "model": {"type": "string"},
            "output": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "type": {"enum": ["message", "function_call"]},
                        "content": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "type": {"const": "output_text"},
                                    "text": {"type": "string"},
                                    "logprobs": {"type": "array", "items": _RESPONSE_LOGPROB},
                                },
                                "required": ["type", "text", "logprobs"],
                            },
                        },
                    },
                    "required": ["id", "type"],
                },
            },
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            "usage": {"type": ["object", "null"]},
            "error": {"type": ["object", "null"]},
        },
        "required": ["id", "object", "created_at", "status", "model", "output"],
    },
    "ResponseStreamEvent": {
        "type": "object",
        "properties": {
            "type": {"type": "string", "minLength": 1},
            "sequence_number": {"type": "integer", "minimum": 0},
        },
        "required": ["type", "sequence_number"],
        "description": "`response.created`, `response.in_progress`, output item, content "
        "part, `response.output_text.delta` (with its tokens' `logprobs`) and "
        "function-call events, then `response.completed` (or `.incomplete`, `.failed`); "
        "`error` when a started stream fails.",
    },
    "ResponseDeleted": _object(
        {
            "id": {"type": "string"},
            "object": {"const": "response.deleted"},
            "deleted": {"const": True},
        },
        ["id", "object", "deleted"],
    ),
    "ResponseInputItemList": _object(
        {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "maxItems": MAX_ITEMS_LIMIT,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "minLength": 1},
                        "type": {"enum": ["message", "function_call", "function_call_output"]},
                        "status": {"const": "completed"},
                    },
                    "required": ["id", "type", "status"],
                },
            },
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        },
        ["object", "data", "first_id", "last_id", "has_more"],
        description="The response's own input items (not those of the responses it "
        "continues), messages with their text as one `input_text` (`output_text` for the "
        "assistant) part.",
    ),
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


_RESPONSE_ID = {
    "name": "response_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}


def _response_errors(
    more: dict[int, tuple[str, list[str]]] | None = None,
) -> dict[str, Any]:
    """What the routes of one stored response answer besides 200."""
    return _errors(
        {
            404: ("no such response (or another key's)", ["not_found"]),
            503: ("the session store cannot be reached", ["session_store_unavailable"]),
            **(more or {}),
        },
        openai=True,
    )


def _sse_response_event() -> Schema:
    """One event of a streamed response: its ``event:`` type and its JSON ``data``."""
    payload = {"anyOf": [_ref("ResponseStreamEvent"), _ref("OpenAIError")]}
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    return {
        "type": "object",
        "properties": {"event": {"type": "string"}, "data": data},
        "required": ["data"],
    }


def _responses_websocket_operation(auth: bool) -> dict[str, Any]:
    """GET /v1/responses upgraded: the Responses API's WebSocket mode."""
    handshake = [
        ("Upgrade", {"const": "websocket"}),
        ("Connection", {"const": "Upgrade"}),
        ("Sec-WebSocket-Version", {"const": "13"}),
        ("Sec-WebSocket-Key", {"type": "string", "pattern": "^[A-Za-z0-9+/]{21}[AQgw]==$"}),
    ]
    return _operation(
        "OpenAI Responses API, WebSocket mode (GET that upgrades)",
        "openai",
        {
            "101": {
                "description": "Upgraded. The client sends `response.create` frames (a "
                "ResponseCreateRequest with `type` and an optional `stream_id`; `stream` "
                "implied, no `background`) and gets the same events as the SSE stream, "
                "each with its request's `stream_id`; a request that cannot start gets an "
                "`error` event and the socket goes on. Closing the socket cancels its "
                "running responses.",
                "headers": _headers(),
            },
            **_errors(
                {
                    400: ("not a valid WebSocket upgrade", ["invalid_upgrade"]),
                    403: ("an Origin not in --cors-origin", ["origin_not_allowed"]),
                },
                openai=True,
            ),
        },
        secured=auth,
        openai=True,
        parameters=[
            {"name": name, "in": "header", "required": True, "schema": schema}
            for name, schema in handshake
        ],
    )


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
        "/v1/responses": {
            "post": _operation(
                "OpenAI Responses API: create a response",
                "openai",
                {
                    "200": {
                        "description": "The response (`queued` with `background`); with "
                        "`stream: true`, server-sent events (`event:` its type, `data:` "
                        "the event); `: keep-alive` comments while waiting",
                        "headers": _headers(),
                        "content": {
                            "application/json": {"schema": _ref("Response")},
                            "text/event-stream": {"schema": _sse_response_event()},
                        },
                    },
                    **_errors(
                        {
                            **_generation_errors(openai=True),
                            400: (
                                "the body, a parameter or the prompt's length is wrong, or "
                                "no such previous response",
                                [
                                    *BAD_BODY,
                                    "unsupported_parameter",
                                    "previous_response_not_found",
                                ],
                            ),
                            503: (
                                "retry later: see Retry-After where given",
                                [*BUSY, "interrupted", "session_store_unavailable"],
                            ),
                        },
                        openai=True,
                    ),
                },
                secured=auth,
                openai=True,
                description="Stored (`store`, the default) in the session store, so any "
                "instance on the same Redis retrieves and continues it. A client that "
                "disconnects cancels it (not a `background` one).",
                request_body=_json_body(
                    "ResponseCreateRequest",
                    whole={"model": model, "input": "Say hi.", "max_output_tokens": 16},
                    streamed={
                        "model": model,
                        "input": [{"role": "user", "content": "Say hi."}],
                        "instructions": "Be brief.",
                        "max_output_tokens": 16,
                        "stream": True,
                        "include": list(INCLUDABLE),
                        "top_logprobs": 2,
                    },
                ),
            ),
            "get": _responses_websocket_operation(auth),
        },
        "/v1/responses/{response_id}": {
            "get": _operation(
                "OpenAI Responses API: a stored response (`in_progress` while it runs here)",
                "openai",
                {"200": _json(_ref("Response"), "The response"), **_response_errors()},
                secured=auth,
                openai=True,
                parameters=[_RESPONSE_ID],
            ),
            "delete": _operation(
                "OpenAI Responses API: delete a stored response",
                "openai",
                {"200": _json(_ref("ResponseDeleted"), "Deleted"), **_response_errors()},
                secured=auth,
                openai=True,
                parameters=[_RESPONSE_ID],
            ),
        },
        "/v1/responses/{response_id}/cancel": {
            "post": _operation(
                "OpenAI Responses API: stop a response generating (a finished one is "
                "answered as it is)",
                "openai",
                {
                    "200": _json(_ref("Response"), "The response as it ended"),
                    **_response_errors(
                        {409: ("running on another instance", ["response_not_cancellable"])}
                    ),
                },
                secured=auth,
                openai=True,
                parameters=[_RESPONSE_ID],
            )
        },
        "/v1/responses/{response_id}/input_items": {
            "get": _operation(
                "OpenAI Responses API: the input items a response was created with",
                "openai",
                {
                    "200": _json(_ref("ResponseInputItemList"), "A page of them"),
                    **_response_errors(
                        {
                            400: (
                                "a bad limit, order or include, or an `after` that names "
                                "no item of the response",
                                ["invalid_parameter", "unsupported_parameter"],
                            )
                        }
                    ),
                },
                secured=auth,
                openai=True,
                description="Newest first unless `order=asc`; `after` is an item id from "
                "an earlier page. Other query parameters are ignored.",
                parameters=[
                    _RESPONSE_ID,
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ITEMS_LIMIT},
                    },
                    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "include",
                        "in": "query",
                        "description": "Also read as `include[]`, as the `openai` client "
                        "sends it; nothing more is listed either way.",
                        "schema": {"type": "array", "items": {"enum": list(INCLUDABLE)}},
                    },
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
