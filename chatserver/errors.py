"""One error type and one body shape for every client-facing failure.

HTTP answers ``{"error": {"code": ..., "message": ...}}`` (plus OpenAI's
``type``/``param`` on the OpenAI routes); WebSocket sends an error frame with
the same ``code`` and ``message``. ``code`` strings are stable API.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ApiError(Exception):
    """A request failed in a way the client should be told about."""

    status: int
    code: str
    message: str
    param: str | None = None
    # Seconds after which a retry may succeed: the Retry-After header, and the
    # WebSocket error frame's retry_after.
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
