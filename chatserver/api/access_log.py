"""Access log lines without session ids or API keys.

A session id is a bearer credential (whoever has it reads the conversation)
and it travels in URLs (`/ws?session_id=…`, `/v1/sessions/{id}`), which
aiohttp's access log writes at INFO; so may an API key (`/ws?api_key=…`, for
browsers). This filter rewrites each line before it is emitted.
"""

from __future__ import annotations

import logging
import re

REDACTED = "<redacted>"
_PATTERNS = (
    re.compile(r"(session_id=)[^&\s\"]+"),
    re.compile(r"(api_key=)[^&\s\"]+"),
    re.compile(r"(/v1/sessions/)[^\s?\"/]+"),
)


def redact(line: str) -> str:
    for pattern in _PATTERNS:
        line = pattern.sub(r"\g<1>" + REDACTED, line)
    return line


class RedactSessionIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


def install(logger_name: str = "aiohttp.access") -> None:
    """Add the filter once to aiohttp's access logger."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactSessionIds) for f in logger.filters):
        logger.addFilter(RedactSessionIds())
