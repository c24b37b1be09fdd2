"""WorkerHost: what the engine needs from wherever a WorkerCore runs.

Implemented by `process.ProcessWorker` (the real one: CPU pool and GPU worker)
and by `local.ThreadWorker` / `local.InlineWorker` (demonstrations). A host
delivers every `WorkerToServer` message to `on_message` on the event loop's
thread, and calls `on_exit(worker_id)` there if its worker dies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from chatserver.protocol.worker import ServerToWorker, WorkerConfig, WorkerToServer


class WorkerHost(Protocol):
    worker_id: int
    config: WorkerConfig

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerToServer], None],
        on_exit: Callable[[int], None],
    ) -> None: ...

    def send(self, msg: ServerToWorker) -> None:
        """Never blocks the caller (the event loop)."""
        ...

    @property
    def alive(self) -> bool:
        """False once the worker has died (before the engine's on_exit may have run)."""
        ...

    def kill(self) -> None:
        """End a stuck worker at once; on_exit follows as for a crash."""
        ...

    async def stop(self, grace: float = 10.0) -> None: ...
