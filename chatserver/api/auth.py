"""API keys: who may use the server, and who owns a session.

With ``--api-key`` or ``--api-keys-file`` set, every route but the public ones
(the chat page, ``/healthz``, ``/readyz``, ``/metrics`` unless
``--metrics-auth``) needs ``Authorization: Bearer KEY``. ``/ws`` also takes
the key in a ``Sec-WebSocket-Protocol`` entry ``bearer.KEY`` or in
``?api_key=`` (both for clients that cannot set headers), or, when none of
these is sent, in its first frame (``{"type": "auth", ...}``, handled in
``chatserver.api.ws``), which is how the bundled page sends it.

A valid key makes the request's ``Principal``: ``name`` (from the keys file,
or ``key-`` and a short sha256 of the key) is what logs, metrics and rate
limits call the client; ``owner`` (a longer, salted sha256 of the key) is what
sessions are stored under, the same on every server that has the key. Keys
themselves are never logged nor stored. Candidates are compared with
``hmac.compare_digest`` against every key's digest, so timing tells nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from chatserver.api.errors import error_response
from chatserver.api.request_id import request_id_of
from chatserver.api.state import METRICS
from chatserver.errors import ApiError

log = logging.getLogger(__name__)

# Routes that need no key. The page asks its user for the key itself.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz"})
PUBLIC_PREFIXES = ("/static/",)
METRICS_PATH = "/metrics"
# The WebSocket route: an upgrade without credentials is accepted, and its
# first frame must then carry the key (chatserver.api.ws).
WEBSOCKET_PATH = "/ws"
# The subprotocol a browser offers beside `bearer.KEY`, so the server has one
# to pick that does not echo the key.
SUBPROTOCOL = "chatserver"
BEARER_SUBPROTOCOL_PREFIX = "bearer."
QUERY_PARAM = "api_key"
_OWNER_SALT = b"chatserver session owner\x00"


class ApiKeysError(Exception):
    """The keys file cannot be read or parsed (at startup: the server does not start)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``name`` for logs, metrics and rate limits; ``owner`` for sessions."""

    name: str
    owner: str

    @property
    def authenticated(self) -> bool:
        return bool(self.owner)


# The caller on a server without keys (and on public routes): sessions are
# stored with owner "", which no key's owner ever equals.
ANONYMOUS = Principal("anonymous", "")

PRINCIPAL = web.RequestKey("principal", Principal)


def key_fingerprint(key: str) -> str:
    """A short sha256 of a key, safe to log; names keys that have no name."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def fingerprint(key: str) -> str:
    """How a log line names a key that may have no name (a refused one): ``sha256:1a2b3c4d``."""
    return f"sha256:{key_fingerprint(key)}"


def key_owner(key: str) -> str:
    """The session owner for a key: stable across servers, not the key, not its short hash."""
    return hashlib.sha256(_OWNER_SALT + key.encode()).hexdigest()[:32]


def _check_key(key: str, where: str) -> str:
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise ApiKeysError(f"{where}: an API key must be non-empty printable text without spaces")
    return key


def parse_keys_file(text: str, source: str) -> list[tuple[str, str]]:
    """``(name, key)`` pairs from the text of a keys file.

    One key a line, optionally ``name:key`` (split at the first colon, so a
    key without a name cannot contain one); blank lines and ``#`` comments
    are skipped.
    """
    pairs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        if not sep:
            name, key = "", line
        name, key = name.strip(), key.strip()
        key = _check_key(key, f"{source}:{number}")
        pairs.append((name or f"key-{key_fingerprint(key)}", key))
    return pairs


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal


def _entry(name: str, key: str) -> _Entry:
    return _Entry(hashlib.sha256(key.encode()).digest(), Principal(name, key_owner(key)))


class KeyRing:
    """The keys this server takes: ``--api-key`` values plus the keys file, re-read on reload()."""

    def __init__(self, keys: Iterable[str] = (), path: str = "") -> None:
        self.path = path
        self._flag_entries = [
            _entry(f"key-{key_fingerprint(k)}", _check_key(k, "--api-key")) for k in keys
        ]
        # Keys are required once any source is configured, even an empty file:
        # emptying the file must not open the server.
        self.required = bool(self._flag_entries) or bool(path)
        self._entries = list(self._flag_entries)
        if path:
            self._entries = self._flag_entries + self._read_file()
        if self.required:
            log.info("API keys required: %s", ", ".join(self.names()) or "none listed yet")

    def _read_file(self) -> list[_Entry]:
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeysError(f"cannot read --api-keys-file {self.path}: {exc}") from None
        return [_entry(name, key) for name, key in parse_keys_file(text, self.path)]

    def reload(self) -> bool:
        """Re-read the keys file; on an error keep the keys in use, log it, return False."""
        if not self.path:
            return False
        try:
            self._entries = self._flag_entries + self._read_file()
        except ApiKeysError as exc:
            log.error("API keys not reloaded, the previous ones stay in use: %s", exc)
            return False
        log.info("API keys reloaded from %s: %s", self.path, ", ".join(self.names()) or "none")
        return True

    def names(self) -> list[str]:
        return [e.principal.name for e in self._entries]

    def lookup(self, candidate: str) -> Principal | None:
        """The principal whose key this is, or None; the same time whichever key matches."""
        digest = hashlib.sha256(candidate.encode()).digest()
        found = None
        for entry in self._entries:  # no early exit
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry.principal
        return found


