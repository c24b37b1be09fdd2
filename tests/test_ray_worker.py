"""chatserver.workers.ray_worker: `--engine ray`, its worker a Ray actor on a local Ray.

One server for the module (its own local Ray instance: 2 CPUs, a small object
store, no dashboard); the test process joins that instance only to `ray.kill`
the worker's actor, as an operator or a lost node would.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.serverproc import ServerProcess, generations, open_ws, wait_no_generations

pytestmark = pytest.mark.ray

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def ray_server() -> Iterator[ServerProcess]:
    proc = ServerProcess(
        "--engine",
        "ray",
        "--ray-workers",
        "1",
        "--dtype",
        "float32",  # exact text compared below; no int8 gate to wait for
        "--max-context",
        "1024",
        "--kv-cache-memory",
        "256MiB",
        "--worker-restart-delay",
        "0.05",
        "--log-level",
        "warning",
    ).wait_ready()
    yield proc
    proc.stop()


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        task_dir = Path(f"/proc/{todo.pop()}/task")
        for task in task_dir.iterdir() if task_dir.exists() else ():
            children = (task / "children").read_text().split()
            found += map(int, children)
            todo += map(int, children)
    return found


def cmdlines(pid: int) -> list[str]:
    lines = []
    for child in descendants(pid):
        try:
            lines.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass  # it ended meanwhile
    return lines


async def chat(http: aiohttp.ClientSession, url: str, content: str, max_tokens: int) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def readyz(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/readyz") as resp:
        return await resp.json()


async def test_a_streamed_reply_comes_from_a_ray_actor(ray_server):
    # The worker is a Ray actor under the server's own local Ray, not a
    # multiprocessing child.
    lines = cmdlines(ray_server.proc.pid)
    assert any(line.startswith("ray::WorkerActor") for line in lines), lines
    assert not any("multiprocessing-fork" in line for line in lines), lines
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(ray_server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            events = [line[6:].strip() async for line in resp.content if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("choices" in c for c in chunks), chunks  # no error chunk
        deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
        assert sum(bool(d) for d in deltas) >= 2, chunks  # token by token, not one piece
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        # The same greedy reply, not streamed: the actor decodes like any worker.
        whole = await chat(http, ray_server.url, "Name three colours.", 16)
        assert whole["choices"][0]["message"]["content"] == "".join(deltas)
        state = await readyz(http, ray_server.url)
        assert state["precision"]["dtype"] == "float32"
        assert [w["state"] for w in state["workers"]] == ["ready"]


async def test_a_client_that_leaves_frees_its_sequence_in_the_actor(ray_server):
    url = ray_server.url.replace("http://", "ws://") + "/ws"
    ws = await open_ws(url)
    frame = {"type": "chat", "id": "gone", "content": "Count to 300.", "params": {}}
    frame["params"]["max_tokens"] = 400
    await ws.send(json.dumps(frame))
    seen = []
    while len([f for f in seen if f["type"] == "token"]) < 3:
        seen.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
    assert await generations(ray_server) == 1
    left = time.monotonic()
    ws.transport.abort()  # the network goes away mid-reply
    await wait_no_generations(ray_server)
    # The cancel reached the actor: its KV cache holds no running sequence.
    async with aiohttp.ClientSession() as http:
        while True:
            cache = (await readyz(http, ray_server.url))["workers"][0]["kv_cache"]
            if cache["kv_used"] == 0:
                break
            assert time.monotonic() - left < 5.0, cache
            await asyncio.sleep(0.05)
        again = await chat(http, ray_server.url, "Say yes.", 4)
        assert again["usage"]["completion_tokens"] > 0


def gcs_address(server_pid: int) -> str:
    """The server's local Ray instance, from its own processes' command lines."""
    for line in cmdlines(server_pid):
        for arg in line.split():
            if arg.startswith("--gcs-address="):
                return arg.split("=", 1)[1]
    raise AssertionError("no Ray process under the server")


# Joins the server's Ray instance and kills worker 0's actor when told to (a line
# on stdin); a process of its own, so that Ray trouble cannot take pytest down.
# Ray asks a client joining by address for the token its local instance made
# (~/.ray/auth_token) only in token mode, which the server's instance has.
KILLER = """
import os, sys
os.environ["RAY_AUTH_MODE"] = "token"
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
def workers():
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "chatserver" and "-worker-0-" in a["name"]]
print(" ".join(workers()), flush=True)
sys.stdin.readline()
ray.kill(ray.get_actor(workers()[0], namespace="chatserver"))
print("killed", flush=True)
sys.stdin.readline()
print(" ".join(workers()), flush=True)
"""


@pytest.fixture
def actor_killer(ray_server) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLER, gcs_address(ray_server.proc.pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield proc
    proc.kill()
    proc.wait()


async def answer(proc: subprocess.Popen, go_on: bool = True) -> str:
    """The killer's next line (after telling it to go on); bounded, as Ray may hang."""
    assert proc.stdin is not None and proc.stdout is not None
    if go_on:
        proc.stdin.write("\n")
        proc.stdin.flush()
    return (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)).strip()


async def test_ray_kill_fails_the_reply_in_flight_and_the_worker_comes_back(
    ray_server, actor_killer
):
    (victim,) = (await answer(actor_killer, go_on=False)).split()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "stream": True,
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(ray_server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            events, killed = [], False
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                events.append(line[6:].strip())
                if not killed and b'"content": "' in line and b'"content": ""' not in line:
                    assert await answer(actor_killer) == "killed"
                    killed = True
                    # While it reloads: a 503 to retry, as for a dead process, never a 500.
                    query = {"message": "Hi", "max_tokens": 4}
                    async with http.post(ray_server.url + "/v1/query", json=query) as right_after:
                        error = (await right_after.json())["error"]
                        assert right_after.status == 503, error
                        assert error["code"] in ("worker_unavailable", "worker_failed")
                        assert int(right_after.headers["Retry-After"]) >= 1
        assert killed, events
        assert events[-1] == b"[DONE]"
        # The same error a dead worker process gives.
        assert json.loads(events[-2])["error"]["code"] == "worker_failed", events[-3:]
        deadline = time.monotonic() + 90
        while (await readyz(http, ray_server.url))["status"] != "ready":
            assert time.monotonic() < deadline, "the Ray worker was not restarted"
            await asyncio.sleep(0.1)
        again = await chat(http, ray_server.url, "Say hello.", 8)
        assert again["usage"]["completion_tokens"] > 0
        async with http.get(ray_server.url + "/metrics") as resp:
            scrape = (await resp.text()).splitlines()
        assert "chatserver:worker_restarts_total 1.0" in scrape
    # A new actor serves: the pool restarted the worker on the same Ray instance.
    (replacement,) = (await answer(actor_killer)).split()
    assert replacement != victim
