"""Run a real `chatserver serve` in a subprocess on a free loopback port.

The launcher is the load tester's (`load_tests.server.LaunchedServer`); tests
spawn the process first and wait for it separately, so they can also watch a
server that is not ready yet, or one that refuses to start.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import aiohttp
import websockets

from chatserver.workers import cpu_features, native_kernels
from load_tests.server import LaunchedServer

# Flags for greedy texts that must not depend on the batch, the prefix cache or the
# CPU kind: --batch-invariant where its C kernels build, else float32 (nearly as
# invariant, and several times slower to decode).
EXACT_FLAGS = (
    ("--batch-invariant",)
    if shutil.which(os.environ.get("CC") or "gcc")
    and all(f in cpu_features.detect().flags for f in native_kernels.REQUIRED_FLAGS)
    else ("--dtype", "float32")
)


class ServerProcess(LaunchedServer):
    """A chatserver subprocess, spawned at once; `url` serves once `wait_ready()` returns."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None, port: int | None = None):
        super().__init__(flags, port=port, env=env, ready_timeout=180.0, stop_timeout=20.0)
        self.spawn()

    def log(self) -> str:
        return self.log_text()


def open_ws(url: str, **options: Any) -> websockets.connect:
    """websockets.connect that takes in every frame the server sends (no max_queue).

    Tests leave frames unread (another socket's turn, delivered live); with
    websockets' default queue, closing such a socket waited its whole 10 s
    close_timeout for the server's close reply (test_chat_serving's cancel
    test: 10.0 s; 0.0 s with max_queue=None).
    """
    return websockets.connect(url, max_queue=None, **options)


async def generations(server: ServerProcess) -> int:
    """Generations under way on the server, as /readyz counts them."""
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/readyz") as r:
            return (await r.json())["generations"]


async def wait_no_generations(server: ServerProcess, within: float = 5.0) -> None:
    """The server cancels a reply whose client left: nothing stays running."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not await generations(server):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"a generation still runs {within}s after its client left")


def delete_redis_keys(redis_url: str, prefix: str) -> None:
    """Remove what servers under `prefix` left in the test Redis."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextmanager
def server_pair(
    redis_url: str, prefix: str, *flags: str
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers with the same flags sharing one Redis and key prefix, started together;
    their keys deleted after."""
    shared = ("--redis-url", redis_url, "--redis-prefix", prefix, *flags)
    a, b = ServerProcess(*shared), ServerProcess(*shared)
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()
        delete_redis_keys(redis_url, prefix)


def redis_pair(
    redis_url: str, prefix: str, resume_grace: float
) -> AbstractContextManager[tuple[ServerProcess, ServerProcess]]:
    """Two small servers for live delivery and resume across instances."""
    return server_pair(
        redis_url,
        prefix,
        *("--ws-resume-grace", str(resume_grace), "--skip-quality-gate", "--max-batch", "4"),
        *("--max-context", "1024", "--threads-per-worker", "1"),
        *("--log-level", "warning"),
    )
