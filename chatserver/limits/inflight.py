"""The generations under way, so that a stopping server can drain them.

Shutdown waits a grace period for running replies to finish, then cancels
the rest, so every client gets a proper end (``finish_reason`` "cancelled")
instead of a connection cut after aiohttp's own timeouts. Admission control
will count the same set.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatserver.engine.engine import GenerationStream


class InFlight:
    def __init__(self) -> None:
        self._streams: weakref.WeakSet[GenerationStream] = weakref.WeakSet()

    def add(self, stream: GenerationStream) -> GenerationStream:
        self._streams.add(stream)
        return stream

    def live(self) -> list[GenerationStream]:
        return [s for s in self._streams if not s.finished]

    async def drain(self, grace: float, poll: float = 0.05) -> int:
        """Wait up to ``grace`` seconds for live streams to end; cancel the rest; count them."""
        deadline = time.monotonic() + grace
        # Polling, once, at shutdown: a stream has no "finished" event to wait on.
        while self.live() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(poll)
        left = self.live()
        for stream in left:
            stream.interrupt()
        return len(left)
