"""chatserver.api.request_id: ids on responses, error bodies, error frames and JSON logs."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from chatserver.api.request_id import (
    TEXT_FORMAT,
    JsonFormatter,
    RequestIdFilter,
    choose_request_id,
    current_request_id,
)
from tests.serverproc import ServerProcess, open_ws

HEADER = "X-Request-Id"
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """JSON logs at info, so the access log line of each request is there to find."""
    proc = ServerProcess(
        "--log-level", "info", "--log-format", "json", "--skip-quality-gate"
    ).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def test_client_ids_are_kept_only_when_sane() -> None:
    for sane in ("a", "req-42", "0af7651916cd43dd8448eb211c80319c", "x.y:z_w-1", "A" * 64):
        assert choose_request_id(sane) == sane
    for insane in (None, "", "A" * 65, "has space", "new\nline", "<script>", "ünï"):
        assert GENERATED.fullmatch(choose_request_id(insane))
    assert choose_request_id(None) != choose_request_id(None)


def test_log_records_carry_the_id_of_their_request() -> None:
    def format_in_request(request_id: str | None, formatter: logging.Formatter) -> str:
        def run() -> str:
            current_request_id.set(request_id)
            record = logging.LogRecord(
                "chatserver.x", logging.INFO, __file__, 1, "hi %s", ("a",), None
            )
            RequestIdFilter().filter(record)
            return formatter.format(record)

        return contextvars.Context().run(run)

    text = logging.Formatter(TEXT_FORMAT)
    assert format_in_request("r-1", text).endswith(" INFO chatserver.x [r-1]: hi a")
    assert format_in_request(None, text).endswith(" INFO chatserver.x: hi a")
    line = json.loads(format_in_request("r-2", JsonFormatter()))
    assert {k: line[k] for k in ("level", "logger", "message", "request_id")} == {
        "level": "INFO",
        "logger": "chatserver.x",
        "message": "hi a",
        "request_id": "r-2",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


async def test_id_is_echoed_or_generated(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    async with http.get(server.url + "/healthz", headers={HEADER: "trace-1.a:b_c"}) as r:
        assert r.status == 200 and r.headers[HEADER] == "trace-1.a:b_c"
    async with http.get(server.url + "/healthz") as r:
        first = r.headers[HEADER]
    async with http.get(server.url + "/healthz") as r:
        second = r.headers[HEADER]
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second
    async with http.get(server.url + "/healthz", headers={HEADER: "x" * 65}) as r:
        assert GENERATED.fullmatch(r.headers[HEADER])
    async with http.get(server.url + "/healthz", headers={HEADER: "a b"}) as r:
        assert GENERATED.fullmatch(r.headers[HEADER])


async def test_error_bodies_carry_the_id_in_both_shapes(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    async with http.get(server.url + "/no/such/page", headers={HEADER: "nf-1"}) as r:
        assert r.status == 404 and r.headers[HEADER] == "nf-1"
        assert (await r.json())["error"] == {
            "code": "not_found",
            "message": "no route for GET /no/such/page",
            "request_id": "nf-1",
        }
    async with http.get(server.url + "/v1/sessions/unknown") as r:
        body = await r.json()
        assert r.status == 404 and body["error"]["request_id"] == r.headers[HEADER]
    async with http.post(
        server.url + "/v1/chat/completions", json={"model": "x"}, headers={HEADER: "oa-1"}
    ) as r:
        error = (await r.json())["error"]
        assert r.status == 400 and r.headers[HEADER] == "oa-1"
        assert set(error) == {"message", "type", "param", "code", "request_id"}
        assert error["request_id"] == "oa-1"


async def test_websocket_error_frames_carry_the_upgrade_id(server: ServerProcess) -> None:
    url = server.url.replace("http://", "ws://") + "/ws"
    async with open_ws(url, additional_headers={HEADER: "ws-7"}) as ws:
        assert ws.response.headers[HEADER] == "ws-7"
        await ws.send("not json")
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert frame["type"] == "error" and frame["request_id"] == "ws-7"
        await ws.send(json.dumps({"type": "cancel"}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert (frame["code"], frame["request_id"]) == ("nothing_to_cancel", "ws-7")


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass  # worker processes log as text
    return lines


async def test_json_log_lines_carry_the_request_id(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    async with http.get(server.url + "/v1/models", headers={HEADER: "log-check-1"}) as r:
        assert r.status == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        mine = [line for line in json_lines(server.log()) if line["request_id"] == "log-check-1"]
        if mine:
            break
        await asyncio.sleep(0.1)
    assert mine, server.log()[-2000:]
    assert set(mine[0]) >= {"time", "level", "logger", "message", "request_id"}
    assert mine[0]["logger"] == "aiohttp.access" and "/v1/models" in mine[0]["message"]
    # Lines written outside any request say so.
    startup = [line for line in json_lines(server.log()) if "serving on" in line["message"]]
    assert startup and startup[0]["request_id"] is None


async def test_successful_health_probes_are_not_logged(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    for path in ("/healthz", "/readyz"):
        async with http.get(server.url + path, headers={HEADER: f"probe{path[1:]}"}) as r:
            assert r.status == 200
    # A request after the probes: once its line is there, theirs would be too.
    async with http.get(server.url + "/v1/models", headers={HEADER: "after-probes"}) as r:
        assert r.status == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ids = {line["request_id"] for line in json_lines(server.log())}
        if "after-probes" in ids:
            break
        await asyncio.sleep(0.1)
    assert "after-probes" in ids, server.log()[-2000:]
    assert not ids & {"probehealthz", "probereadyz"}
