"""Typed keys for what the app holds; opened and closed by app.py's cleanup contexts."""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from aiohttp import web

from chatserver.config import Settings
from chatserver.limits import InFlight
from chatserver.limits.rate import RateLimiter
from chatserver.metrics import Metrics
from chatserver.sessions import SessionStore
from chatserver.sessions.live import LiveChannel

if TYPE_CHECKING:
    from chatserver.api.auth import KeyRing
    from chatserver.api.chat.serving import ChatService
    from chatserver.api.openai.serving import OpenAIServing
    from chatserver.api.responses.serving import ResponsesServing
    from chatserver.engine.engine import InferenceEngine

SETTINGS = web.AppKey("settings", Settings)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
SESSIONS = web.AppKey("sessions", SessionStore)
# Sessions' live channels: running replies to every socket on a session, resume.
LIVE = web.AppKey("live", LiveChannel)
INFLIGHT = web.AppKey("inflight", InFlight)
# Per-client requests and tokens per minute (--rate-limit, --token-rate-limit).
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
# The API keys (--api-key, --api-keys-file); `required` is False without any.
API_KEYS: web.AppKey[KeyRing] = web.AppKey("api_keys")
ENGINE: web.AppKey[InferenceEngine] = web.AppKey("engine")
CHAT: web.AppKey[ChatService] = web.AppKey("chat")
OPENAI: web.AppKey[OpenAIServing] = web.AppKey("openai")
# /v1/responses (HTTP and WebSocket mode), its stored responses beside the sessions.
RESPONSES: web.AppKey[ResponsesServing] = web.AppKey("responses")
# Open WebSockets, closed with "going away" when the server shuts down.
WEBSOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")
# The app's Prometheus series (its own registry), rendered by GET /metrics.
METRICS = web.AppKey("metrics", Metrics)
# Web origins allowed besides the server's own (--cors-origin), parsed once.
ORIGINS: web.AppKey[frozenset[str]] = web.AppKey("origins")