def principal(request: web.Request) -> Principal:
    """The caller of this request; ANONYMOUS on a server without keys and on public routes."""
    return request.get(PRINCIPAL, ANONYMOUS)


def route_path(request: web.Request) -> str | None:
    """The matched route's pattern (``/static/{name}``), None when no route matched.

    Deciding by the route the router chose, not by the request's path, leaves
    no spelling of a protected path that passes for a public one. A path whose
    route does not take the method stands for itself: no handler runs, the
    answer is 405 either way, and a public route's (POST /healthz) needs no key.
    """
    resource = request.match_info.route.resource
    if resource is not None:
        return resource.canonical
    if isinstance(getattr(request.match_info, "http_exception", None), web.HTTPMethodNotAllowed):
        return request.path
    return None


def is_public(route: str | None, path: str, metrics_auth: bool) -> bool:
    """Whether a request needs no key; ``route`` from route_path, ``path`` the request's."""
    if path == METRICS_PATH:  # whichever part of the app serves it
        return not metrics_auth
    if route is None:
        return False  # 404s too need a key: unknown paths tell nothing
    return route in PUBLIC_PATHS or route.startswith(PUBLIC_PREFIXES)


def bearer_subprotocols(request: web.Request) -> list[str]:
    """The ``bearer.KEY`` entries of a WebSocket upgrade's Sec-WebSocket-Protocol."""
    offered = request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "")
    return [
        p.strip()
        for p in offered.split(",")
        if p.strip().lower().startswith(BEARER_SUBPROTOCOL_PREFIX)
    ]


def websocket_protocols(request: web.Request) -> tuple[str, ...]:
    """Subprotocols /ws may pick: ``chatserver``, else the client's bearer entry.

    A browser that offers subprotocols fails the connection unless one is
    picked; picking ``chatserver`` keeps the key out of the response.
    """
    offered = [p.strip() for p in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",")]
    if SUBPROTOCOL in offered:
        return (SUBPROTOCOL,)
    return tuple(bearer_subprotocols(request)[:1])


def presented_keys(request: web.Request) -> list[str]:
    """Every key the request carries: the Authorization header, and on /ws also the
    bearer subprotocol and ``?api_key=``. A malformed Authorization counts as a wrong key."""
    keys = []
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        keys.append(token.strip() if scheme.lower() == "bearer" else "")
    if route_path(request) == WEBSOCKET_PATH:
        keys += [p[len(BEARER_SUBPROTOCOL_PREFIX) :] for p in bearer_subprotocols(request)]
        keys += request.query.getall(QUERY_PARAM, [])
    return keys


def unauthorized(
    request: web.Request, message: str, *, openai: bool, wrong_key: bool
) -> web.Response:
    """401 with the usual error body (OpenAI's shape where asked) and WWW-Authenticate.

    Counted in requests_rejected_total{reason="unauthorized"}, like every refusal.
    """
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.count_rejection("unauthorized")
    response = error_response(
        ApiError(401, "unauthorized", message), openai=openai, request_id=request_id_of(request)
    )
    challenge = 'Bearer realm="chatserver"'
    if wrong_key:
        challenge += ', error="invalid_token"'
    response.headers[hdrs.WWW_AUTHENTICATE] = challenge
    return response


MISSING_KEY = "this server needs an API key: send 'Authorization: Bearer <key>'"
WRONG_KEY = "the API key is not valid"


def auth_middleware(
    keys: KeyRing, is_openai: Callable[[web.Request], bool], metrics_auth: bool
) -> Middleware:
    """Sets the request's Principal from its key, or answers 401 before any handler runs."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_path(request)
        if not keys.required or is_public(route, request.path, metrics_auth):
            return await handler(request)
        candidates = presented_keys(request)
        if not candidates:
            if route == WEBSOCKET_PATH:
                return await handler(request)  # the first frame must carry the key
            log.debug("%s %s: no API key", request.method, request.path)
            return unauthorized(request, MISSING_KEY, openai=is_openai(request), wrong_key=False)
        found = {keys.lookup(candidate) for candidate in candidates}
        if None in found or len(found) != 1:
            log.info(
                "%s %s: refused API key %s",
                request.method,
                request.path,
                ", ".join(fingerprint(c) for c in candidates),
            )
            return unauthorized(request, WRONG_KEY, openai=is_openai(request), wrong_key=True)
        request[PRINCIPAL] = found.pop()  # type: ignore[assignment]
        return await handler(request)

    return middleware


def reload_on_sighup(keys: KeyRing) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that re-reads the keys file on SIGHUP while the app runs."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        installed = False
        if keys.path and hasattr(signal, "SIGHUP"):
            try:
                loop.add_signal_handler(signal.SIGHUP, keys.reload)
                installed = True
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                log.warning("SIGHUP cannot reload API keys here")
        yield
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)

    return context
