"""Tool calling in the prompt and in the reply: Hermes-style markup, pure functions.

SmolLM2's chat template knows no tools (it renders a role and a content, nothing
else), so tools travel in the prompt as text, in the format of Hermes 2 Pro and
Qwen2.5 that most open models were tuned on and most servers parse:

- the tools' JSON schemas are listed in the system prompt, inside ``<tools>``;
- the assistant calls one with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (one block a call; several blocks are parallel calls);
- a tool's result comes back in a user turn as ``<tool_response>...</tool_response>``
  (consecutive results share one turn).

This module turns OpenAI-shaped messages with ``tool_calls`` and ``tool`` roles
into plain role/content messages in that format (models/prompt.py renders them
through the template, every content as plain text), builds the grammar that
*guarantees* a call for ``tool_choice: "required"`` or a named function (each
call's ``name`` one of the tools' and its ``arguments`` valid for that tool's
schema, via llguidance's lark dialect embedding JSON schemas), and parses the
model's reply back into calls, whole or streamed. The non-streamed parse runs
the streaming parser over the whole text, so both give the same calls by
construction.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatserver.errors import bad_request
from chatserver.protocol.worker import GrammarSpec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

SYSTEM_TOOLS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True, slots=True)
class Tool:
    """One function the model may call; ``parameters`` is its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool = False

    def definition(self) -> dict[str, Any]:
        """The tool in OpenAI's request shape, as the system prompt lists it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``mode``: "none", "auto", "required" or "function" (then ``name`` is the function)."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        """Whether the reply must be tool calls (a grammar guarantees it)."""
        return self.mode in ("required", "function")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made; ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A turn's tools as its request chose them: what the prompt lists, how the
    reply is split. For transports that keep no OpenAI request object (/ws)."""

    tools: tuple[Tool, ...] = ()
    choice: ToolChoice = ToolChoice("none")
    parallel: bool = True

    @property
    def prompt_tools(self) -> tuple[Tool, ...]:
        """The tools the prompt lists: none when the model may not call any."""
        return () if self.choice.mode == "none" else self.tools

    def parser(self) -> ToolCallParser | None:
        """What splits the reply into content and calls; None when no tool may be called."""
        if not self.prompt_tools:
            return None
        return ToolCallParser(self.tools, None if self.parallel else 1, self.choice.forced)


def parse_tool_use(body: dict[str, Any]) -> ToolUse:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a request, checked."""
    tools = parse_tools(body)
    return ToolUse(tools, parse_tool_choice(body, tools), parse_parallel(body))


def new_call_id() -> str:
    """An id in OpenAI's shape (``call_`` and 24 characters)."""
    return f"call_{uuid.uuid4().hex[:24]}"


# --- the request: OpenAI's shape, checked (the OpenAI routes and /ws share it) ----

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


# --- the prompt ---------------------------------------------------------------


def system_prompt(tools: Sequence[Tool]) -> str:
    """The tools' section of the system prompt."""
    listed = "\n".join(json.dumps(t.definition(), ensure_ascii=False) for t in tools)
    return SYSTEM_TOOLS.format(tools=listed)


