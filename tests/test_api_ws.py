"""chatserver.api.ws: chat over a real WebSocket (the `websockets` client) to a real server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from tests.serverproc import ServerProcess, generations, open_ws, wait_no_generations

TIMEOUT = 120.0


def ws_url(server: ServerProcess, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/ws" + query


async def send(ws: Any, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def recv(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def answer(ws: Any, message_id: str) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Frames up to the done/error frame of `message_id`: (its text, that frame, all frames)."""
    frames = []
    while True:
        frame = await recv(ws)
        frames.append(frame)
        if frame.get("id") == message_id and frame["type"] in ("done", "error"):
            text = "".join(
                f["content"] for f in frames if f["type"] == "token" and f["id"] == message_id
            )
            return text, frame, frames


async def history(server: ServerProcess, session_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v1/sessions/{session_id}") as r:
            assert r.status == 200
            return (await r.json())["messages"]


async def test_reply_streams_tokens_then_done(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", content="Say hello.", id="m1", params={"max_tokens": 12})
        text, done, frames = await answer(ws, "m1")
    assert frames[0]["type"] == "session" and frames[0]["session_id"]
    tokens = [f for f in frames if f["type"] == "token"]
    assert tokens and all(f["id"] == "m1" and f["content"] for f in tokens)
    assert frames[-1] is done and [f["type"] for f in frames[1:-1]] == ["token"] * len(tokens)
    assert done["finish_reason"] in ("stop", "length")
    assert done["usage"]["prompt_tokens"] > 5
    assert len(tokens) <= done["usage"]["completion_tokens"] <= 12
    assert text.strip()


async def test_server_assigns_ids(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", content="Hi", params={"max_tokens": 4})
        frames = [await recv(ws)]
        while frames[-1]["type"] != "done":
            frames.append(await recv(ws))
    ids = {f["id"] for f in frames if f["type"] in ("token", "done")}
    assert len(ids) == 1 and all(isinstance(i, str) and i for i in ids)


async def test_session_remembers_earlier_turns(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(
            ws,
            type="chat",
            id="a",
            content="The secret word is banana.",
            params={"max_tokens": 16},
        )
        first, done_a, frames = await answer(ws, "a")
        session_id = frames[0]["session_id"]
        await send(
            ws, type="chat", id="b", content="What is the secret word?", params={"max_tokens": 16}
        )
        second, done_b, frames_b = await answer(ws, "b")
    assert not any(f["type"] == "session" for f in frames_b)  # same session, no new one
    # The second prompt holds the first turn: its question and the reply.
    grown = done_b["usage"]["prompt_tokens"] - done_a["usage"]["prompt_tokens"]
    assert grown > done_a["usage"]["completion_tokens"]
    assert "banana" in second.lower()
    assert await history(server, session_id) == [
        {"role": "user", "content": "The secret word is banana."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What is the secret word?"},
        {"role": "assistant", "content": second},
    ]


async def test_resume_session_on_connect(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", id="a", content="Hi", params={"max_tokens": 4})
        _, _, frames = await answer(ws, "a")
    session_id = frames[0]["session_id"]
    async with open_ws(ws_url(server, f"?session_id={session_id}")) as ws:
        assert await recv(ws) == {"type": "session", "session_id": session_id}
        await send(ws, type="chat", id="b", content="Hello again", params={"max_tokens": 4})
        _, done, frames = await answer(ws, "b")
    assert done["type"] == "done" and not any(f["type"] == "session" for f in frames)
    assert len(await history(server, session_id)) == 4


async def test_resume_unknown_session_keeps_socket_usable(server: ServerProcess) -> None:
    async with open_ws(ws_url(server, "?session_id=nope")) as ws:
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "session_not_found"
        await send(ws, type="chat", id="a", content="Hi", params={"max_tokens": 4})
        _, done, frames = await answer(ws, "a")
    assert frames[0]["type"] == "session" and frames[0]["session_id"] != "nope"
    assert done["type"] == "done"


async def test_chat_naming_unknown_session(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", id="a", content="Hi", session_id="missing")
        err = await recv(ws)
        assert (err["type"], err["id"], err["code"]) == ("error", "a", "session_not_found")
        assert "missing" in err["message"]


async def test_cancel_running_then_socket_answers_again(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", id="long", content="Count to 100.", params={"max_tokens": 200})
        session = await recv(ws)
        first = await recv(ws)
        assert (session["type"], first["type"]) == ("session", "token")
        await send(ws, type="cancel", id="long")
        rest, done, _ = await answer(ws, "long")
        assert done["finish_reason"] == "cancelled"
        assert done["usage"]["completion_tokens"] < 200
        # The worker is free again: the next message gets a normal reply.
        start = time.monotonic()
        await send(ws, type="chat", id="next", content="Say yes.", params={"max_tokens": 8})
        _, done, _ = await answer(ws, "next")
        assert done["finish_reason"] in ("stop", "length")
        assert time.monotonic() - start < 60
    messages = await history(server, session["session_id"])
    assert messages[1] == {
        "role": "assistant",
        "content": first["content"] + rest,
        "cancelled": True,
    }


async def test_cancel_without_id_cancels_running(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", id="x", content="Count to 100.", params={"max_tokens": 200})
        while (await recv(ws))["type"] != "token":
            pass
        await send(ws, type="cancel")
        _, done, _ = await answer(ws, "x")
        assert done["finish_reason"] == "cancelled"
        await send(ws, type="cancel")
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "nothing_to_cancel"
        await send(ws, type="cancel", id="never-sent")
        err = await recv(ws)
        assert err == {**err, "type": "error", "id": "never-sent", "code": "unknown_id"}


async def test_queued_messages_answered_in_order(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        for i in range(3):
            await send(ws, type="chat", id=f"q{i}", content=f"Say {i}.", params={"max_tokens": 6})
        _, _, frames = await answer(ws, "q2")
    order = [f["id"] for f in frames if f["type"] in ("token", "done")]
    # Each reply is whole and in order: q0's frames, then q1's, then q2's.
    assert [i for n, i in enumerate(order) if n == 0 or order[n - 1] != i] == ["q0", "q1", "q2"]
    dones = [f for f in frames if f["type"] == "done"]
    assert [d["id"] for d in dones] == ["q0", "q1", "q2"]
    assert all(d["finish_reason"] in ("stop", "length") for d in dones)


async def test_cancel_queued_message(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", id="a", content="Count to 50.", params={"max_tokens": 24})
        await send(ws, type="chat", id="b", content="Say b.", params={"max_tokens": 6})
        await send(ws, type="chat", id="c", content="Say c.", params={"max_tokens": 6})
        await send(ws, type="cancel", id="b")
        _, _, frames = await answer(ws, "c")
    finals = [(f["id"], f["finish_reason"]) for f in frames if f["type"] == "done"]
    assert finals[0] == ("b", "cancelled")  # at once, while a still runs
    assert [i for i, _ in finals] == ["b", "a", "c"]
    assert not any(f["type"] == "token" and f["id"] == "b" for f in frames)
    cancelled = next(f for f in frames if f["type"] == "done" and f["id"] == "b")
    assert cancelled["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}


async def test_duplicate_id_refused(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", id="d", content="Count to 30.", params={"max_tokens": 16})
        await send(ws, type="chat", id="d", content="Again", params={"max_tokens": 4})
        frames = []
        while not (frames and frames[-1]["type"] == "done"):
            frames.append(await recv(ws))
    errors = [f for f in frames if f["type"] == "error"]
    assert [(e["id"], e["code"]) for e in errors] == [("d", "duplicate_id")]
    assert sum(f["type"] == "done" for f in frames) == 1


async def test_queue_full(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        # One running and 16 waiting (settings.ws_queue) fit; the 18th is refused.
        for i in range(18):
            await send(
                ws, type="chat", id=f"m{i}", content="Count to 100.", params={"max_tokens": 64}
            )
        frames = []
        while not any(f["type"] == "error" for f in frames):
            frames.append(await recv(ws))
        err = frames[-1]
        assert (err["id"], err["code"]) == ("m17", "queue_full")
    # Closing the socket dropped the queue and cancelled the running reply.
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", id="after", content="Hi", params={"max_tokens": 4})
        _, done, _ = await answer(ws, "after")
        assert done["type"] == "done"


async def test_disconnect_mid_stream_cancels_and_server_keeps_serving(
    server: ServerProcess,
) -> None:
    ws = await open_ws(ws_url(server))
    await send(ws, type="chat", id="gone", content="Count to 100.", params={"max_tokens": 200})
    session = await recv(ws)
    assert (await recv(ws))["type"] == "token"
    assert await generations(server) == 1
    ws.transport.abort()  # no close handshake: the network just goes away
    # The reply was cut short at once and kept as cancelled.
    await wait_no_generations(server)
    messages = await history(server, session["session_id"])
    assert messages[1]["cancelled"] is True
    async with open_ws(ws_url(server)) as ws2:
        await send(ws2, type="chat", id="next", content="Say yes.", params={"max_tokens": 6})
        _, done, _ = await answer(ws2, "next")
        assert done["finish_reason"] in ("stop", "length")


async def test_session_deleted_under_the_socket(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(ws, type="chat", id="a", content="Hi", params={"max_tokens": 4})
        _, _, frames = await answer(ws, "a")
        old = frames[0]["session_id"]
        async with aiohttp.ClientSession() as http:
            async with http.delete(f"{server.url}/v1/sessions/{old}") as r:
                assert r.status == 204
        await send(ws, type="chat", id="b", content="Hi", params={"max_tokens": 4})
        _, err, _ = await answer(ws, "b")
        assert err["type"] == "error" and err["code"] == "session_not_found"
        # The socket is still usable: its next message starts a new session.
        await send(ws, type="chat", id="c", content="Hi", params={"max_tokens": 4})
        _, done, frames = await answer(ws, "c")
        assert frames[0]["type"] == "session" and frames[0]["session_id"] != old
        assert done["type"] == "done"
