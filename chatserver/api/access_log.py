"""Access log lines without session ids or API keys.

A session id is a bearer credential (whoever has it reads the conversation)
and it travels in URLs (`/ws?session_id=…`, `/v1/sessions/{id}`), which
aiohttp's access log writes at INFO; so may an API key (`/ws?api_key=…`, for
browsers). This filter rewrites each line before it is emitted.

A request aiohttp cannot parse (a control character in its URL, a broken
header) never reaches the app: aiohttp answers 400 itself and logs the error
at ERROR with a traceback that quotes the raw request line, keys and session
ids included. That is the client's fault, and anyone can send it; it becomes
one INFO line naming the error only.

Successful health probes (`GET /healthz`, `/readyz` answering below 400) get
no line: a load balancer probing every second would bury the requests in
them, and formatting a line costs the event loop more than the probe itself
(py-spy on a server under `python -m load_tests.bench_batching --levels 1`,
which probes /healthz 20 times a second: 27 of 78 busy samples were aiohttp's
access logger, 2-core AMD EPYC, torch capability AVX2, no VNNI). A failing
probe is logged like any request.
"""

from __future__ import annotations

import logging
import re

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

REDACTED = "<redacted>"
_PATTERNS = (
    re.compile(r"(session_id=)[^&\s\"]+"),
    re.compile(r"(api_key=)[^&\s\"]+"),
    re.compile(r"(/v1/sessions/)[^\s?\"/]+"),
)


PROBE_PATHS = frozenset({"/healthz", "/readyz"})


class ProbeQuietAccessLogger(AccessLogger):
    """aiohttp's access log, less the lines of successful health probes."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if response.status < 400 and request.path in PROBE_PATHS:
            return
        super().log(request, response, time)


def redact(line: str) -> str:
    for pattern in _PATTERNS:
        line = pattern.sub(r"\g<1>" + REDACTED, line)
    return line


class RedactSessionIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


class UnparsedRequests(logging.Filter):
    """aiohttp.server's record of a request it could not parse, as one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True  # the server's own failures keep their level and traceback
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "unparseable HTTP request from %s: %d %s"
        record.args = (remote, error.code, type(error).__name__)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def install(logger_name: str = "aiohttp.access", server_logger: str = "aiohttp.server") -> None:
    """Add the filters once to aiohttp's access and server loggers."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactSessionIds) for f in logger.filters):
        logger.addFilter(RedactSessionIds())
    logger = logging.getLogger(server_logger)
    if not any(isinstance(f, UnparsedRequests) for f in logger.filters):
        logger.addFilter(UnparsedRequests())
