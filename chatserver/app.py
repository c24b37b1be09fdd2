"""Wiring: the aiohttp application built from Settings, and the process that serves it.

Resources open and close in ``cleanup_ctx`` order (thread pool, session store,
rate limiter, engine, the services over them) and live under typed ``AppKey``s; handlers
find everything there, never in module globals.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from chatserver.api import access_log, health, openapi, page, request_id, ws
from chatserver.api import metrics as metrics_api
from chatserver.api.auth import ApiKeysError, KeyRing, auth_middleware, reload_on_sighup
from chatserver.api.chat import api_router as chat_router
from chatserver.api.chat.serving import ChatService
from chatserver.api.errors import error_middleware
from chatserver.api.openai import api_router as openai_router
from chatserver.api.openai.serving import OpenAIServing
from chatserver.api.origins import cors_middleware, parse_origins
from chatserver.api.responses import api_router as responses_router
from chatserver.api.responses.serving import ResponsesServing
from chatserver.api.state import (
    API_KEYS,
    CHAT,
    ENGINE,
    EXECUTOR,
    INFLIGHT,
    LIVE,
    METRICS,
    OPENAI,
    ORIGINS,
    RATE_LIMITER,
    RESPONSES,
    SESSIONS,
    SETTINGS,
    WEBSOCKETS,
)
from chatserver.config import Settings
from chatserver.engine.engine import InferenceEngine
from chatserver.limits import InFlight
from chatserver.limits.rate import open_rate_limiter
from chatserver.metrics import Metrics
from chatserver.sessions import SessionStoreUnavailable, open_store
from chatserver.sessions.live import open_live
from chatserver.sessions.responses import open_response_store

log = logging.getLogger("chatserver")

# Shares of --shutdown-timeout: closing WebSockets (all together; a client that
# never answers the close is not waited for), running replies' grace to finish
# before they are cancelled, and aiohttp's wait for handlers after that. The
# rest is for stopping the workers; past the whole, the process exits anyway.
CLOSE_SHARE, CLOSE_MAX_S = 0.2, 2.0
GRACE_SHARE, GRACE_MAX_S = 0.5, 5.0
HANDLERS_SHARE, HANDLERS_MAX_S = 0.2, 2.0


def _share(settings: Settings, share: float, most: float) -> float:
    return min(most, share * settings.shutdown_timeout)


async def _thread_pool(app: web.Application) -> AsyncIterator[None]:
    """The loop's default executor, sized by settings and closed with the app.

    Whatever runs blocking work with ``run_in_executor(None, ...)`` or
    ``asyncio.to_thread`` outside the engine (which keeps its own tokenizer
    pool) gets these threads instead of asyncio's implicit pool.
    """
    pool = ThreadPoolExecutor(
        max_workers=max(1, app[SETTINGS].tokenizer_threads), thread_name_prefix="chatserver"
    )
    asyncio.get_running_loop().set_default_executor(pool)
    app[EXECUTOR] = pool
    yield
    pool.shutdown(wait=False, cancel_futures=True)


async def _session_store(app: web.Application) -> AsyncIterator[None]:
    store = open_store(app[SETTINGS])
    try:
        await store.check()  # a wrong --redis-url fails at startup, not on every chat
    except BaseException:
        await store.close()
        raise
    app[SESSIONS] = store
    yield
    await store.close()


async def _live_channel(app: web.Application) -> AsyncIterator[None]:
    """Sessions' live channels (Redis with --redis-url), for /ws live delivery and resume."""
    live = open_live(app[SETTINGS])
    try:
        await live.check()
    except BaseException:
        await live.close()
        raise
    app[LIVE] = live
    yield
    await live.close()


async def _rate_limiter(app: web.Application) -> AsyncIterator[None]:
    app[RATE_LIMITER] = open_rate_limiter(app[SETTINGS])
    yield
    await app[RATE_LIMITER].close()


