"""A ``/healthz`` prober: event-loop responsiveness while the server is under load.

``/healthz`` does no work, so its latency is the time the server's event loop takes to
get to a new request. The prober is open-loop: it starts a probe every ``1/rate``
seconds whether or not earlier ones have answered, on its own connection pool, so a
stalled loop shows up as latency rather than as fewer probes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp

from load_tests.clients.base import error_kind
from load_tests.stats import distribution


class HealthProber:
    """``async with HealthProber(url, rate=20) as p: ...`` then ``p.summary()``."""

    def __init__(self, base_url: str, rate: float = 20.0, timeout: float = 30.0) -> None:
        if rate <= 0:
            raise ValueError("probe rate must be positive")
        self.url = base_url + "/healthz"
        self.interval = 1.0 / rate
        self.timeout = timeout
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task | None = None
        self._probes: set[asyncio.Task] = set()

    async def __aenter__(self) -> HealthProber:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        self._loop_task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._loop_task is not None and self._session is not None
        self._loop_task.cancel()
        try:
            await self._loop_task
        except asyncio.CancelledError:
            pass
        if self._probes:  # let the ones in flight answer: they are the slow ones
            await asyncio.wait(self._probes, timeout=self.timeout)
        await self._session.close()

    async def _run(self) -> None:
        next_at = time.perf_counter()
        while True:
            task = asyncio.create_task(self._probe())
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async def _probe(self) -> None:
        assert self._session is not None
        start = time.perf_counter()
        try:
            async with self._session.get(self.url) as r:
                await r.read()
                if r.status != 200:
                    self.errors[f"http_{r.status}"] += 1
                    return
        except Exception as e:  # noqa: BLE001 - counted by kind
            self.errors[error_kind(e)] += 1
            return
        self.latencies.append(time.perf_counter() - start)

    def summary(self) -> dict[str, Any]:
        """Latency in ms (count, mean, p50, p90, p99, max) and failed probes by kind."""
        return {
            "rate": 1.0 / self.interval,
            "latency_ms": distribution(self.latencies, 1000.0),
            "errors": dict(sorted(self.errors.items())),
        }
