"""What every client shares: the interface, the timing recorder, error classification."""

from __future__ import annotations

import json
import time
from typing import Protocol

import aiohttp

from load_tests.stats import RequestResult

# A chat request is one of these; the runner needs nothing else from a client.
TEMPERATURE = 0.0


class Client(Protocol):
    """Sends one chat request to a fresh session and reports what it measured."""

    mode: str
    streamed: bool

    async def request(self, prompt: str, max_tokens: int, request_id: str) -> RequestResult: ...


class StreamTimer:
    """Records content-frame arrival times of one request and builds its RequestResult.

    The clock starts when the request starts (connection included); TTFT is the first
    non-empty content frame/chunk, ITL the gaps between consecutive ones.
    """

    def __init__(self, streamed: bool = True) -> None:
        self.streamed = streamed
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.itl: list[float] = []
        self.frames = 0

    def content(self, text: str | None) -> None:
        if not text:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.itl.append(now - self.last)  # type: ignore[operator]
        self.last = now
        self.frames += 1

    def done(
        self, usage: dict | None, finish_reason: str | None, ttft_is_latency: bool = False
    ) -> RequestResult:
        latency = time.perf_counter() - self.start
        usage = usage or {}
        ttft = latency if ttft_is_latency else None
        if self.first is not None:
            ttft = self.first - self.start
        return RequestResult(
            ok=True,
            start=self.start,
            latency=latency,
            ttft=ttft,
            itl=self.itl,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            # The server's count; frames are a fallback only if it sent no usage.
            completion_tokens=int(usage.get("completion_tokens") or self.frames),
            finish_reason=finish_reason,
            streamed=self.streamed,
        )

    def failed(self, error: str) -> RequestResult:
        return RequestResult(
            ok=False,
            start=self.start,
            latency=time.perf_counter() - self.start,
            ttft=None if self.first is None else self.first - self.start,
            error=error,
            streamed=self.streamed,
        )


def error_kind(exc: BaseException) -> str:
    """A short stable name for a transport failure, used to count errors by kind."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"http_{exc.status}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"http_{exc.status}"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError | OSError):
        return "connect_error"
    if isinstance(exc, json.JSONDecodeError | KeyError | TypeError | ValueError):
        return "bad_response"
    if isinstance(exc, aiohttp.ClientError):
        return "client_error"
    return type(exc).__name__


def http_error_kind(status: int, body: bytes) -> str:
    """The server's stable error ``code`` when the body carries one, else ``http_<status>``."""
    try:
        err = json.loads(body).get("error")
        code = err.get("code") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        code = None
    return str(code) if code else f"http_{status}"
