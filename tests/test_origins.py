"""chatserver.api.origins and access_log: browsers and logs, against a real server.

Foreign web pages cannot drive the server (415 for non-JSON bodies, 403 for a
foreign Origin on /ws, CORS only for --cors-origin), and session ids never
reach the access log.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from chatserver.api.access_log import redact
from tests.serverproc import ServerProcess

ALLOWED = "https://chat.example.com"
FOREIGN = "https://evil.example.net"


@pytest.fixture(scope="module")
def browser_server() -> Iterator[ServerProcess]:
    proc = ServerProcess(
        "--cors-origin", ALLOWED + "/", "--log-level", "info", "--skip-quality-gate"
    ).wait_ready()
    yield proc
    proc.stop()


def ws_url(server: ServerProcess, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/ws" + query


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_json_endpoints_take_json_only(
    server: ServerProcess, content_type: str | None
) -> None:
    """text/plain is what a foreign page can POST without a preflight: refused."""
    body = json.dumps({"message": "hi", "max_tokens": 2})
    headers = {"Content-Type": content_type} if content_type else {}
    async with aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as http:
        for path in ("/v1/query", "/v1/chat/completions"):
            async with http.post(server.url + path, data=body.encode(), headers=headers) as r:
                assert r.status == 415
                assert (await r.json())["error"]["code"] == "unsupported_media_type"


async def test_websocket_origin(browser_server: ServerProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(ws_url(browser_server), origin=FOREIGN):
            pass
    assert refused.value.response.status_code == 403
    for origin in (ALLOWED, browser_server.url, None):  # listed, same-origin, no browser
        async with websockets.connect(ws_url(browser_server), origin=origin) as ws:
            await ws.send(json.dumps({"type": "cancel"}))
            assert json.loads(await ws.recv())["type"] in ("error", "done")


async def test_cors_only_for_listed_origins(browser_server: ServerProcess) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with aiohttp.ClientSession() as http:
        async with http.options(
            browser_server.url + "/v1/query", headers={"Origin": ALLOWED, **preflight}
        ) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
            assert "content-type" in r.headers["Access-Control-Allow-Headers"].lower()
        async with http.options(
            browser_server.url + "/v1/query", headers={"Origin": FOREIGN, **preflight}
        ) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with http.get(browser_server.url + "/healthz", headers={"Origin": ALLOWED}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
        async with http.get(browser_server.url + "/healthz", headers={"Origin": FOREIGN}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_access_log_has_no_session_ids(browser_server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(browser_server.url + "/v1/sessions/secret-session-1") as r:
            assert r.status == 404
        async with http.delete(browser_server.url + "/v1/sessions/secret-session-2?x=1") as r:
            assert r.status == 404
    # A refused upgrade is logged like any response (aiohttp logged no line for
    # the accepted WebSockets here), query string included.
    with pytest.raises(InvalidStatus):
        async with websockets.connect(
            ws_url(browser_server, "?session_id=secret-session-3"), origin=FOREIGN
        ):
            pass
    await _wait_for_log(browser_server, "/ws?session_id=")
    log = browser_server.log()
    assert "secret-session" not in log
    assert "/v1/sessions/<redacted>" in log and "session_id=<redacted>" in log


async def _wait_for_log(server: ServerProcess, needle: str, within: float = 5.0) -> None:
    """Access lines are written after the response; poll the log file for one."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if needle in server.log():
            return
        await asyncio.sleep(0.1)


def test_redact() -> None:
    line = '127.0.0.1 "GET /ws?session_id=abc&x=1 HTTP/1.1" 101 "GET /v1/sessions/abc/x"'
    assert redact(line) == (
        '127.0.0.1 "GET /ws?session_id=<redacted>&x=1 HTTP/1.1" 101 "GET /v1/sessions/<redacted>/x"'
    )
    assert (
        redact('"GET /ws?x=1&api_key=k-1.2 HTTP/1.1"')
        == '"GET /ws?x=1&api_key=<redacted> HTTP/1.1"'
    )
