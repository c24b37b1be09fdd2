"""Liveness and readiness probes for load balancers and orchestrators.

/healthz answers while the event loop runs; /readyz only once every worker has
loaded the model, so traffic is not sent to a server that would answer 503.
/readyz also counts the generations under way, for balancing and for checking
that replies whose clients left were cancelled, and says which precision the
workers serve: dtype, kernel path, the CPU's capability and the quality gate's
figures (workers/quality_gate.py).
"""

from __future__ import annotations

from aiohttp import web

from chatserver.api.state import ENGINE, INFLIGHT


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = {
        "status": "ready" if engine.ready else "loading",
        "model": engine.model_id,
        "generations": len(request.app[INFLIGHT].live()),
        "precision": engine.precision or {"dtype": engine.dtype},
        "admission": engine.load(),
        "workers": engine.worker_states(),
    }
    if not engine.ready:
        body["reason"] = engine.failure or "the model workers are loading"
    return web.json_response(body, status=200 if engine.ready else 503)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
