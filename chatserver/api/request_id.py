"""Request ids: one per HTTP request (and per WebSocket, from its upgrade request).

The id is the client's ``X-Request-Id`` when that is 1-64 characters of
``[A-Za-z0-9._:-]`` (so a proxy's or a client's id threads through our logs),
else a fresh one. Every response echoes it in ``X-Request-Id``, error bodies
carry it as ``error.request_id`` (api/errors.py) and WebSocket error frames as
``request_id`` (api/ws.py); a context variable gives it to every log record
written while the request is handled, and logging_setup() writes it out as
text or JSON lines (``--log-format``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

HEADER = "X-Request-Id"
REQUEST_ID = web.RequestKey("request_id", str)
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# aiohttp runs each request in its own task, with its own copy of the context,
# so a value set here is the request's alone (and the tasks it starts inherit it).
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)


def choose_request_id(offered: str | None) -> str:
    """The client's id if it is sane, else a new one."""
    if offered is not None and _SANE.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


def request_id_of(request: web.Request) -> str | None:
    """The id request_id_middleware gave this request (None before it ran)."""
    return request.get(REQUEST_ID)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: give the request its id before anything can log or fail."""
    request_id = choose_request_id(request.headers.get(HEADER))
    request[REQUEST_ID] = request_id
    current_request_id.set(request_id)  # left set: the access log line is written after
    return await handler(request)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the header goes on every response, streamed ones and errors too."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[HEADER] = request_id


def setup(app: web.Application) -> None:
    """Echo ids on responses; the middleware itself is put first in build_app's list."""
    app.on_response_prepare.append(echo_request_id)


# --- logging -----------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request being handled (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def logging_setup(level: str, log_format: str = "text") -> None:
    """The server process's logging: one stderr handler, records stamped with request ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
