"""OpenAI's tool calling on the wire: ``tools``, ``tool_choice``, history messages, deltas.

Request checking (400 naming the bad field, as OpenAI does) and the shapes of
tool calls in messages and in streamed ``delta.tool_calls``; the prompt format,
the grammar of forced calls and the parsing of the reply are models/tools.py's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from chatserver.errors import bad_request
from chatserver.models.tools import Tool, ToolCall, ToolChoice

# OpenAI's rules for function names and its cap on tools a request.
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128


def _function_name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise bad_request(
            "invalid_field",
            "a function name must be 1 to 64 letters, digits, underscores or dashes",
            param,
        )
    return value


def parse_tools(body: dict[str, Any]) -> tuple[Tool, ...]:
    """``tools``: ``[{"type": "function", "function": {name, description?, parameters?,
    strict?}}]``; a malformed one is a 400 naming it."""
    raw = body.get("tools")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise bad_request("invalid_field", "'tools' must be a list", "tools")
    if len(raw) > MAX_TOOLS:
        raise bad_request("invalid_field", f"'tools' takes at most {MAX_TOOLS} tools", "tools")
    tools: list[Tool] = []
    for i, entry in enumerate(raw):
        param = f"tools[{i}]"
        if not isinstance(entry, dict) or entry.get("type") != "function":
            raise bad_request("invalid_field", "a tool must be {'type': 'function', ...}", param)
        function = entry.get("function")
        if not isinstance(function, dict):
            raise bad_request("invalid_field", "'function' must be an object", f"{param}.function")
        name = _function_name(function.get("name"), f"{param}.function.name")
        if any(t.name == name for t in tools):
            raise bad_request(
                "invalid_field", f"two tools are named {name!r}", f"{param}.function.name"
            )
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request(
                "invalid_field", "'description' must be a string", f"{param}.function.description"
            )
        parameters = function.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type", "object") != "object"
        ):
            raise bad_request(
                "invalid_field",
                "'parameters' must be a JSON schema of type 'object'",
                f"{param}.function.parameters",
            )
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request(
                "invalid_field", "'strict' must be a boolean", f"{param}.function.strict"
            )
        tools.append(Tool(name, description or "", parameters, bool(strict)))
    return tuple(tools)


def parse_tool_choice(body: dict[str, Any], tools: Sequence[Tool]) -> ToolChoice:
    """``tool_choice``: "none", "auto", "required" or ``{"type": "function", "function":
    {"name": ...}}``; the default is "auto" with tools, "none" without."""
    raw = body.get("tool_choice")
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if raw in ("none", "auto"):
        return ToolChoice(raw)
    if raw == "required":
        choice = ToolChoice("required")
    elif (
        isinstance(raw, dict)
        and raw.get("type") == "function"
        and isinstance(raw.get("function"), dict)
    ):
        name = _function_name(raw["function"].get("name"), "tool_choice")
        choice = ToolChoice("function", name)
    else:
        raise bad_request(
            "invalid_field",
            "'tool_choice' must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if not tools:
        raise bad_request(
            "invalid_field", "'tool_choice' needs 'tools' to choose from", "tool_choice"
        )
    if choice.name is not None and all(t.name != choice.name for t in tools):
        raise bad_request(
            "invalid_field",
            f"'tool_choice' names {choice.name!r}, which is not in 'tools'",
            "tool_choice",
        )
    return choice


def parse_parallel(body: dict[str, Any]) -> bool:
    """``parallel_tool_calls`` (default true): whether a reply may make several calls."""
    value = body.get("parallel_tool_calls")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise bad_request(
            "invalid_field", "'parallel_tool_calls' must be a boolean", "parallel_tool_calls"
        )
    return value


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
