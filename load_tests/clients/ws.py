"""The WebSocket chat API (``GET /ws``): one fresh connection, so one fresh session, a request."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from load_tests.clients.base import TEMPERATURE, StreamTimer, error_kind
from load_tests.stats import RequestResult


class WebSocketClient:
    mode = "ws"
    streamed = True

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self.session = session
        self.url = base_url + "/ws"
        self.timeout = timeout

    async def request(self, prompt: str, max_tokens: int, request_id: str) -> RequestResult:
        timer = StreamTimer()
        chat = {
            "type": "chat",
            "content": prompt,
            "id": request_id,
            "params": {"max_tokens": max_tokens, "temperature": TEMPERATURE},
        }
        try:
            async with (
                asyncio.timeout(self.timeout),
                self.session.ws_connect(self.url, autoping=True) as ws,
            ):
                await ws.send_str(json.dumps(chat))
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    frame = json.loads(msg.data)
                    kind = frame.get("type")
                    if frame.get("id") not in (None, request_id):
                        continue
                    if kind == "token":
                        timer.content(frame.get("content"))
                    elif kind == "done":
                        return timer.done(frame.get("usage"), frame.get("finish_reason"))
                    elif kind == "error":
                        return timer.failed(str(frame.get("code") or "ws_error"))
                # closed by the server before "done": say how, for the error count
                return timer.failed(
                    f"ws_closed_{ws.close_code}" if ws.close_code else "disconnected"
                )
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            return timer.failed(error_kind(e))
