"""Validate client-supplied sampling parameters, the same way for every API."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chatserver.errors import bad_request
from chatserver.protocol.worker import GrammarSpec

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
# OpenAI's bounds: a penalty of 2 already all but bans a token; a bias of +-100
# bans or forces one outright. Entries are bounded so a request's cost in the
# worker is too.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300
# OpenAI's bound on top_logprobs.
MAX_TOP_LOGPROBS = 20
# The names parse_request_params reads (besides a ``max_tokens_key`` of its own):
# the endpoints that refuse unknown parameters accept exactly these.
PARAM_NAMES = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "ignore_eos",
    }
)


@dataclass(frozen=True, slots=True)
class RequestParams:
    """Sampling settings as a client asked for them; None means the model's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs, ids ascending; checked against the vocabulary by
    # the API that knows it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's extension: generate until max_tokens (or a stop string), past the
    # model's end-of-sequence token. For benchmarks and tests of long replies.
    ignore_eos: bool = False
    # Constrained decoding (response_format, forced tool calls): set by the API
    # that builds it, never read from the client's raw parameters.
    grammar: GrammarSpec | None = None
    # None: no logprobs; 0: the sampled token's; k (<= MAX_TOP_LOGPROBS): and the k
    # most likely. Set by the API from its own parameter names.
    logprobs: int | None = None


def _number(raw: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request("invalid_parameter", f"'{name}' must be a number", name)
    if not lo <= value <= hi:
        raise bad_request("invalid_parameter", f"'{name}' must be between {lo} and {hi}", name)
    return float(value)


def _integer(raw: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one kind of number: 4.0 is the integer 4
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request("invalid_parameter", f"'{name}' must be an integer", name)
    if not lo <= value <= hi:
        raise bad_request("invalid_parameter", f"'{name}' must be between {lo} and {hi}", name)
    return value


def _logit_bias(raw: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """``{"<token id>": bias}`` (JSON keys are strings; OpenAI's form) as sorted pairs."""
    value = raw.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad_request(
            "invalid_parameter", "'logit_bias' must map token ids to numbers", "logit_bias"
        )
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise bad_request(
            "invalid_parameter",
            f"'logit_bias' takes at most {MAX_LOGIT_BIAS_ENTRIES} entries",
            "logit_bias",
        )
    pairs = []
    for key, bias in value.items():
        # One spelling per id ("7", not "07"), so no id appears twice.
        if not (
            isinstance(key, str)
            and key.isascii()
            and key.isdigit()
            and len(key) <= 9
            and str(int(key)) == key
        ):
            raise bad_request(
                "invalid_parameter",
                f"'logit_bias' keys must be token ids (decimal strings), not {key!r}",
                "logit_bias",
            )
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise bad_request(
                "invalid_parameter", f"'logit_bias' values must be numbers ({key!r})", "logit_bias"
            )
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise bad_request(
                "invalid_parameter",
                f"'logit_bias' values must be between {-MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS} "
                f"({key!r}: {bias})",
                "logit_bias",
            )
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def parse_request_params(
    raw: Mapping[str, Any], max_tokens_key: str = "max_tokens"
) -> RequestParams:
    """Check types and ranges; raise ApiError(400, invalid_parameter) naming the field."""
    stop = raw.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad_request(
            "invalid_parameter", "'stop' must be a string or a list of strings", "stop"
        )
    if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
        raise bad_request(
            "invalid_parameter",
            f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings of at most "
            f"{MAX_STOP_LENGTH} characters",
            "stop",
        )
    return RequestParams(
        max_tokens=_integer(raw, max_tokens_key, 1, 1 << 20),
        temperature=_number(raw, "temperature", 0.0, 2.0),
        top_p=_number(raw, "top_p", 0.0, 1.0),
        top_k=_integer(raw, "top_k", 0, 1 << 20),
        seed=_integer(raw, "seed", -(1 << 63), (1 << 63) - 1),
        stop=stops,
        presence_penalty=_number(raw, "presence_penalty", -MAX_PENALTY, MAX_PENALTY) or 0.0,
        frequency_penalty=_number(raw, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY) or 0.0,
        logit_bias=_logit_bias(raw),
        ignore_eos=_flag(raw, "ignore_eos"),
    )


def _flag(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request("invalid_parameter", f"'{name}' must be true or false", name)
    return value
