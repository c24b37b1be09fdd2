"""Drive a client: fixed concurrency or Poisson arrivals, bounded by count and/or time.

Fixed concurrency (closed loop): ``concurrency`` workers each send their next request as
soon as the last one finishes. Rate (open loop): requests start at Poisson arrival times
of ``rate`` per second whether or not earlier ones have finished, optionally capped at
``concurrency`` in flight (like ``vllm bench serve --max-concurrency``). Either way no
new request starts after ``requests`` have been sent or ``duration`` seconds have passed;
those in flight are waited for.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from load_tests.clients import Client, open_client
from load_tests.probe import HealthProber
from load_tests.prompts import prompt_for
from load_tests.stats import RequestResult, summarize


@dataclass(frozen=True)
class LoadSpec:
    """One pass. ``concurrency``: workers (fixed mode) or the in-flight cap (rate mode;
    None for none)."""

    concurrency: int | None = 1
    requests: int | None = None
    duration: float | None = None
    rate: float | None = None
    max_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests is None and self.duration is None:
            raise ValueError("a pass needs a request count, a duration, or both")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.rate is None and (self.concurrency is None or self.concurrency < 1):
            raise ValueError("concurrency must be at least 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def poisson_arrivals(rate: float, seed: int = 0) -> Iterator[float]:
    """Start times (seconds from the start of the pass) of a Poisson process of ``rate``/s."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def arrival_schedule(
    rate: float, *, requests: int | None = None, duration: float | None = None, seed: int = 0
) -> list[float]:
    """The first ``requests`` Poisson start times, those before ``duration``, or both bounds."""
    if requests is None and duration is None:
        raise ValueError("an arrival schedule needs a request count or a duration")
    times = poisson_arrivals(rate, seed)
    if duration is not None:
        times = itertools.takewhile(lambda t: t < duration, times)
    return list(itertools.islice(times, requests))


SendOne = Callable[[int], Awaitable[None]]  # send request i and record its result


@dataclass
class LoadOutcome:
    results: list[RequestResult]
    duration: float


async def run_load(
    client: Client,
    prompts: Sequence[str],
    spec: LoadSpec,
    *,
    progress: bool = False,
    desc: str = "",
) -> LoadOutcome:
    """Run one pass; every request is a fresh conversation with a distinct prompt."""
    results: list[RequestResult] = []
    bar = tqdm(
        total=spec.requests,
        desc=desc or client.mode,
        unit="req",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        result = await client.request(prompt_for(prompts, i), spec.max_tokens, f"lt-{i}")
        results.append(result)
        if not result.ok:
            failed += 1
            bar.set_postfix(errors=failed, refresh=False)
        bar.update(1)

    start = time.perf_counter()
    deadline = None if spec.duration is None else start + spec.duration
    try:
        if spec.rate is None:
            await _closed_loop(one, spec, deadline)
        else:
            await _open_loop(one, spec, start)
    finally:
        bar.close()
    return LoadOutcome(results, time.perf_counter() - start)


async def _closed_loop(one: SendOne, spec: LoadSpec, deadline: float | None) -> None:
    counter: Iterator[int] = (
        itertools.count() if spec.requests is None else iter(range(spec.requests))
    )

    async def worker() -> None:
        while deadline is None or time.perf_counter() < deadline:
            i = next(counter, None)
            if i is None:
                return
            await one(i)

    assert spec.concurrency is not None
    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))


async def _open_loop(one: SendOne, spec: LoadSpec, start: float) -> None:
    assert spec.rate is not None
    limit = asyncio.Semaphore(spec.concurrency) if spec.concurrency else None

    async def capped(i: int) -> None:
        if limit is None:
            await one(i)
            return
        async with limit:
            await one(i)

    tasks = []
    schedule = arrival_schedule(
        spec.rate, requests=spec.requests, duration=spec.duration, seed=spec.seed
    )
    for i, at in enumerate(schedule):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        tasks.append(asyncio.create_task(capped(i)))
    await asyncio.gather(*tasks)


class WarmupFailed(RuntimeError):
    """The server did not answer the test request sent before a pass."""


async def warm_up(client: Client, max_tokens: int = 8) -> RequestResult:
    """One request before measuring, so first-use costs are not counted and a dead
    server is reported at once rather than as N errors."""
    result = await client.request("Say hello.", max_tokens, "lt-warmup")
    if not result.ok:
        raise WarmupFailed(f"test request failed: {result.error}")
    return result


async def warm_server(
    base_url: str,
    mode: str,
    count: int = 1,
    *,
    request_timeout: float = 300.0,
    fresh_connections: bool = False,
) -> None:
    """``count`` unmeasured test requests on their own client (see ``warm_up``)."""
    async with open_client(
        mode, base_url, request_timeout=request_timeout, fresh_connections=fresh_connections
    ) as client:
        for _ in range(count):
            await warm_up(client)


async def run_pass(
    base_url: str,
    mode: str,
    spec: LoadSpec,
    prompts: Sequence[str],
    *,
    request_timeout: float = 300.0,
    model: str | None = None,
    warmup: int = 1,
    probe_rate: float | None = None,
    progress: bool = False,
    desc: str = "",
    fresh_connections: bool = False,
) -> dict[str, Any]:
    """Warm up, run one pass (with a ``/healthz`` prober alongside if ``probe_rate``),
    and return its summary (with a ``healthz`` entry when probed)."""
    async with open_client(
        mode,
        base_url,
        request_timeout=request_timeout,
        model=model,
        fresh_connections=fresh_connections,
    ) as client:
        for _ in range(warmup):
            await warm_up(client, min(8, spec.max_tokens))
        if probe_rate:
            async with HealthProber(base_url, probe_rate) as prober:
                outcome = await run_load(client, prompts, spec, progress=progress, desc=desc)
        else:
            outcome = await run_load(client, prompts, spec, progress=progress, desc=desc)
    summary = summarize(
        outcome.results,
        outcome.duration,
        mode=mode,
        concurrency=spec.concurrency,
        rate=spec.rate,
        max_tokens=spec.max_tokens,
    )
    if probe_rate:
        summary["healthz"] = prober.summary()
    return summary