def _call_text(name: str, arguments: str) -> str:
    """One call as the model writes it; arguments that are not JSON stay a string."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def text_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[Tool] = ()
) -> list[dict[str, str]]:
    """Messages as plain role/content text for a template without tools.

    ``messages`` are role/content dicts, an assistant one possibly with
    ``tool_calls`` (``[{"id", "name", "arguments"}]``), a ``tool`` one with
    ``tool_call_id``. ``tools`` (listed in the system prompt) are appended to the
    first system message, or make one. Plain messages come back unchanged.
    """
    out: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            response = f"{RESPONSE_OPEN}\n{content}\n{RESPONSE_CLOSE}"
            if out and out[-1].get("tool_response"):
                out[-1]["content"] += "\n" + response
            else:
                # Marked so truncation (prompt.drop_point) never starts a
                # conversation at a tool's result.
                out.append({"role": "user", "content": response, "tool_response": "1"})
            continue
        calls = message.get("tool_calls") or ()
        if calls:
            texts = [content] if content else []
            texts += [_call_text(c["name"], c["arguments"]) for c in calls]
            content = "\n".join(texts)
        out.append({"role": role, "content": content})
    if tools:
        section = system_prompt(tools)
        if out and out[0]["role"] == "system":
            head = out[0]["content"]
            out[0] = {"role": "system", "content": f"{head}\n\n{section}" if head else section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


# --- the grammar for forced calls -----------------------------------------------


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else")


def declared_only(schema: Any) -> Any:
    """A copy of a JSON schema whose objects take only the properties they declare.

    An object schema that says nothing of ``additionalProperties`` gets false (as
    xgrammar's strict mode, which vLLM uses for tool calls, does): a function
    takes the arguments it declares, and a small model left free invents
    arguments until max_tokens. Schemas that say otherwise are kept as they are.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: declared_only(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [declared_only(v) for v in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = declared_only(out[key])
        elif key == "items" and isinstance(out.get(key), list):
            out[key] = [declared_only(v) for v in out[key]]
    is_object = out.get("type") == "object" or isinstance(out.get("properties"), dict)
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _call_schema(tool: Tool) -> dict[str, Any]:
    """The JSON schema of one call's object: this tool's name, arguments valid for it
    (and taking only the arguments it declares, see declared_only).

    The arguments' ``$defs`` (pydantic puts nested models there) move to the root,
    where their ``#/$defs/...`` references point. The JSON is in json.dumps's
    form (``", "`` and ``": "``), as calls in the history and the system prompt's
    example are written: no free whitespace (a small model loops on blank lines
    until max_tokens), and the form the model sees is the form it continues best.
    """
    arguments = declared_only(tool.parameters or {"type": "object", "properties": {}})
    root: dict[str, Any] = {
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    }
    for key in ("$defs", "definitions"):
        if key in arguments:
            root[key] = arguments.pop(key)
    root.update(
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
    )
    return root


def call_grammar(
    tools: Sequence[Tool], choice: ToolChoice, parallel: bool = True
) -> GrammarSpec | None:
    """The constraint for a forced choice, or None when the model chooses.

    ``required``: one call (one or more when ``parallel``) to any of the tools;
    a named function: calls to that one only. Each call is the Hermes block
    around a JSON object that llguidance's ``%json`` holds to the tool's schema.
    """
    if not choice.forced:
        return None
    chosen = [t for t in tools if choice.mode == "required" or t.name == choice.name]
    if not chosen:
        raise ValueError(f"no tool named {choice.name!r}")
    open_, close = json.dumps(CALL_OPEN + "\n"), json.dumps("\n" + CALL_CLOSE)
    rules = [
        f"call_{i}: {open_} %json {json.dumps(_call_schema(t), ensure_ascii=False)} {close}"
        for i, t in enumerate(chosen)
    ]
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    call = "call: " + " | ".join(f"call_{i}" for i in range(len(chosen)))
    return GrammarSpec("lark", "\n".join([start, call, *rules]) + "\n")


# --- the reply -------------------------------------------------------------------


def _parse_calls(block: str, names: frozenset[str]) -> list[ToolCall] | None:
    """A ``<tool_call>`` block's calls, or None when it is not calls of ours.

    A block holds one call object, or a list of them (SmolLM2's own training
    format, ``<tool_call>[{...}, ...]</tool_call>``).
    """
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    found = [_call(o, names) for o in (obj if isinstance(obj, list) else [obj])]
    if not found or None in found:
        return None
    return [c for c in found if c is not None]


def _call(obj: Any, names: frozenset[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that starts ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Splits a reply, as it streams, into content and tool calls.

    ``feed`` takes text as it comes and returns what can be told apart so far:
    strings (content) and ToolCall objects. Text that may be the start of a
    ``<tool_call>`` (and whitespace, which may precede one) is held back until
    the next text decides it. A block becomes a call once closed and parsed;
    one that is not valid JSON or names no tool is content after all, as is an
    unclosed block at the end. Whitespace around calls is dropped. After
    ``max_calls`` calls (1 without parallel tool calls) further blocks are dropped.

    ``forced``: the reply was held to call_grammar, so it is calls and nothing
    else; an unclosed block at the end is a call cut short (max_tokens), dropped.
    """

    def __init__(
        self, tools: Sequence[Tool], max_calls: int | None = None, forced: bool = False
    ) -> None:
        self.names = frozenset(t.name for t in tools)
        self.max_calls = max_calls
        self.forced = forced
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._in_call = False
        self._after_call = False  # whitespace right after a call is dropped

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buf += text
        out: list[str | ToolCall] = []
        while True:
            if self._in_call:
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    return out
                block, self._buf = self._buf[:end], self._buf[end + len(CALL_CLOSE) :]
                self._in_call = False
                calls = _parse_calls(block, self.names)
                if calls is None:
                    self._content(out, CALL_OPEN + block + CALL_CLOSE)
                    continue
                for call in calls:
                    if self.max_calls is None or len(self.calls) < self.max_calls:
                        self.calls.append(call)
                        out.append(call)
                self._after_call = True
                continue
            if self._after_call:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return out
                self._after_call = False
            start = self._buf.find(CALL_OPEN)
            if start >= 0:
                self._content(out, self._buf[:start].rstrip())
                self._buf = self._buf[start + len(CALL_OPEN) :]
                self._in_call = True
                continue
            held = _partial_suffix(self._buf, CALL_OPEN)
            body = self._buf[: len(self._buf) - held]
            kept = body.rstrip()
            self._content(out, kept)
            self._buf = self._buf[len(kept) :]
            return out

    def close(self) -> list[str | ToolCall]:
        """The end of the reply: what was held back is content."""
        out: list[str | ToolCall] = []
        rest = (CALL_OPEN if self._in_call else "") + self._buf
        self._buf, self._in_call = "", False
        if self.forced:
            return out
        if not self._after_call:
            self._content(out, rest)
        elif rest.strip():
            self._content(out, rest.lstrip())
        return out

    def whole(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole reply's content (None when there is none) and its calls."""
        parts = self.feed(text) + self.close()
        return "".join(p for p in parts if isinstance(p, str)) or None, self.calls

    @staticmethod
    def _content(out: list[str | ToolCall], text: str) -> None:
        if text:
            out.append(text)


def parse_reply(
    text: str, tools: Sequence[Tool], max_calls: int | None = None, forced: bool = False
) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's content (None when there is none) and its tool calls."""
    return ToolCallParser(tools, max_calls, forced).whole(text)
