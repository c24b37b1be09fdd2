"""Thread and inline hosts for a WorkerCore: demonstrations of what not to do.

`--engine thread` runs the decoding loop in a thread of the server process:
torch releases the GIL inside big kernels, but the per-op Python between them
fights the event loop for the GIL. `--engine inline` runs it on the event loop
itself, so every decoding step blocks every client. `load_tests/strategies.py`
measures both against the process engines; neither is for production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable

from chatserver.protocol.worker import (
    ServerToWorker,
    Shutdown,
    WorkerConfig,
    WorkerToServer,
)
from chatserver.workers import cpu_features
from chatserver.workers.core import WorkerCore, build_core, load_failure

log = logging.getLogger(__name__)


class ThreadWorker:
    def __init__(self, worker_id: int, config: WorkerConfig) -> None:
        self.worker_id = worker_id
        self.config = config
        self._inbox: queue.SimpleQueue[ServerToWorker] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerToServer], None],
        on_exit: Callable[[int], None],
    ) -> None:
        # In-process: the switches hold only if set before torch first runs a kernel.
        os.environ.update(cpu_features.isa_env(self.config.cpu_isa))

        def run() -> None:
            try:
                core, ready = build_core(self.worker_id, self.config)
            except Exception as exc:
                log.exception("thread worker failed to load")
                loop.call_soon_threadsafe(on_message, load_failure(self.worker_id, exc))
                return
            loop.call_soon_threadsafe(on_message, ready)
            inbox = self._inbox
            core.serve(
                inbox.get,
                lambda: not inbox.empty(),
                lambda out: loop.call_soon_threadsafe(on_message, out),
            )

        self._thread = threading.Thread(target=run, name="thread-worker", daemon=True)
        self._thread.start()

    def send(self, msg: ServerToWorker) -> None:
        self._inbox.put(msg)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def kill(self) -> None:
        log.error("thread worker %d is stuck; a thread cannot be killed", self.worker_id)

    async def stop(self, grace: float = 10.0) -> None:
        self.send(Shutdown())
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, grace)


class InlineWorker:
    """Decodes on the event loop: one blocking step, then yield, while work remains."""

    def __init__(self, worker_id: int, config: WorkerConfig) -> None:
        self.worker_id = worker_id
        self.config = config
        self._core: WorkerCore | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerToServer], None],
        on_exit: Callable[[int], None],
    ) -> None:
        os.environ.update(cpu_features.isa_env(self.config.cpu_isa))  # as ThreadWorker
        self._core, ready = build_core(self.worker_id, self.config)  # blocks the loop, by design
        on_message(ready)

        async def run() -> None:
            core = self._core
            assert core is not None
            while True:
                await self._wake.wait()
                self._wake.clear()
                while core.has_work:
                    out = core.step()  # blocking, on the loop
                    if not out.empty:
                        on_message(out)
                    await asyncio.sleep(0)

        self._task = loop.create_task(run())

    def send(self, msg: ServerToWorker) -> None:
        if self._core is not None:
            self._core.apply(msg)
            self._wake.set()

    @property
    def alive(self) -> bool:
        return self._core is not None

    def kill(self) -> None:
        """Never stalls unnoticed: it runs on the event loop itself."""

    async def stop(self, grace: float = 10.0) -> None:
        if self._task is not None:
            self._task.cancel()
