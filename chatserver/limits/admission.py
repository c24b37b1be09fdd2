"""Admission control: a bounded number of requests in the engine, refused beyond it.

Without a bound every request is accepted and queued, so under overload
everyone's time to first token grows without limit. Here a request is
admitted only while the requests already admitted fit the running slots
(sequences the workers decode at once) plus a waiting queue; beyond that it
is refused at once with ``ServerBusy``, before any prompt is rendered or
tokenized, and told when to retry.

The retry hint comes from how fast the engine has been finishing requests
lately: the requests that would be ahead of a retry, divided by the recent
completion rate.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

# Completions remembered for the drain rate, and how old one may be to count.
RATE_WINDOW = 64
RATE_MAX_AGE_S = 60.0
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 60.0


class ServerBusy(Exception):
    """Every running slot and every queue place is taken; retry after ``retry_after`` s."""

    def __init__(self, admitted: int, capacity: int, retry_after: float) -> None:
        super().__init__(
            f"the server is at capacity ({admitted} requests running or queued of {capacity}); "
            f"retry in {math.ceil(retry_after)} s"
        )
        self.retry_after = retry_after


class Ticket:
    """One admitted request's place; released once when its generation ends (or never starts)."""

    __slots__ = ("_queue", "admitted_at", "released")

    def __init__(self, queue: AdmissionQueue, admitted_at: float) -> None:
        self._queue = queue
        self.admitted_at = admitted_at
        self.released = False

    def release(self, completed: bool = False) -> None:
        """Give the place back; ``completed`` replies count towards the drain rate."""
        if not self.released:
            self.released = True
            self._queue._release(completed)


class AdmissionQueue:
    """Counts admitted requests against ``running slots + max_queue``.

    The running slots are passed at each admission because they change as
    workers become ready, die and restart.
    """

    def __init__(self, max_queue: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_queue = max(0, max_queue)
        self.admitted = 0
        self._clock = clock
        self._completions: deque[float] = deque(maxlen=RATE_WINDOW)

    def admit(self, running_slots: int) -> Ticket:
        """A place for one more request, or ServerBusy."""
        return self.admit_many(running_slots, 1)[0]

    def admit_many(self, running_slots: int, count: int) -> list[Ticket]:
        """Places for ``count`` generations of one request, all or none (ServerBusy):
        a request's ``n`` choices never start partly."""
        capacity = max(0, running_slots) + self.max_queue
        if self.admitted + count > capacity:
            raise ServerBusy(self.admitted, capacity, self.retry_after(running_slots))
        self.admitted += count
        now = self._clock()
        return [Ticket(self, now) for _ in range(count)]

    def waiting(self, running_slots: int) -> int:
        """Admitted requests beyond the running slots: those waiting for a slot."""
        return max(0, self.admitted - max(0, running_slots))

    def drain_rate(self) -> float | None:
        """Requests completed per second lately, or None before there is a rate to tell."""
        now = self._clock()
        while self._completions and now - self._completions[0] > RATE_MAX_AGE_S:
            self._completions.popleft()
        if len(self._completions) < 2:
            return None
        span = max(now, self._completions[-1]) - self._completions[0]
        return (len(self._completions) - 1) / span if span > 0 else None

    def retry_after(self, running_slots: int) -> float:
        """Seconds until a place is likely free: the queue ahead over the drain rate."""
        rate = self.drain_rate()
        if rate is None:
            # Nothing finished lately: every slot is held by a long reply. Promise
            # little; the client asks again soon and gets a better estimate.
            return RETRY_AFTER_MIN_S
        ahead = self.waiting(running_slots) + 1
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, ahead / rate))

    def _release(self, completed: bool) -> None:
        self.admitted -= 1
        if completed:
            self._completions.append(self._clock())
