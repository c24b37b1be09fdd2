"""What can go wrong in the engine, as domain errors; ``api/errors.py`` maps them to HTTP once.

Admission's ``ServerBusy`` lives with the queue that raises it
(``chatserver.limits.admission``).
"""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine could not serve; the message is for the client."""


class NotReady(EngineError):
    """No worker can take the request yet (model loading, or every worker down)."""


class GenerationFailed(EngineError):
    """The model failed while generating this reply (a worker died, sampling failed)."""

    def __init__(self, message: str = "the model failed to generate a reply") -> None:
        super().__init__(message)


class WorkerUnavailable(EngineError):
    """No live worker can take the request now (every one is restarting); retry later."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("no model worker is available right now (restarting); retry shortly")
        self.retry_after = retry_after


class WorkerLost(EngineError):
    """The worker running this request died or stalled; the request may be sent again."""

    def __init__(self) -> None:
        super().__init__("the model worker running this request failed; send it again")


class ReplyInterrupted(EngineError):
    """The server stopped before the reply was complete (OpenAI has no finish reason for it)."""

    def __init__(self) -> None:
        super().__init__("the server shut down before the reply was complete; send it again")


class RequestTimedOut(EngineError):
    """The request spent longer than --request-timeout queued and generating."""

    def __init__(self, timeout: float) -> None:
        super().__init__(
            f"the request took longer than {timeout:g} s (--request-timeout) and was stopped"
        )
        self.timeout = timeout


class InvalidGrammar(EngineError):
    """A structured-output constraint (schema, regex, grammar) that does not compile.

    The API that built it says which of its parameters it came from (``param``).
    """
