"""Limits on what one client, and all clients together, may ask of the server.

Now: ``throttle.FrameThrottle`` paces the frames one WebSocket may send, and
``inflight.InFlight`` knows the generations under way (drained at shutdown).

Planned (names reserved, not built yet): ``admission.AdmissionQueue``, a
bounded queue in front of the engine that refuses work it could not start
soon with ``Overloaded`` (HTTP 429 for one client over its quota, 503 when the
server is full), each carrying a ``retry_after`` the handlers put in a
``Retry-After`` header or the WebSocket error frame.
"""

from chatserver.limits.inflight import InFlight
from chatserver.limits.throttle import FrameThrottle

__all__ = ["FrameThrottle", "InFlight"]
