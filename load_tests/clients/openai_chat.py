"""The OpenAI-compatible API: streaming ``POST /v1/chat/completions`` read as SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp

from load_tests.clients.base import TEMPERATURE, StreamTimer, error_kind, http_error_kind
from load_tests.stats import RequestResult


class StreamCut(aiohttp.ClientPayloadError):
    """An SSE stream ended without ``data: [DONE]`` (counted as ``disconnected``)."""


async def sse_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON chunks of a streamed OpenAI response, up to ``data: [DONE]``.

    Raises StreamCut when the stream ends before it.
    """
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        yield json.loads(payload)
    raise StreamCut("stream ended before [DONE]")


async def served_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model ``GET /v1/models`` lists, or ``"default"`` if it lists none."""
    try:
        async with session.get(base_url + "/v1/models", timeout=aiohttp.ClientTimeout(30)) as r:
            data = await r.json(content_type=None)
        return str(data["data"][0]["id"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError):
        return "default"


class OpenAIClient:
    mode = "openai"
    streamed = True

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, timeout: float, model: str
    ) -> None:
        self.session = session
        self.url = base_url + "/v1/chat/completions"
        self.timeout = timeout
        self.model = model

    async def request(self, prompt: str, max_tokens: int, request_id: str) -> RequestResult:
        timer = StreamTimer()
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": TEMPERATURE,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        usage: dict | None = None
        finish_reason: str | None = None
        try:
            async with asyncio.timeout(self.timeout), self.session.post(self.url, json=body) as r:
                if r.status != 200:
                    return timer.failed(http_error_kind(r.status, await r.read()))
                async for chunk in sse_chunks(r):
                    if "error" in chunk:
                        err = chunk["error"]
                        return timer.failed(str(err.get("code") or "stream_error"))
                    for choice in chunk.get("choices") or ():
                        timer.content((choice.get("delta") or {}).get("content"))
                        finish_reason = choice.get("finish_reason") or finish_reason
                    usage = chunk.get("usage") or usage
                return timer.done(usage, finish_reason)
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            return timer.failed(error_kind(e))
