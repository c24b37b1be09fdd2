"""Limits on what one client, and all clients together, may ask of the server.

Now: ``throttle.FrameThrottle`` paces the frames one WebSocket may send,
``inflight.InFlight`` knows the generations under way (drained at shutdown),
and ``rate.RateLimiter`` holds each client to its requests and generated
tokens per minute (``RateLimited``: HTTP 429 with ``Retry-After``).

Planned (names reserved, not built yet): ``admission.AdmissionQueue``, a
bounded queue in front of the engine that refuses work it could not start
soon with ``Overloaded`` (503 when the server is full), carrying a
``retry_after`` the handlers put in a ``Retry-After`` header or the WebSocket
error frame, as they do for ``RateLimited``.
"""

from chatserver.limits.inflight import InFlight
from chatserver.limits.throttle import FrameThrottle

__all__ = ["FrameThrottle", "InFlight"]
