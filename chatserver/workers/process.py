"""ProcessWorker: a WorkerCore in its own process, started with multiprocessing's spawn.

Spawn, not fork: the worker owns torch's threads (and its GPU) from a fresh
interpreter. The context is the standard library's, which is also what
`torch.multiprocessing.get_context("spawn")` returns; torch's module adds only
sharing tensors through queues, and no tensor crosses this pipe (the
protocol's dataclasses carry token ids and floats). Importing it would make
the server import torch before its first spawn: 1.5 s of every start
(workers/devices.py).

The process owns its model (and its device, for the GPU worker). When idle it
blocks in `recv()` on its pipe, so an idle server burns no CPU; while it has
work it drains the pipe between steps and sends one `StepOutput` per step.

On the server side a sender thread and a reader thread own the pipe ends, so
the event loop never blocks on a full pipe; the reader hands messages to the
loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatserver.workers.core import WorkerCore

from chatserver.protocol.worker import (
    ServerToWorker,
    Shutdown,
    WorkerConfig,
    WorkerToServer,
)
from chatserver.workers import cpu_features

log = logging.getLogger(__name__)


def worker_main(worker_id: int, config: WorkerConfig, conn: Connection, log_level: int) -> None:
    """Entry point of the worker process."""
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s worker-{worker_id} %(levelname)s %(message)s"
    )
    if config.nice:
        os.nice(config.nice)
    from chatserver.workers.core import build_core, load_failure

    try:
        core, ready = build_core(worker_id, config)
    except Exception as exc:  # tell the server why, instead of dying silently
        failure = load_failure(worker_id, exc)
        if failure.fatal:  # a verdict (quality gate), not a crash: no traceback
            log.error("worker %d: %s", worker_id, failure.message)
        else:
            log.exception("worker %d failed to load", worker_id)
        conn.send(failure)
        return
    conn.send(ready)
    _serve(core, conn)
    # Skip the interpreter's teardown: collecting the model's, tokenizers' and
    # grammar's objects took 1.3 s of every shutdown (engine.stop timed around
    # tests/test_app.py's shutdown on the 2-core AMD EPYC, torch capability AVX512,
    # VNNI avx512_vnni; 0.21 s without it), against --shutdown-timeout's budget.
    logging.shutdown()
    os._exit(0)


def _serve(core: WorkerCore, conn: Connection) -> None:
    try:
        core.serve(conn.recv, conn.poll, conn.send)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the server went away


class ProcessWorker:
    def __init__(self, worker_id: int, config: WorkerConfig) -> None:
        self.worker_id = worker_id
        self.config = config
        self._outbox: queue.SimpleQueue[ServerToWorker | None] = queue.SimpleQueue()
        self._process: mp.Process | None = None
        self._conn: Connection | None = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerToServer], None],
        on_exit: Callable[[int], None],
    ) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._conn = parent
        self._process = ctx.Process(
            target=worker_main,
            args=(self.worker_id, self.config, child, logging.getLogger().level),
            name=f"chatserver-worker-{self.worker_id}",
            daemon=True,
        )
        # The spawned interpreter inherits os.environ as it is now.
        with cpu_features.isa_environment(self.config.cpu_isa):
            self._process.start()
        child.close()

        process = self._process

        def read() -> None:
            try:
                while True:
                    msg = parent.recv()
                    loop.call_soon_threadsafe(on_message, msg)
            except (EOFError, OSError):
                pass
            # The worker is gone: end the writer, close the pipe, reap the process,
            # so that restarts leave no thread, descriptor or zombie behind.
            self._outbox.put(None)
            parent.close()
            process.join(5)
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_exit, self.worker_id)

        def write() -> None:
            while (msg := self._outbox.get()) is not None:
                try:
                    parent.send(msg)
                except (OSError, ValueError):
                    return

        threading.Thread(target=read, name=f"worker-{self.worker_id}-reader", daemon=True).start()
        threading.Thread(target=write, name=f"worker-{self.worker_id}-writer", daemon=True).start()

    def send(self, msg: ServerToWorker) -> None:
        self._outbox.put(msg)

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def kill(self) -> None:
        if self._process is not None and self._process.pid is not None:
            # SIGKILL also ends a stopped (SIGSTOP) process.
            self._process.kill()

    async def stop(self, grace: float = 10.0) -> None:
        self.send(Shutdown())
        self._outbox.put(None)
        process = self._process
        if process is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, process.join, grace)
        if process.is_alive():
            process.kill()
            await loop.run_in_executor(None, process.join, 5)
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
