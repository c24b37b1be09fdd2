"""The HTTP query API (``POST /v1/query``): not streaming, so TTFT is the whole latency."""

from __future__ import annotations

import asyncio

import aiohttp

from load_tests.clients.base import TEMPERATURE, StreamTimer, error_kind, http_error_kind
from load_tests.stats import RequestResult


class QueryClient:
    mode = "query"
    streamed = False

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self.session = session
        self.url = base_url + "/v1/query"
        self.timeout = timeout

    async def request(self, prompt: str, max_tokens: int, request_id: str) -> RequestResult:
        timer = StreamTimer(streamed=False)
        body = {"message": prompt, "max_tokens": max_tokens, "temperature": TEMPERATURE}
        try:
            async with asyncio.timeout(self.timeout), self.session.post(self.url, json=body) as r:
                raw = await r.read()
                if r.status != 200:
                    return timer.failed(http_error_kind(r.status, raw))
                data = await r.json(content_type=None)
                return timer.done(data["usage"], data.get("finish_reason"), ttft_is_latency=True)
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            return timer.failed(error_kind(e))