async def _engine(app: web.Application) -> AsyncIterator[None]:
    engine = InferenceEngine(app[SETTINGS], app[METRICS])
    try:
        await engine.start()
    except BaseException:
        await engine.stop()  # no worker outlives a failed start
        raise
    app[ENGINE] = engine
    # torch + transformers leave millions of long-lived objects; freezing moves
    # them out of the collector's view. Measured (README, Benchmarks): /healthz
    # p99 at 16 concurrent streams 114 ms without, 2-7 ms with.
    gc.collect()
    gc.freeze()
    yield
    await engine.stop()


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[CHAT] = ChatService(app[ENGINE], app[SESSIONS], settings, app[INFLIGHT])
    app[OPENAI] = OpenAIServing(app[ENGINE], settings, app[INFLIGHT])
    app[RESPONSES] = ResponsesServing(
        app[ENGINE], open_response_store(app[SESSIONS]), settings, app[INFLIGHT], app[OPENAI]
    )
    yield
    await app[RESPONSES].close()


async def _close_websockets(app: web.Application) -> None:
    await ws.close_websockets(app, _share(app[SETTINGS], CLOSE_SHARE, CLOSE_MAX_S))


async def _drain(app: web.Application) -> None:
    """on_shutdown: let running replies finish for a grace period, then cancel them."""
    cancelled = await app[INFLIGHT].drain(_share(app[SETTINGS], GRACE_SHARE, GRACE_MAX_S))
    if cancelled:
        log.info("cancelled %d reply(ies) still running at shutdown", cancelled)


def build_app(settings: Settings) -> web.Application:
    origins = parse_origins(settings.cors_origin)
    keys = KeyRing(settings.api_key, settings.api_keys_file)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            request_id.request_id_middleware,
            metrics_api.http_metrics_middleware,
            cors_middleware(origins),
            auth_middleware(keys, openai_router.is_openai_request, settings.metrics_auth),
            error_middleware(openai_router.is_openai_request),
        ],
    )
    app[SETTINGS] = settings
    app[API_KEYS] = keys
    app[ORIGINS] = origins
    app[WEBSOCKETS] = weakref.WeakSet()
    app[INFLIGHT] = InFlight()
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend(
        [
            reload_on_sighup(keys),
            _thread_pool,
            _session_store,
            _live_channel,
            _rate_limiter,
            _engine,
            _services,
        ]
    )
    app.on_shutdown.extend([_close_websockets, _drain])
    health.setup_routes(app)
    ws.setup_routes(app)
    chat_router.setup_routes(app)
    openai_router.setup_routes(app)
    responses_router.setup_routes(app)
    page.setup_routes(app)
    openapi.setup_routes(app)
    request_id.setup(app)
    metrics_api.setup(app)
    return app


class StartupFailed(RuntimeError):
    """The engine cannot serve as configured (a precision failed the quality gate, say)."""


async def _serve(settings: Settings) -> None:
    app = build_app(settings)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log_class=access_log.ProbeQuietAccessLogger,
        shutdown_timeout=_share(settings, HANDLERS_SHARE, HANDLERS_MAX_S),
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        for host, port, *_ in runner.addresses:
            log.info("serving on http://%s:%d", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():  # asked twice: the operator does not want to wait
                log.warning("second signal: exiting at once")
                os._exit(1)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        engine = app[ENGINE]
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(engine.fatal.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        if engine.fatal.is_set():
            raise StartupFailed(engine.failure or "a worker could not start")
        log.info("shutting down")
    finally:
        try:
            await asyncio.wait_for(runner.cleanup(), settings.shutdown_timeout)
        except TimeoutError:
            log.error(
                "shutdown took over %gs (--shutdown-timeout); exiting", settings.shutdown_timeout
            )
            os._exit(1)


def serve(settings: Settings) -> None:
    """Run the server until SIGINT or SIGTERM, on uvloop where it exists."""
    request_id.logging_setup(settings.log_level, settings.log_format)
    access_log.install()
    try:
        if sys.platform == "win32":
            asyncio.run(_serve(settings))
        else:
            import uvloop

            uvloop.run(_serve(settings))
    except SessionStoreUnavailable as exc:
        sys.exit(f"chatserver: {exc} (check --redis-url)")
    except (StartupFailed, ApiKeysError) as exc:
        sys.exit(f"chatserver: {exc}")
