"""Structured output and logprobs on the OpenAI routes: parsing the request, shaping the reply.

``response_format`` becomes the grammar the worker holds the reply to
(workers/grammar.py): ``{"type": "json_object"}`` (any JSON object),
``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``, and
two extensions of ours, ``{"type": "regex", "regex": "..."}`` (the whole reply
matches the regular expression, Rust ``regex`` syntax) and ``{"type":
"grammar", "grammar": "..."}`` (a Lark grammar in llguidance's dialect, which
can embed a JSON schema with ``%json {...}``). ``strict: true`` refuses a schema
using keywords the grammar engine cannot enforce (400); otherwise such keywords
are ignored and the rest is enforced. JSON comes compact (no free whitespace),
as ``json.dumps(..., separators=(",", ":"))`` writes it.

``logprobs`` / ``top_logprobs`` (chat) and ``logprobs: k`` (text completions)
report, per generated token, its logprob under the distribution it was drawn
from (models/sampling.py) and the k most likely alternatives, in OpenAI's
shapes; values below -9999 (a token outside top-p's nucleus) are -9999.0, as
OpenAI reports them, since JSON has no -Infinity.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from chatserver.engine.errors import InvalidGrammar
from chatserver.errors import bad_request
from chatserver.protocol.sampling import MAX_TOP_LOGPROBS, RequestParams
from chatserver.protocol.worker import GrammarSpec

if TYPE_CHECKING:
    from chatserver.engine.engine import GenerationStream, InferenceEngine
    from chatserver.engine.logprobs import TokenLogprob

FORMATS = ("text", "json_object", "json_schema", "regex", "grammar")
MAX_GRAMMAR_CHARS = 100_000
FLOOR = -9999.0


def _field(fmt: dict[str, Any], name: str, kind: type, what: str, param: str) -> Any:
    value = fmt.get(name)
    if not isinstance(value, kind) or (isinstance(value, str) and not value):
        raise bad_request("invalid_parameter", f"'{param}' must be {what}", param)
    return value


def response_format_grammar(body: dict[str, Any]) -> GrammarSpec | None:
    """The grammar ``response_format`` asks for (None: free text); 400 naming the field."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    param = "response_format"
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in FORMATS:
        raise bad_request(
            "invalid_parameter",
            f"'response_format' must be an object whose 'type' is one of {', '.join(FORMATS)}",
            param,
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "regex":
        source = _field(fmt, "regex", str, "a non-empty string", "response_format.regex")
        return GrammarSpec("regex", _bounded(source, "response_format.regex"))
    if kind == "grammar":
        source = _field(fmt, "grammar", str, "a non-empty Lark grammar", "response_format.grammar")
        return GrammarSpec("lark", _bounded(source, "response_format.grammar"))
    spec = _field(fmt, "json_schema", dict, "an object", "response_format.json_schema")
    return json_schema_grammar(spec, "response_format.json_schema")


def json_schema_grammar(spec: dict[str, Any], param: str) -> GrammarSpec:
    """A json_schema format's grammar: ``spec`` holds ``name``, ``schema``, ``strict`` and
    ``description`` (chat nests them in ``response_format.json_schema``, the Responses API
    puts them in ``text.format``); 400 naming ``param``'s field."""

    def check(field: str, ok: bool, what: str) -> None:
        if not ok:
            raise bad_request(
                "invalid_parameter", f"'{param}.{field}' must be {what}", f"{param}.{field}"
            )

    name, description = spec.get("name"), spec.get("description")
    strict, schema = spec.get("strict"), spec.get("schema", {})
    check("name", isinstance(name, str) and 0 < len(name) <= 64, "a string of 1 to 64 characters")
    check("description", description is None or isinstance(description, str), "a string")
    check("strict", strict is None or isinstance(strict, bool), "a boolean")
    check("schema", isinstance(schema, dict), "a JSON schema object")
    # Not strict: keywords the engine cannot enforce are skipped, the rest holds.
    options = {"lenient": not strict, **schema.get("x-guidance", {})}
    text = json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)
    return GrammarSpec("json_schema", _bounded(text, f"{param}.schema"))


