"""Validate client-supplied sampling parameters, the same way for every API."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chatserver.errors import bad_request

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64


@dataclass(frozen=True, slots=True)
class RequestParams:
    """Sampling settings as a client asked for them; None means the model's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request("invalid_parameter", f"'{name}' must be an integer", name)
    if not lo <= value <= hi:
        raise bad_request("invalid_parameter", f"'{name}' must be between {lo} and {hi}", name)
    return value


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
    )
