"""chatserver.api.auth: API keys and session ownership, against real servers.

One server with keys and the in-process store; two servers with the same keys
sharing one real Redis (ownership must hold across instances); and the shared
keyless server of conftest for what a server without keys answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI

from chatserver.api.auth import (
    ApiKeysError,
    KeyRing,
    fingerprint,
    is_public,
    key_owner,
    parse_keys_file,
)
from chatserver.config import Settings
from tests.serverproc import ServerProcess

KEY_A = "alice-0b9f1c2d3e4f5a6b7c8d"  # named "alice" in the keys file
KEY_B = "bob-9a8b7c6d5e4f3a2b1c0d"  # given with --api-key
KEY_C = "carol-1234567890abcdef"  # added to the keys file later (SIGHUP)
WRONG = "mallory-00000000000000"
FLAGS = ("--skip-quality-gate", "--max-batch", "4", "--default-max-tokens", "4")
TIMEOUT = aiohttp.ClientTimeout(total=120)

PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/SmolLM2-135M-Instruct"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/query"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/0123456789abcdef0123456789abcdef"),
    ("DELETE", "/v1/sessions/0123456789abcdef0123456789abcdef"),
    ("GET", "/no/such/route"),
]
OPENAI_PATHS = ("/v1/chat/", "/v1/models")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def write_keys(path: Path, *lines: str) -> None:
    path.write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    write_keys(path, "# clients", "alice:" + KEY_A, "")
    return path


@pytest.fixture(scope="module")
def keyed(keys_file: Path) -> Iterator[ServerProcess]:
    """Keys from the file (alice) and the flag (B); in-process sessions; access log on."""
    proc = ServerProcess(
        *FLAGS,
        "--api-keys-file",
        str(keys_file),
        "--api-key",
        KEY_B,
        "--log-level",
        "info",
    ).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def redis_pair(redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers with the same keys (A and B, from the env var) on one Redis."""
    env = {"CHATSERVER_API_KEY": f"{KEY_A},{KEY_B}"}
    flags = (*FLAGS, "--redis-url", redis_url, "--log-level", "warning")
    first, second = ServerProcess(*flags, env=env), ServerProcess(*flags, env=env)
    try:
        first.wait_ready()
        second.wait_ready()
        yield first, second
    finally:
        first.stop()
        second.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, key: str | None = None, **kwargs: Any
) -> tuple[int, Any, Any]:
    headers = {**kwargs.pop("headers", {}), **(bearer(key) if key else {})}
    async with http.request(method, url, headers=headers, **kwargs) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, body, r.headers


async def query(http: aiohttp.ClientSession, url: str, key: str, **body: Any) -> dict[str, Any]:
    status, answer, _ = await call(
        http, "POST", url + "/v1/query", key, json={"max_tokens": 2, "temperature": 0, **body}
    )
    assert status == 200, answer
    return answer


# --- settings and the key ring (no server) ------------------------------------------


def test_api_key_flag_repeats_and_env_takes_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv("CHATSERVER_API_KEY", "k1, k2,")
    assert Settings.from_env().api_key == ["k1", "k2"]
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    ns = parser.parse_args(["--api-key", "x", "--api-key", "y"])
    assert Settings.from_namespace(ns).api_key == ["x", "y"]  # flags replace the env's
    monkeypatch.delenv("CHATSERVER_API_KEY")
    assert Settings.from_env().api_key == []
    assert not KeyRing(Settings.from_env().api_key).required


def test_keys_file_names_and_lookup(tmp_path: Path) -> None:
    assert parse_keys_file("# c\n\n  ops: k1 \nk2\n", "f") == [
        ("ops", "k1"),
        ("key-" + __import__("hashlib").sha256(b"k2").hexdigest()[:8], "k2"),
    ]
    with pytest.raises(ApiKeysError):
        parse_keys_file("name:has space\n", "f")
    path = tmp_path / "keys"
    write_keys(path, "ops:k1")
    ring = KeyRing(["k3"], str(path))
    assert ring.lookup("k1") is not None and ring.lookup("k1").name == "ops"
    assert ring.lookup("k1").owner == key_owner("k1") != "k1"
    assert ring.lookup("k3") is not None
    assert ring.lookup("k") is None and ring.lookup("k1 ") is None
    write_keys(path, "bad key")
    assert not ring.reload()  # a broken file keeps the keys in use
    assert ring.lookup("k1") is not None
    path.write_text("")
    assert ring.reload() and ring.lookup("k1") is None
    assert KeyRing([], str(path)).required  # an empty file still requires keys


