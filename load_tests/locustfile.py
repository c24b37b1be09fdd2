"""Locust users for chatserver, for those who prefer Locust's UI and distributed runs.

    pip install -e '.[locust]'
    locust -f load_tests/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 16 -r 4 -t 2m

``ChatWebSocketUser`` chats over ``/ws`` (one fresh connection, so one fresh session, per
chat); ``ChatHttpUser`` alternates ``POST /v1/query`` and streaming
``POST /v1/chat/completions``. Besides the whole request, each streaming chat reports a
``ttft`` entry, so Locust's table shows time to first token next to the total. Settings
come from the environment: ``CHATSERVER_LOAD_MAX_TOKENS`` (default 64) and
``CHATSERVER_LOAD_ALLOW_REMOTE=1`` to let a non-loopback ``--host`` through (the same
loopback-only guard as ``python -m load_tests``).

Only this file imports locust (and ``websockets`` for the WebSocket user), so the rest of
``load_tests`` works without them.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time

from locust import HttpUser, User, between, task
from locust.exception import StopUser

from load_tests.guard import RemoteURLRefused, check_url
from load_tests.prompts import BUILTIN_PROMPTS, prompt_for

MAX_TOKENS = int(os.environ.get("CHATSERVER_LOAD_MAX_TOKENS", "64"))
ALLOW_REMOTE = os.environ.get("CHATSERVER_LOAD_ALLOW_REMOTE") == "1"
_request_numbers = itertools.count()


def _next_prompt() -> tuple[str, str]:
    i = next(_request_numbers)
    return prompt_for(BUILTIN_PROMPTS, i), f"locust-{os.getpid()}-{i}"


def _report(
    user: User, kind: str, name: str, start: float, length: int, exc: Exception | None
) -> None:
    """Tell Locust about a measurement it cannot time itself (a stream, a first token)."""
    user.environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=(time.perf_counter() - start) * 1000.0,
        response_length=length,
        exception=exc,
        context={},
    )


def _checked_host(user: User) -> str:
    try:
        return check_url(user.host or "", allow_remote=ALLOW_REMOTE)
    except (RemoteURLRefused, ValueError) as e:
        logging.error("%s (set CHATSERVER_LOAD_ALLOW_REMOTE=1 to override)", e)
        user.environment.process_exit_code = 2
        if user.environment.runner is not None:
            user.environment.runner.quit()
        raise StopUser() from e


class ChatWebSocketUser(User):
    """A person chatting over the WebSocket API, one new conversation per message."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        base = _checked_host(self)
        self.ws_url = "ws" + base[len("http") :] + "/ws"

    @task
    def chat(self) -> None:
        from websockets.sync.client import connect

        prompt, request_id = _next_prompt()
        start = time.perf_counter()
        length, first = 0, True
        try:
            with connect(self.ws_url, open_timeout=30, close_timeout=5) as ws:
                ws.send(
                    json.dumps(
                        {
                            "type": "chat",
                            "content": prompt,
                            "id": request_id,
                            "params": {"max_tokens": MAX_TOKENS, "temperature": 0},
                        }
                    )
                )
                while True:
                    frame = json.loads(ws.recv(timeout=300))
                    kind = frame.get("type")
                    if kind == "token":
                        if first:
                            _report(self, "WS", "/ws ttft", start, 0, None)
                            first = False
                        length += len(frame.get("content") or "")
                    elif kind == "done":
                        break
                    elif kind == "error":
                        raise RuntimeError(f"{frame.get('code')}: {frame.get('message')}")
        except Exception as e:  # noqa: BLE001 - reported to Locust as a failure
            _report(self, "WS", "/ws chat", start, length, e)
            return
        _report(self, "WS", "/ws chat", start, length, None)


class ChatHttpUser(HttpUser):
    """A client of the HTTP APIs: non-streaming query and streaming OpenAI chat."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        _checked_host(self)
        self.model = "default"
        with self.client.get("/v1/models", catch_response=True) as r:
            try:
                self.model = r.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                r.failure("no model listed")

    @task
    def query(self) -> None:
        prompt, _ = _next_prompt()
        body = {"message": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        with self.client.post("/v1/query", json=body, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

    @task
    def openai_stream(self) -> None:
        """Locust times the response headers; the whole stream and TTFT are reported apart."""
        prompt, _ = _next_prompt()
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        name = "/v1/chat/completions"
        start = time.perf_counter()
        length, first = 0, True
        error: Exception | None = None
        with self.client.post(
            name, json=body, stream=True, catch_response=True, name=f"{name} headers"
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                for line in r.iter_lines():
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise RuntimeError(f"stream error: {chunk['error']}")
                    choices = chunk.get("choices") or [{}]
                    delta = (choices[0].get("delta") or {}).get("content")
                    if delta:
                        if first:
                            _report(self, "POST", f"{name} ttft", start, 0, None)
                            first = False
                        length += len(delta)
                else:
                    raise RuntimeError("stream ended without [DONE]")
            except Exception as e:  # noqa: BLE001 - reported to Locust as a failure
                error = e
                r.failure(str(e))
        _report(self, "POST", f"{name} stream", start, length, error)
