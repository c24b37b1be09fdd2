"""One error type and one body shape for every client-facing failure.

HTTP answers ``{"error": {"code": ..., "message": ...}}`` (plus OpenAI's
``type``/``param`` on the OpenAI routes); WebSocket sends an error frame with
the same ``code`` and ``message``. ``code`` strings are stable API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ApiError(Exception):
    """A request failed in a way the client should be told about."""

    status: int
    code: str
    message: str
    param: str | None = None
    # Seconds until a retry could succeed (429 rate_limited, 503 server_busy): the
    # Retry-After header on HTTP, "retry_after" in a WebSocket error frame.
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def body(self) -> dict:
        error: dict = {"code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def bad_request(code: str, message: str, param: str | None = None) -> ApiError:
    return ApiError(400, code, message, param)


def retry_after_seconds(retry_after: float) -> int:
    """Whole seconds for a Retry-After header or frame: rounded up, at least 1."""
    return max(1, math.ceil(retry_after))
