"""chatserver.workers.ray_worker, shared: two instances on one Ray cluster's worker (--ray-share).

One Ray head for the module (`ray start --head`, 2 CPUs, its own temp dir and
ports so it cannot meet another test's Ray), one shared actor, two servers
attached to it; a driver process of the test's own joins the head to look at
the actor (`describe`) and to `ray.kill` it, as an operator or a lost node would.

The head runs in Ray's token mode with a token of the module's own, given to
every process that joins it (RAY_AUTH_MODE, RAY_AUTH_TOKEN): what a deployment
does, and independent of ~/.ray/auth_token, which makes `ray start` turn token
mode on by itself when a local Ray has left one there.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatserver.workers.ray_worker import LEASE_S
from load_tests.server import free_port
from tests.serverproc import ServerProcess
from tests.test_ray_worker import chat as ray_worker_chat

pytestmark = pytest.mark.ray

MODEL = "SmolLM2-135M-Instruct"
RAY = str(Path(sys.executable).with_name("ray"))
PROMPTS = ("Name three colours.", "Count from one to five.", "What is the capital of France?")
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def its_own_reply(reply: str, reference: str) -> bool:
    """The prompt's greedy reply alone, or the same until a later near tie flipped.

    float32 in a batch differs from alone by rounding only (README, Precision),
    and that once flipped the greedy choice between end-of-reply and a newline
    after "The capital of France is Paris.". Tokens of another sequence, the
    mix-up these tests look for, would part from the reply's first words.
    """
    shared = len(os.path.commonprefix([reply, reference]))
    return reply == reference or shared >= min(len(reference), 24)


def ray_processes(temp_dir: Path) -> list[int]:
    """The head's processes (their command lines name its temp dir) and their children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if str(temp_dir) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            pass
    children = []
    for pid in found:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                children += map(int, (task / "children").read_text().split())
            except OSError:
                pass
    return found + children


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[str]:
    """A Ray head of this module's own; `ray stop` would end every Ray on the machine,
    so teardown ends this head's processes by id."""
    temp_dir = Path(f"/tmp/ray-shared-{uuid.uuid4().hex[:8]}")  # short: socket paths
    port = free_port()
    ports = {
        "--port": port,
        "--dashboard-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    command = [RAY, "start", "--head", "--num-cpus", "2", "--include-dashboard=false"]
    command += ["--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir)]
    command += ["--object-store-memory", str(128 * 2**20), "--disable-usage-stats"]
    for flag, value in ports.items():
        command += [flag, str(value)]
    try:  # a start that fails or times out may still leave processes: end them too
        for attempt in range(2):
            # `ray start` gives its raylet 30 s to register (fixed in Ray 2.60), which a
            # machine busy with other tests can miss: once more, after a clean-up.
            started = subprocess.run(
                command, capture_output=True, text=True, timeout=120, env={**os.environ, **RAY_ENV}
            )
            if started.returncode == 0 or attempt:
                break
            end_processes(temp_dir)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"127.0.0.1:{port}"
    finally:
        end_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def running(pid: int) -> bool:
    """Not exited; a zombie not yet reaped has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def end_processes(temp_dir: Path) -> None:
    """SIGTERM the head's processes, then SIGKILL what is left 2 s later: its GCS
    server, raylet and monitor were all still running 10 s after a SIGTERM (an
    ad-hoc run of this function's steps), which is why `ray stop --force` exists."""
    pids = ray_processes(temp_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(map(running, pids)):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def shared_server(address: str, share: str, max_context: str = "1024") -> ServerProcess:
    return ServerProcess(
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--ray-share",
        share,
        "--ray-workers",
        "1",
        "--dtype",
        "float32",  # exact text compared below; no int8 gate to wait for
        "--max-context",
        max_context,
        "--kv-cache-memory",
        "256MiB",
        "--worker-restart-delay",
        "0.05",
        "--worker-stall-timeout",
        "120",  # the tests kill the actor themselves; a busy machine is no stall
        "--log-level",
        "warning",
        env=RAY_ENV,
    )


@pytest.fixture(scope="module")
def share() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def servers(ray_head, share) -> Iterator[list[ServerProcess]]:
    """Two instances started together: they race to create the shared actor."""
    pair = [shared_server(ray_head, share), shared_server(ray_head, share)]
    try:
        for server in pair:
            server.wait_ready()
        yield pair
    finally:
        for server in pair:
            server.stop()


# Joins the head; answers one command a line on stdin with one JSON line.
DRIVER = """
import json, sys
import ray
ray.init(address=sys.argv[1], namespace="chatserver", log_to_driver=False)
name = "chatserver-share-" + sys.argv[2] + "-worker-0"
print(json.dumps("connected"), flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "names":
        found = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "chatserver"]
        print(json.dumps(sorted(found)), flush=True)
    elif command == "describe":
        print(json.dumps(ray.get(ray.get_actor(name).describe.remote())), flush=True)
    elif command == "kill":
        ray.kill(ray.get_actor(name))
        print(json.dumps("killed"), flush=True)
"""


class Driver:
    def __init__(self, address: str, share: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, address, share],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **RAY_ENV},
        )
        self.connected = False

    async def ask(self, command: str) -> Any:
        """The driver's answer to ``command``; bounded, as Ray may hang."""
        if not self.connected:
            assert await self._answer() == "connected"
            self.connected = True
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return await self._answer()

    async def _answer(self) -> Any:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)
        assert line, "the Ray driver exited"
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def driver(ray_head, share) -> Iterator[Driver]:
    drv = Driver(ray_head, share)
    try:
        yield drv
    finally:
        drv.close()


async def chat(http: aiohttp.ClientSession, url: str, content: str, max_tokens: int = 20) -> str:
    return (await ray_worker_chat(http, url, content, max_tokens))["choices"][0]["message"][
        "content"
    ]


async def stream(http: aiohttp.ClientSession, url: str, started: asyncio.Event) -> list[bytes]:
    """A long streamed reply's data lines; ``started`` is set at its first content token."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    events = []
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                if b'"content": "' in line and b'"content": ""' not in line:
                    started.set()
    return events


async def readyz(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/readyz") as resp:
        return await resp.json()


async def wait_for(predicate, what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def reference(servers) -> dict[str, str]:
    """Each prompt's greedy reply from the first instance alone (the other idle)."""

    async def alone() -> dict[str, str]:
        async with aiohttp.ClientSession() as http:
            return {p: await chat(http, servers[0].url, p) for p in PROMPTS}

    return asyncio.run(alone())


def test_ray_client_and_unshareable_settings_are_refused_at_startup():
    for flags, says in (
        (
            ["--ray-address", "ray://127.0.0.1:10001"],
            "Ray Client (ray://) is not supported: it does not run streaming actor methods",
        ),
        (["--ray-share", "team"], "--ray-share needs --ray-address"),
        (["--ray-address", "127.0.0.1:1", "--ray-share", "a b"], "--ray-share 'a b'"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "chatserver", "serve", "--engine", "ray", *flags],
            capture_output=True,
            text=True,
            timeout=180,  # a busy 2-core machine imports torch slowly
        )
        assert done.returncode == 2, done.stderr
        assert says in done.stderr, done.stderr


async def test_two_instances_attach_to_one_actor_and_get_their_own_replies(
    servers, driver, share, reference
):
    # One actor for the name, whichever instance created it; both attached.
    names = [n for n in await driver.ask("names") if share in n]
    assert names == [f"chatserver-share-{share}-worker-0"], names
    state = await driver.ask("describe")
    assert state["shared"] and len(state["instances"]) == 2, state
    async with aiohttp.ClientSession() as http:
        # Every prompt to both instances at once: six sequences in one actor's
        # batches, each instance's own ids 1, 2, 3...; no reply may take another's tokens.
        jobs = [(s.url, p) for p in PROMPTS for s in servers]
        replies = await asyncio.gather(*(chat(http, url, p) for url, p in jobs))
        for (url, prompt), reply in zip(jobs, replies, strict=True):
            assert its_own_reply(reply, reference[prompt]), (url, prompt, reply)

        async def both_see_two() -> bool:
            states = [(await readyz(http, s.url))["workers"][0] for s in servers]
            return all(w.get("shared", {}).get("instances") == 2 for w in states)

        await wait_for(both_see_two, "/readyz shows the actor's two instances", 10)
        worker = (await readyz(http, servers[1].url))["workers"][0]
        assert worker["state"] == "ready" and worker["shared"]["name"] == share, worker


async def test_an_instance_asking_for_another_setup_is_refused(ray_head, share, servers, driver):
    odd = shared_server(ray_head, share, max_context="512")
    try:
        with pytest.raises(RuntimeError, match="exited"):
            odd.wait_ready()
        log = odd.log()
        assert "the shared Ray worker 0 serves another setup" in log, log[-2000:]
        assert "max_context 512 (the worker's: 1024)" in log, log[-2000:]
    finally:
        odd.stop()
    # The actor serves the two instances as before.
    assert len((await driver.ask("describe"))["instances"]) == 2


async def test_killing_the_actor_fails_both_instances_replies_and_both_recover(
    servers, driver, reference
):
    async with aiohttp.ClientSession() as http:
        started = [asyncio.Event(), asyncio.Event()]
        streams = [
            asyncio.create_task(stream(http, s.url, ev))
            for s, ev in zip(servers, started, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 60)
        before = (await driver.ask("describe"))["actor"]
        assert await driver.ask("kill") == "killed"
        for events in await asyncio.wait_for(asyncio.gather(*streams), 60):
            assert events[-1] == b"[DONE]"
            # The same error a dead worker process gives, on both instances.
            assert json.loads(events[-2])["error"]["code"] == "worker_failed", events[-3:]

        async def both_ready() -> bool:
            states = [(await readyz(http, s.url))["status"] for s in servers]
            return states == ["ready", "ready"]

        await wait_for(both_ready, "the shared worker was not restarted", 120)
        # One new actor under the name, both instances attached to it.
        state = await driver.ask("describe")
        assert len(state["instances"]) == 2 and state["actor"] != before, state
        replies = await asyncio.gather(*(chat(http, s.url, PROMPTS[0]) for s in servers))
        assert all(its_own_reply(r, reference[PROMPTS[0]]) for r in replies), replies


async def test_an_instance_that_stops_leaves_the_other_serving(servers, driver, reference):
    leaving, staying = servers
    async with aiohttp.ClientSession() as http:
        started = [asyncio.Event(), asyncio.Event()]
        streams = [
            asyncio.create_task(stream(http, s.url, ev))
            for s, ev in zip(servers, started, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 60)
        assert (await driver.ask("describe"))["generations"] == 2
        await asyncio.to_thread(leaving.stop)  # SIGTERM: a clean stop detaches
        state = await driver.ask("describe")
        assert len(state["instances"]) == 1, state
        # The leaving instance's sequence was cancelled in the actor; the other's runs on.
        assert state["generations"] <= 1, state
        kept = await asyncio.wait_for(streams[1], 120)
        assert kept[-1] == b"[DONE]"
        last = json.loads(kept[-2])
        assert "error" not in last and last["choices"][0]["finish_reason"] in ("stop", "length")
        await asyncio.gather(streams[0], return_exceptions=True)
        assert (await driver.ask("describe"))["generations"] == 0
        assert its_own_reply(await chat(http, staying.url, PROMPTS[1]), reference[PROMPTS[1]])


async def test_a_vanished_instance_is_detached_when_its_lease_lapses(
    ray_head, share, servers, driver, reference
):
    staying = servers[1]
    gone = shared_server(ray_head, share)
    try:
        gone.wait_ready()
        async with aiohttp.ClientSession() as http:
            started = asyncio.Event()
            reply = asyncio.create_task(stream(http, gone.url, started))
            await asyncio.wait_for(started.wait(), 60)
            state = await driver.ask("describe")
            assert len(state["instances"]) == 2 and state["generations"] == 1, state
            gone.proc.kill()  # SIGKILL: no detach; only the lease can tell
            await asyncio.gather(reply, return_exceptions=True)
            vanished = time.monotonic()

            async def detached() -> bool:
                state = await driver.ask("describe")
                return len(state["instances"]) == 1 and state["generations"] == 0

            await wait_for(detached, "the vanished instance was never detached", LEASE_S + 10)
            assert time.monotonic() - vanished > LEASE_S / 2  # the lease, not something sooner
            reply = await chat(http, staying.url, PROMPTS[2])
            assert its_own_reply(reply, reference[PROMPTS[2]]), reply
    finally:
        gone.stop()
