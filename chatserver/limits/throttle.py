"""Per-connection pacing of incoming WebSocket frames.

A client that floods its socket is slowed, not dropped: the handler waits for
the throttle before it reads the next frame, so TCP back-pressure reaches the
sender and one noisy socket cannot monopolise the event loop.
"""

from __future__ import annotations

from asyncio_throttle import Throttler


class FrameThrottle:
    """At most ``rate`` frames a second (a sliding window); ``rate <= 0`` disables it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        if rate <= 0:
            self._throttler: Throttler | None = None
        elif rate >= 1:
            self._throttler = Throttler(rate_limit=rate, period=1.0)
        else:
            # Throttler counts whole frames per period: one frame per 1/rate seconds.
            self._throttler = Throttler(rate_limit=1, period=1.0 / rate)

    async def wait(self) -> None:
        """Return once one more frame may be handled."""
        if self._throttler is not None:
            await self._throttler.acquire()
