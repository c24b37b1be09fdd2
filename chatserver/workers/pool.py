"""WorkerPool: the engine's workers, wherever they run, and what keeps them serving.

The engine (engine/engine.py) is the async front: prompts, streams, text.
This module owns the rest of what it takes to have workers at all:

* **hosts**: one `WorkerHost` per worker (`host_class` picks process, thread,
  inline or Ray by --engine), started with the loop's callbacks;
* **state**: which workers are ready, loading or restarting, how many
  sequences each holds, their KV cache figures (/readyz);
* **placement**: a new sequence goes to the worker caching its longest
  prompt prefix unless that one is much busier (`place`);
* **supervision**: a worker that dies is restarted (at once for the first
  few deaths, then with a doubling delay), one that makes no step while it
  has work is killed by the stall watchdog; the engine is told through
  `on_lost` so it can re-route or fail that worker's sequences.

It knows no streams, prompts or text: sequences are worker ids and counts here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

from chatserver.metrics import Metrics
from chatserver.protocol.worker import (
    ServerToWorker,
    StepOutput,
    WorkerConfig,
    WorkerFailed,
    WorkerReady,
    WorkerToServer,
)
from chatserver.workers.host import WorkerHost
from chatserver.workers.kv_cache import block_hashes, extend_hashes

log = logging.getLogger(__name__)

# A worker that keeps dying (out of memory at load, say) is restarted after a
# delay that doubles with each death in the window (the first few at once),
# up to the cap; healthy workers keep serving meanwhile.
RESTART_WINDOW_S = 60.0
RESTARTS_AT_ONCE = 2
RESTART_DELAY_MAX_S = 30.0  # the first delay is --worker-restart-delay
# Block hashes whose worker the pool remembers for prefix affinity (place):
# 16-token blocks, so about a million tokens of conversations.
BLOCK_OWNERS_KEPT = 1 << 16
# How often the stall watchdog looks at the workers.
WATCHDOG_PERIOD_S = 0.5


def host_class(engine_kind: str) -> type:
    """The WorkerHost implementation for --engine (after "auto" was resolved)."""
    if engine_kind == "ray":
        from chatserver.workers.ray_worker import RayWorker

        return RayWorker
    if engine_kind in ("thread", "inline"):
        # These run the core in the server's process, so they import torch here.
        from chatserver.workers.local import InlineWorker, ThreadWorker

        return ThreadWorker if engine_kind == "thread" else InlineWorker
    from chatserver.workers.process import ProcessWorker  # torch only in the worker

    return ProcessWorker


class WorkerPool:
    def __init__(
        self,
        *,
        max_running: int,
        prefix_cache: bool,
        restart_delay: float,
        metrics: Metrics,
    ) -> None:
        self.max_running = max_running
        self.prefix_cache = prefix_cache
        self.restart_delay = restart_delay
        self.metrics = metrics
        self.hosts: dict[int, WorkerHost] = {}
        self.ready_ids: set[int] = set()
        self.load: dict[int, int] = defaultdict(int)  # worker -> sequences it holds
        self.failure: str | None = None
        # Set when a worker cannot load and retrying cannot help (quality gate,
        # unavailable dtype): the server process exits instead of never getting ready.
        self.fatal = asyncio.Event()
        # worker -> its KV cache's latest figures (StepOutput's kv_* and prefix_*).
        self.kv_stats: dict[int, dict[str, int]] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[WorkerToServer], None] = lambda msg: None
        self._on_lost: Callable[[int], None] = lambda worker_id: None
        self._deaths: list[float] = []  # when workers died, within RESTART_WINDOW_S
        self._restart_at: dict[int, float] = {}  # dead worker -> when it is restarted
        # worker -> when it last showed progress (a step), or got work while idle.
        self._last_progress: dict[int, float] = {}
        self._watchdog: asyncio.Task | None = None
        self._block_owner: OrderedDict[int, int] = OrderedDict()  # block hash -> worker

    # --- lifecycle -------------------------------------------------------------
    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        hosts: dict[int, WorkerHost],
        on_message: Callable[[WorkerToServer], None],
        on_lost: Callable[[int], None],
        stall_timeout: float = 0.0,
    ) -> None:
        """Start every host. ``on_message`` gets every worker message after the pool
        has taken its state from it; ``on_lost(worker_id)`` runs when a worker died
        with sequences the engine must re-route or fail (before it is restarted)."""
        self._loop = loop
        self._on_message, self._on_lost = on_message, on_lost
        self.hosts.update(hosts)
        for host in hosts.values():
            host.start(loop, self._receive, self._exited)
        if stall_timeout > 0:
            self._watchdog = asyncio.create_task(self._watch_stalls(stall_timeout))

    async def stop(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(h.stop() for h in self.hosts.values()), return_exceptions=True)

    # --- state -----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """At least one worker serves: requests go to the ready ones while others reload."""
        return bool(self.ready_ids) and not self._stopping

    def serving(self, excluding: int | None = None) -> list[int]:
        """Workers that take new sequences now."""
        return [w for w in self.ready_ids if w != excluding and self.hosts[w].alive]

    def restart_wait(self) -> float | None:
        """Seconds until a dead worker is back (None: none is dead or restarting)."""
        dead = any(not self.hosts[w].alive for w in self.ready_ids)
        if not (self._restart_at or dead) or self._stopping:
            return None
        now = time.monotonic()
        return max(0.0, min(self._restart_at.values(), default=now) - now)

    def states(self) -> list[dict[str, Any]]:
        """Each worker's state for /readyz: ready, loading, or restarting (and when)."""
        now = time.monotonic()
        states = []
        for wid in sorted(self.hosts):
            state: dict[str, Any] = {"worker": wid, "generations": self.load[wid]}
            if wid in self.ready_ids:
                state["state"] = "ready"
            elif wid in self._restart_at:
                state["state"] = "restarting"
                state["restart_in_s"] = round(max(0.0, self._restart_at[wid] - now), 1)
            else:
                state["state"] = "loading"
            if wid in self.kv_stats:
                state["kv_cache"] = self.kv_stats[wid]
            details = getattr(self.hosts[wid], "details", None)  # a shared Ray actor's totals
            if details is not None:
                state.update(details())
            states.append(state)
        return states

    def kv_cache_usage(self) -> float:
        """Token positions holding running sequences over the workers' KV budgets, together.

        Workers whose runner has no budget (HFRunner) are left out.
        """
        budgeted = [s for s in self.kv_stats.values() if s["kv_budget"]]
        allocated = sum(s["kv_budget"] for s in budgeted)
        return sum(s["kv_used"] for s in budgeted) / allocated if allocated else 0.0

    # --- sequences ---------------------------------------------------------------
    def place(self, prompt_ids: list[int], serving: list[int]) -> tuple[int, list[int]]:
        """The worker for a new sequence, and the prompt's block hashes if it computed them.

        Session affinity without sessions: the pool remembers which worker
        last held each block of each finished sequence (content-addressed, the
        workers' own block hashes), so a conversation's next turn, whatever
        API it came through, goes where its history is cached. That worker is
        passed over when it runs max(2, --max-running / 4) or more sequences
        beyond the least-loaded one: recomputing a prefix costs less than
        queueing. Hashing stays on the loop: 67 µs for a 4,096-token prompt
        (`python -m timeit` of block_hashes on the Intel(R) Xeon(R), torch
        capability AVX512), once a request, and only with several workers.
        """
        least = min(serving, key=lambda w: self.load[w])
        if len(serving) == 1 or not self.prefix_cache:
            return least, []
        hashes = block_hashes(prompt_ids)
        holder = -1
        for h in hashes:
            owner = self._block_owner.get(h)
            if owner is None:
                break
            holder = owner
        slack = max(2, self.max_running // 4)
        if holder in serving and self.load[holder] - self.load[least] < slack:
            return holder, hashes
        return least, hashes

    def assign(self, worker_id: int, msg: ServerToWorker) -> None:
        """Give a worker one more sequence (``msg`` its request)."""
        if not self.load[worker_id]:
            self._last_progress[worker_id] = time.monotonic()  # the stall clock starts
        self.load[worker_id] += 1
        self.hosts[worker_id].send(msg)

    def release(self, worker_id: int) -> None:
        """A sequence of this worker's ended (finished, cancelled or failed)."""
        self.load[worker_id] -= 1

    def send(self, worker_id: int, msg: ServerToWorker) -> None:
        host = self.hosts.get(worker_id)
        if host is not None:
            host.send(msg)

    def remember_blocks(self, worker_id: int, hashes: list[int], tokens: list[int]) -> None:
        """Record that ``worker_id`` now caches ``tokens`` (``hashes``: their leading
        blocks' hashes if known), for place()."""
        if len(self.hosts) < 2 or not self.prefix_cache:
            return
        owners = self._block_owner
        for h in extend_hashes(hashes, tokens, len(tokens)):
            owners[h] = worker_id
            owners.move_to_end(h)
        while len(owners) > BLOCK_OWNERS_KEPT:
            owners.popitem(last=False)

    # --- worker messages -----------------------------------------------------------
    def _receive(self, msg: WorkerToServer) -> None:
        if isinstance(msg, StepOutput):
            self._last_progress[msg.worker_id] = time.monotonic()
            self._observe_cache(msg)
        elif isinstance(msg, WorkerReady):
            self.ready_ids.add(msg.worker_id)
            self._restart_at.pop(msg.worker_id, None)
            if not self.fatal.is_set():
                self.failure = None  # a worker serves again
        elif isinstance(msg, WorkerFailed):
            self.failure = f"worker {msg.worker_id} failed: {msg.message}"
            log.error(self.failure)
            if msg.fatal:
                self.fatal.set()
        self._on_message(msg)

    def _observe_cache(self, out: StepOutput) -> None:
        # Cumulative per worker; a restarted worker counts from 0 again.
        seen = self.kv_stats.get(out.worker_id, {})
        if out.prefix_queries < seen.get("prefix_queries", 0):
            seen = {}
        self.metrics.prefix_cache_queries.inc(out.prefix_queries - seen.get("prefix_queries", 0))
        self.metrics.prefix_cache_hits.inc(out.prefix_hits - seen.get("prefix_hits", 0))
        self.kv_stats[out.worker_id] = {
            "prefix_queries": out.prefix_queries,
            "prefix_hits": out.prefix_hits,
            "kv_used": out.kv_used,
            "kv_retained": out.kv_retained,
            "kv_budget": out.kv_allocated,
        }

    # --- supervision -------------------------------------------------------------
    def _exited(self, worker_id: int) -> None:
        self.ready_ids.discard(worker_id)
        self.kv_stats.pop(worker_id, None)
        if self._stopping:
            return
        self._on_lost(worker_id)
        if self.fatal.is_set() or self._loop is None:
            return  # it cannot serve as configured: the server is exiting
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
        extra = len(self._deaths) - RESTARTS_AT_ONCE
        first = self.restart_delay
        delay = 0.0 if extra <= 0 else min(RESTART_DELAY_MAX_S, first * 2.0 ** (extra - 1))
        log.error(
            "worker %d exited; its streams failed; restarting it in %.0f s (%d deaths in %.0f s)",
            worker_id,
            delay,
            len(self._deaths),
            RESTART_WINDOW_S,
        )
        self._restart_at[worker_id] = now + delay
        self._loop.call_later(delay, self._restart, worker_id)

    def _restart(self, worker_id: int) -> None:
        if self._stopping or self._loop is None:
            return
        old = self.hosts[worker_id]
        host = type(old)(worker_id, old.config)
        self.hosts[worker_id] = host
        self.metrics.worker_restarts.inc()
        host.start(self._loop, self._receive, self._exited)

    async def _watch_stalls(self, stall_s: float) -> None:
        """Kill a worker that has work but shows no step for ``stall_s`` seconds.

        A stuck worker (a hung kernel, SIGSTOP) would otherwise hold its
        clients forever while /readyz says 200; killed, it is restarted like a
        crashed one and its clients are told ``worker_failed``.
        """
        while True:
            await asyncio.sleep(min(WATCHDOG_PERIOD_S, stall_s / 4))
            now = time.monotonic()
            for wid, host in list(self.hosts.items()):
                if wid not in self.ready_ids or not self.load[wid]:
                    continue
                idle = now - self._last_progress.get(wid, now)
                if idle > stall_s:
                    log.error(
                        "worker %d made no step for %.1f s with %d generation(s); killing it",
                        wid,
                        idle,
                        self.load[wid],
                    )
                    self.ready_ids.discard(wid)
                    host.kill()


def hosts_for(engine_kind: str, configs: list[WorkerConfig]) -> dict[int, WorkerHost]:
    """One host per worker config, of the kind --engine asks for."""
    host_type = host_class(engine_kind)
    return {wid: host_type(wid, cfg) for wid, cfg in enumerate(configs)}
