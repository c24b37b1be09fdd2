"""Refuse to load-test anything but this machine unless told to in so many words.

A load tester pointed at someone else's server is a denial-of-service tool, so the
default is loopback only (127.0.0.0/8, ``localhost``, ``::1``). Names are not resolved:
a host name other than ``localhost`` is refused even if it happens to resolve to 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


class RemoteURLRefused(ValueError):
    """The URL's host is not loopback and ``--allow-remote`` was not given."""


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` (and ``*.localhost``), 127.0.0.0/8, ``::1`` and ::ffff:127.x."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def check_url(url: str, *, allow_remote: bool = False) -> str:
    """Validate a server base URL and return it without a trailing slash.

    Raises ``ValueError`` for a malformed URL and ``RemoteURLRefused`` for a non-loopback
    host without ``allow_remote``. Sends nothing.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"--url must be http:// or https://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"--url has no host: {url!r}")
    if not allow_remote and not is_loopback_host(parts.hostname):
        raise RemoteURLRefused(
            f"refusing to load-test {parts.hostname!r}: only loopback hosts "
            "(127.0.0.0/8, localhost, ::1) unless --allow-remote is given"
        )
    return url.rstrip("/")
