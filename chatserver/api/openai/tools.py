"""OpenAI's tool calling on the wire: ``tools``, ``tool_choice``, history messages, deltas.

The shapes of tool calls in messages and in streamed ``delta.tool_calls``;
checking ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (400 naming the
bad field, as OpenAI does), the prompt format, the grammar of forced calls and
the parsing of the reply are models/tools.py's, shared with /ws.
"""

from __future__ import annotations

import json
from typing import Any

from chatserver.errors import bad_request
from chatserver.models.tools import ToolCall, parse_parallel, parse_tool_choice, parse_tools

# The request's checks live with the tools (models/tools.py), shared with /ws.
__all__ = [
    "history_tool_calls",
    "parse_parallel",
    "parse_tool_choice",
    "parse_tools",
    "tool_call_deltas",
    "tool_call_object",
]


def history_tool_calls(raw: Any, param: str) -> list[dict[str, str]]:
    """An assistant message's ``tool_calls`` as ``[{"id", "name", "arguments"}]``."""
    if not isinstance(raw, list):
        raise bad_request("invalid_field", "'tool_calls' must be a list", param)
    calls = []
    for j, call in enumerate(raw):
        where = f"{param}[{j}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise bad_request("invalid_field", "a tool call must be of type 'function'", where)
        function = call.get("function")
        if not isinstance(function, dict):
            raise bad_request("invalid_field", "'function' must be an object", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(
                "invalid_field", "'name' must be a non-empty string", f"{where}.function.name"
            )
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise bad_request(
                "invalid_field",
                "'arguments' must be a string (JSON text)",
                f"{where}.function.arguments",
            )
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise bad_request("invalid_field", "'id' must be a string", f"{where}.id")
        calls.append({"id": call_id or "", "name": name, "arguments": arguments})
    return calls


def tool_call_object(call: ToolCall) -> dict[str, Any]:
    """A call in a ``chat.completion`` message."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def tool_call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """A call as streamed deltas, in OpenAI's shape: the first names it (id, type,
    name, empty arguments), the next carries its arguments."""
    return [
        {
            "tool_calls": [
                {
                    "index": index,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]},
    ]
