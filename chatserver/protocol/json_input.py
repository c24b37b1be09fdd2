"""Strict JSON for everything clients send: valid JSON that would crash a handler is refused.

`json.loads` accepts two things our handlers cannot survive: nesting deep
enough to raise RecursionError (`"[" * 50000` gave a 500, and closed a
WebSocket), and lone UTF-16 surrogates (`"\\ud800"`), which are not text: they
failed later, when echoed in a frame (the socket stopped answering) or handed
to the tokenizer (a 500). Both are refused here, at the edge, as bad JSON.
"""

from __future__ import annotations

import json
from typing import Any


class JsonInputError(ValueError):
    """Why the text is not JSON we accept: a predicate, "the request body <it>"."""


def loads_strict(text: str | bytes) -> Any:
    try:
        value = json.loads(text)
    except RecursionError:
        raise JsonInputError("is nested too deeply") from None
    except ValueError:
        raise JsonInputError("is not valid JSON") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise JsonInputError(
            "holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text"
        ) from None
    except RecursionError:
        raise JsonInputError("is nested too deeply") from None
    return value