def test_public_routes() -> None:
    assert is_public("/", "/", metrics_auth=False)
    assert is_public("/static/{name}", "/static/app.js", metrics_auth=False)
    assert is_public("/healthz", "/healthz", metrics_auth=True)
    assert is_public("/metrics", "/metrics", metrics_auth=False)
    assert not is_public("/metrics", "/metrics", metrics_auth=True)
    assert not is_public(None, "/static/x/../../v1/models", metrics_auth=False)
    assert not is_public("/v1/models", "/v1/models", metrics_auth=False)
    assert not is_public("/ws", "/ws", metrics_auth=False)


# --- 401 on every protected route -------------------------------------------------


@pytest.mark.parametrize("method,path", PROTECTED)
async def test_protected_routes_answer_401_without_a_valid_key(
    keyed: ServerProcess, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    for headers in ({}, bearer(WRONG), {"Authorization": "Basic " + KEY_A}, bearer("")):
        status, body, resp_headers = await call(
            http, method, keyed.url + path, headers=headers, json={}
        )
        assert status == 401, (headers, body)
        assert body["error"]["code"] == "unauthorized"
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")
        if path.startswith(OPENAI_PATHS):
            assert body["error"]["type"] == "invalid_request_error"
    # A key in the URL is only for /ws.
    status, _, _ = await call(http, method, f"{keyed.url}{path}?api_key={KEY_A}", json={})
    assert status == 401


def unauthorized_count(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('chatserver:requests_rejected_total{reason="unauthorized"}'):
            return float(line.split()[-1])
    return 0.0


async def test_refusals_count_in_requests_rejected(
    keyed: ServerProcess, http: aiohttp.ClientSession
) -> None:
    async with http.get(keyed.url + "/metrics") as r:
        before = unauthorized_count(await r.text())
    for headers in ({}, bearer(WRONG)):
        assert (await call(http, "GET", keyed.url + "/v1/models", headers=headers))[0] == 401
    async with http.get(keyed.url + "/metrics") as r:
        assert unauthorized_count(await r.text()) - before == 2


async def test_public_routes_need_no_key(keyed: ServerProcess, http: aiohttp.ClientSession) -> None:
    for path in ("/healthz", "/readyz", "/", "/static/app.js"):
        assert (await call(http, "GET", keyed.url + path))[0] == 200, path
    # /metrics is public unless --metrics-auth (whether or not it exists on this build).
    assert (await call(http, "GET", keyed.url + "/metrics"))[0] != 401


async def test_right_keys_are_served(keyed: ServerProcess, http: aiohttp.ClientSession) -> None:
    for key in (KEY_A, KEY_B):
        status, body, _ = await call(http, "GET", keyed.url + "/v1/models", key)
        assert status == 200 and body["data"], body
        status, body, _ = await call(
            http, "GET", keyed.url + "/v1/models", headers={"Authorization": f"bearer  {key}"}
        )
        assert status == 200


async def test_openai_client_raises_authentication_error(keyed: ServerProcess) -> None:
    async with AsyncOpenAI(base_url=keyed.url + "/v1", api_key=WRONG, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
            )
        assert caught.value.code == "unauthorized"
    async with AsyncOpenAI(base_url=keyed.url + "/v1", api_key=KEY_A, max_retries=0) as client:
        reply = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
        )
        assert reply.choices[0].message.content


# --- /ws ------------------------------------------------------------------------------


async def ws_chat(ws: aiohttp.ClientWebSocketResponse, **frame: Any) -> list[dict[str, Any]]:
    """Send one chat frame; the frames up to its done (or error)."""
    await ws.send_json({"type": "chat", "content": "hi", "params": {"max_tokens": 2}, **frame})
    frames = []
    while True:
        frames.append(await ws.receive_json(timeout=60))
        if frames[-1]["type"] in ("done", "error"):
            return frames


@pytest.mark.parametrize(
    "how",
    [
        {"headers": bearer(WRONG)},
        {"protocols": ("chatserver", "bearer." + WRONG)},
        {"params": {"api_key": WRONG}},
        {"headers": bearer(KEY_A), "params": {"api_key": WRONG}},
    ],
    ids=["header", "subprotocol", "query", "one-of-two"],
)
async def test_ws_with_a_wrong_key_is_refused_before_the_upgrade(
    keyed: ServerProcess, http: aiohttp.ClientSession, how: dict[str, Any]
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        async with http.ws_connect(keyed.url + "/ws", **how):
            pass
    assert caught.value.status == 401


@pytest.mark.parametrize(
    "how,protocol",
    [
        ({"headers": bearer(KEY_A)}, None),
        ({"protocols": ("chatserver", "bearer." + KEY_A)}, "chatserver"),
        ({"protocols": ("bearer." + KEY_A,)}, "bearer." + KEY_A),
        ({"params": {"api_key": KEY_A}}, None),
    ],
    ids=["header", "subprotocol", "bearer-subprotocol-only", "query"],
)
async def test_ws_with_a_right_key_in_the_upgrade_chats(
    keyed: ServerProcess, http: aiohttp.ClientSession, how: dict[str, Any], protocol: str | None
) -> None:
    async with http.ws_connect(keyed.url + "/ws", **how) as ws:
        assert ws.protocol == protocol
        frames = await ws_chat(ws)
        assert frames[0]["type"] == "session" and frames[-1]["type"] == "done", frames


async def test_ws_auth_frame_comes_first(keyed: ServerProcess, http: aiohttp.ClientSession) -> None:
    sid = (await query(http, keyed.url, KEY_A, message="hi"))["session_id"]
    async with http.ws_connect(f"{keyed.url}/ws?session_id={sid}") as ws:
        # Nothing is served before the key, the resumed session included.
        frames = await ws_chat(ws, id="early")
        assert frames == [
            {
                "type": "error",
                "id": "early",
                "code": "unauthorized",
                "message": frames[0]["message"],
                "request_id": frames[0]["request_id"],
            }
        ]
        assert frames[0]["request_id"]
        await ws.send_str("not json")
        assert (await ws.receive_json(timeout=10))["code"] == "unauthorized"
        await ws.send_json({"type": "auth", "id": "auth", "api_key": KEY_A})
        assert await ws.receive_json(timeout=10) == {"type": "session", "session_id": sid}
        frames = await ws_chat(ws)
        assert frames[-1]["type"] == "done", frames
        # The same key again is harmless; another key is refused.
        await ws.send_json({"type": "auth", "id": "auth", "api_key": KEY_A})
        await ws.send_json({"type": "auth", "id": "auth", "api_key": KEY_B})
        frame = await ws.receive_json(timeout=10)
        assert (frame["id"], frame["code"]) == ("auth", "unauthorized")
        assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4401


async def test_ws_wrong_or_late_auth_frame_closes_4401(
    keyed: ServerProcess, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(keyed.url + "/ws") as ws:
        await ws.send_json({"type": "auth", "id": "auth", "api_key": WRONG})
        frame = await ws.receive_json(timeout=10)
        assert (frame["type"], frame["id"], frame["code"]) == ("error", "auth", "unauthorized")
        assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4401
    start = time.monotonic()
    async with http.ws_connect(keyed.url + "/ws") as ws:
        frame = await ws.receive_json(timeout=30)
        assert (frame["id"], frame["code"]) == ("auth", "unauthorized")
        assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4401
    assert time.monotonic() - start < 15


async def test_keyless_server_answers_auth_frame_with_unknown_type(
    server: ServerProcess, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(server.url + "/ws") as ws:
        await ws.send_json({"type": "auth", "id": "auth", "api_key": KEY_A})
        frame = await ws.receive_json(timeout=10)
        assert (frame["id"], frame["code"]) == ("auth", "unknown_type")
        frames = await ws_chat(ws)  # and goes on serving
        assert frames[-1]["type"] == "done"
    status, body, _ = await call(http, "GET", server.url + "/v1/sessions")
    assert status == 403 and body["error"]["code"] == "auth_required"


# --- session ownership ------------------------------------------------------------------


async def assert_hidden_from(http: aiohttp.ClientSession, url: str, key: str, sid: str) -> None:
    """Every endpoint answers `key` about `sid` exactly as about an unknown session."""
    unknown = "f" * 32
    answers = []
    for target in (sid, unknown):
        got = []
        for method in ("GET", "DELETE"):
            status, body, _ = await call(http, method, f"{url}/v1/sessions/{target}", key)
            got.append((status, body["error"]["code"], body["error"]["message"]))
        status, body, _ = await call(
            http, "POST", url + "/v1/query", key, json={"message": "hi", "session_id": target}
        )
        got.append((status, body["error"]["code"], body["error"]["message"]))
        async with http.ws_connect(f"{url}/ws?session_id={target}", headers=bearer(key)) as ws:
            frame = await ws.receive_json(timeout=30)
            got.append((frame["type"], frame["code"], frame["message"]))
            frames = await ws_chat(ws, session_id=target)
            got.append((frames[0]["type"], frames[0]["code"], frames[0]["message"]))
        answers.append([(a, b, m.replace(target, "<id>")) for a, b, m in got])
    assert answers[0] == answers[1]
    assert answers[0][0][:2] == (404, "session_not_found")
    assert answers[0][3][:2] == ("error", "session_not_found")
    status, body, _ = await call(http, "GET", url + "/v1/sessions?limit=100", key)
    assert status == 200 and sid not in [s["session_id"] for s in body["sessions"]]


async def test_sessions_belong_to_their_key(
    keyed: ServerProcess, http: aiohttp.ClientSession
) -> None:
    sid = (await query(http, keyed.url, KEY_A, message="The secret word is banana."))["session_id"]
    await assert_hidden_from(http, keyed.url, KEY_B, sid)
    status, body, _ = await call(http, "GET", f"{keyed.url}/v1/sessions/{sid}", KEY_A)
    assert status == 200 and len(body["messages"]) == 2  # untouched by B's attempts
    async with http.ws_connect(f"{keyed.url}/ws?session_id={sid}", headers=bearer(KEY_A)) as ws:
        assert await ws.receive_json(timeout=30) == {"type": "session", "session_id": sid}


async def test_sessions_belong_to_their_key_across_redis_servers(
    redis_pair: tuple[ServerProcess, ServerProcess],
    http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    first, second = redis_pair
    sid = (await query(http, first.url, KEY_A, message="hello"))["session_id"]
    try:
        await assert_hidden_from(http, second.url, KEY_B, sid)
        await assert_hidden_from(http, first.url, KEY_B, sid)
        # The owner is stored with the session: the other server knows it is A's.
        status, body, _ = await call(http, "GET", f"{second.url}/v1/sessions/{sid}", KEY_A)
        assert status == 200 and len(body["messages"]) == 2
        status, body, _ = await call(http, "GET", second.url + "/v1/sessions", KEY_A)
        assert sid in [s["session_id"] for s in body["sessions"]]
        assert (await call(http, "DELETE", f"{second.url}/v1/sessions/{sid}", KEY_A))[0] == 204
        assert (await call(http, "GET", f"{first.url}/v1/sessions/{sid}", KEY_A))[0] == 404
    finally:
        client = aioredis.Redis.from_url(redis_url)
        await client.delete(f"chatserver:session:{sid}", f"chatserver:session:{sid}:messages")
        await client.aclose()


async def test_listing_pages_through_the_callers_sessions(
    redis_pair: tuple[ServerProcess, ServerProcess], http: aiohttp.ClientSession
) -> None:
    first, second = redis_pair
    status, body, _ = await call(http, "GET", first.url + "/v1/sessions?limit=100", KEY_B)
    before = {s["session_id"] for s in body["sessions"]}
    made = []
    for server in (first, second, first):
        made.append((await query(http, server.url, KEY_B, message="hi"))["session_id"])
        await asyncio.sleep(0.01)
    other = (await query(http, first.url, KEY_A, message="hi"))["session_id"]
    try:
        await check_listing(http, first, second, before, made, other)
    finally:
        for sid in made:
            await call(http, "DELETE", f"{first.url}/v1/sessions/{sid}", KEY_B)
        await call(http, "DELETE", f"{first.url}/v1/sessions/{other}", KEY_A)


async def check_listing(
    http: aiohttp.ClientSession,
    first: ServerProcess,
    second: ServerProcess,
    before: set[str],
    made: list[str],
    other: str,
) -> None:
    listed: list[str] = []
    url = second.url + "/v1/sessions?limit=2"
    while True:
        status, body, _ = await call(http, "GET", url, KEY_B)
        assert status == 200 and len(body["sessions"]) <= 2, body
        listed += [s["session_id"] for s in body["sessions"]]
        if body["next_cursor"] is None:
            break
        url = f"{second.url}/v1/sessions?limit=2&cursor={body['next_cursor']}"
    assert listed[:3] == made[::-1]  # most recently used first
    assert set(listed) == before | set(made) and other not in listed
    entry = body["sessions"][-1] if body["sessions"] else None
    assert entry is None or set(entry) == {"session_id", "created", "last_used"}
    for bad in ("limit=0", "limit=101", "limit=x", "cursor=garbage", "page=2"):
        status, body, _ = await call(http, "GET", f"{first.url}/v1/sessions?{bad}", KEY_B)
        assert status == 400, (bad, body)
        assert body["error"]["code"] in ("invalid_parameter", "invalid_cursor")


# --- keys file reload and logs -----------------------------------------------------------


async def test_sighup_reloads_the_keys_file(
    keyed: ServerProcess, keys_file: Path, http: aiohttp.ClientSession
) -> None:
    try:
        write_keys(keys_file, "carol:" + KEY_C)
        os.kill(keyed.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (await call(http, "GET", keyed.url + "/v1/models", KEY_C))[0] != 200:
            assert time.monotonic() < deadline, "the new key was not taken"
            await asyncio.sleep(0.1)
        assert (await call(http, "GET", keyed.url + "/v1/models", KEY_A))[0] == 401
        assert (await call(http, "GET", keyed.url + "/v1/models", KEY_B))[0] == 200  # a flag key
        write_keys(keys_file, "not a valid key")
        os.kill(keyed.pid, signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert (await call(http, "GET", keyed.url + "/v1/models", KEY_C))[0] == 200
    finally:
        write_keys(keys_file, "alice:" + KEY_A)
        os.kill(keyed.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (await call(http, "GET", keyed.url + "/v1/models", KEY_A))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_keys_are_never_logged(keyed: ServerProcess, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(keyed.url + "/ws", params={"api_key": KEY_A}) as ws:
        await ws.close()
    await call(http, "GET", keyed.url + "/v1/models", WRONG)
    await asyncio.sleep(0.5)  # the access log line is written after the response
    log = keyed.log_text()
    assert "api_key=<redacted>" in log
    assert "alice" in log  # keys are named in the log by their names or short hashes...
    assert fingerprint(WRONG) in log
    for key in (KEY_A, KEY_B, KEY_C, WRONG):
        assert key not in log  # ...never by themselves


def test_unreadable_keys_file_stops_the_server(tmp_path: Path) -> None:
    proc = ServerProcess("--api-keys-file", str(tmp_path / "missing"))
    try:
        assert proc.proc is not None and proc.proc.wait(60) != 0
        assert "--api-keys-file" in proc.log()
    finally:
        proc.stop()