def _bounded(text: str, param: str) -> str:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise bad_request(
            "invalid_parameter", f"'{param}' is longer than {MAX_GRAMMAR_CHARS} characters", param
        )
    return text


def top_count(body: dict[str, Any], name: str) -> int:
    """An alternatives count (0..20) named ``name``: 400 ``invalid_parameter`` otherwise."""
    value = body.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise bad_request(
            "invalid_parameter",
            f"'{name}' must be an integer between 0 and {MAX_TOP_LOGPROBS}",
            name,
        )
    return value


def chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat's ``logprobs`` (bool) and ``top_logprobs`` (0..20, only with logprobs)."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request("invalid_parameter", "'logprobs' must be a boolean", "logprobs")
    if body.get("top_logprobs") is not None:
        top = top_count(body, "top_logprobs")
        if not wanted:
            raise bad_request(
                "invalid_parameter", "'top_logprobs' needs 'logprobs': true", "top_logprobs"
            )
        return top
    return 0 if wanted else None


def completion_logprobs(body: dict[str, Any]) -> int | None:
    """Text completions' ``logprobs``: the number of alternatives (0..20), or null."""
    if body.get("logprobs") is None:
        return None
    return top_count(body, "logprobs")


def with_chat_options(params: RequestParams, body: dict[str, Any]) -> RequestParams:
    """``params`` plus what ``response_format`` and ``logprobs`` ask of a chat completion."""
    return replace(params, grammar=response_format_grammar(body), logprobs=chat_logprobs(body))


def with_completion_options(params: RequestParams, body: dict[str, Any]) -> RequestParams:
    return replace(params, logprobs=completion_logprobs(body))


async def check_grammar(engine: InferenceEngine, params: RequestParams, param: str) -> None:
    """400 ``invalid_parameter`` naming ``param`` when the request's grammar does not compile."""
    if params.grammar is None:
        return
    try:
        await engine.check_grammar(params.grammar)
    except InvalidGrammar as exc:
        raise bad_request("invalid_parameter", f"'{param}': {exc}", param) from None


# --- the reply ---------------------------------------------------------------------


def _lp(value: float) -> float:
    return FLOOR if math.isnan(value) or value < FLOOR else value


def chat_entry(entry: TokenLogprob) -> dict[str, Any]:
    """One ``choices[].logprobs.content[]`` entry."""
    return {
        "token": entry.text,
        "logprob": _lp(entry.logprob),
        "bytes": list(entry.bytes),
        "top_logprobs": [
            {"token": t.text, "logprob": _lp(t.logprob), "bytes": list(t.bytes)} for t in entry.top
        ],
    }


def chat_logprobs_object(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [chat_entry(e) for e in entries], "refusal": None}


def completion_logprobs_object(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy shape: parallel lists, ``text_offset`` counting characters from ``offset``."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [_lp(e.logprob) for e in entries],
        "top_logprobs": [{t.text: _lp(t.logprob) for t in e.top} for e in entries],
        "text_offset": offsets,
    }


class LogprobCursor:
    """Hands each streamed chunk the entries delivered since the previous one.

    The engine adds a token's entry when it delivers its text, so a chunk built
    after a delta carries that delta's tokens (a token whose text is held back,
    an incomplete character or a possible stop string, comes with the next).
    """

    def __init__(self, stream: GenerationStream, text: bool) -> None:
        self.stream = stream
        self.text = text
        self.sent = 0
        self.chars = 0

    def attach(self, body: dict[str, Any]) -> dict[str, Any]:
        entries = self.stream.logprobs
        if entries is None or not body.get("choices"):
            return body
        new = entries[self.sent :]
        self.sent = len(entries)
        if self.text:
            obj = completion_logprobs_object(new, self.chars)
            self.chars += sum(len(e.text) for e in new)
        else:
            obj = chat_logprobs_object(new)
        body["choices"][0]["logprobs"] = obj
        return body


def attach_logprobs(choice: dict[str, Any], stream: GenerationStream, text: bool) -> dict[str, Any]:
    """A whole choice's logprobs (``stream`` generated it), when the request asked for them."""
    if stream.logprobs is not None:
        entries = stream.logprobs
        obj = completion_logprobs_object(entries) if text else chat_logprobs_object(entries)
        choice["logprobs"] = obj
    return choice
