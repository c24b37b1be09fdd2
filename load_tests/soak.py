"""Issue 10's soak: does a server under steady mixed traffic stay flat for ten minutes?

``--clients`` (default 8) clients at once for ``--duration`` seconds (default 600), each
on one API (client i on ``ws``, ``query``, ``openai`` in turn), each sending its next
request when the last one has ended. A seeded draw picks each request's kind:

- ``normal``: a short chat (``--max-tokens``, default 16, greedy) read to its end;
- ``cancel`` (WebSocket only): a ``cancel`` frame after the first token; the reply
  must end with ``finish_reason: "cancelled"`` (or have finished already);
- ``disconnect``: the client goes mid-reply (the socket or connection closed after
  the first token; for ``/v1/query``, which does not stream, after a short delay);
- ``malformed``: bad JSON, wrong types, a wrong content type, a lone surrogate, deep
  nesting; the answer must be a 4xx (or an error frame) and the socket must go on
  answering.

Sessions are kept for ``--turns-per-session`` turns, then deleted and a new one begun,
so no history (nor the store) grows without bound and what is measured is the server.

Every ``--sample-interval`` seconds (default 5) it samples from ``/proc``: the server
process's RSS, open fds and threads; the RSS of its worker processes (its descendants);
and, over the requests that ended in the window, the TTFT p50 of the normal streamed
requests (``ws``, ``openai``) and the latency p50 of normal ``/v1/query`` requests.

At the end it says of each series whether it stays flat, and counts the requests:
as planned (``ok``), refused as expected (``refused``: a malformed request's 4xx or
error frame, or a busy server's 429/503 with a retry hint) and failed unexpectedly
(``unexpected``: a 5xx, an ``internal_error`` frame, a socket or connection dropped
without a close code, a timeout, a malformed request accepted, a normal one refused).

**Flat** means: after the warm-up (``--warmup``, default the first fifth of the run
but at most 60 s), the least-squares slope of the series, projected over 10 minutes,
is at most its tolerance (``TOLERANCES``): 1% of the series' median for RSS, 20% of it
for latency, max(4, 5% of the median) fds and max(2, 5% of the median) threads. A
falling series is flat (a leak grows). The relative growth from the first to the last
fifth of the samples after the warm-up is printed beside it, for the reader.

    python -m load_tests.soak                                  # starts its own server
    python -m load_tests.soak --server-args "--engine pool --workers 2" --clients 8
    python -m load_tests.soak --url http://127.0.0.1:8080 --pid 12345 --duration 120

JSON (the machine first, then every sample, the counts and the unexpected failures in
full) and a PNG (each series against time) go under ``load_tests/results/``. Exit
status 1 when a request failed unexpectedly or none completed. Every loop is bounded:
no new request after ``--duration``, each request within ``--timeout``, at most
``--max-requests`` in all. Loopback servers only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from load_tests.bench_batching import server_info
from load_tests.cli import positive_float, positive_int, run_async, say, write_json
from load_tests.clients.openai_chat import StreamCut, served_model, sse_chunks
from load_tests.guard import check_url
from load_tests.machine import describe_machine, describe_precision, machine, server_precision
from load_tests.prompts import BUILTIN_PROMPTS
from load_tests.runner import WarmupFailed, warm_server
from load_tests.server import ServerFailed, target_server
from load_tests.stats import fmt, markdown_table, percentile

APIS = ("ws", "query", "openai")
KINDS = ("normal", "cancel", "disconnect", "malformed")
# Relative weights of the kinds; `cancel` exists only on the WebSocket.
MIX = {"normal": 6, "cancel": 2, "disconnect": 2, "malformed": 2}
RESULTS = Path(__file__).resolve().parent / "results"

# --- what one request did, and how it counts ---------------------------------------------

# What a client saw (Outcome.result).
DONE = "done"  # the reply ended by itself (done frame, 200, [DONE])
CANCELLED = "cancelled"  # a done frame with finish_reason "cancelled"
CLIENT_CLOSED = "client_closed"  # we left mid-reply, as planned
ERROR = "error"  # an HTTP error status or a WebSocket error frame (status, code)
WS_CLOSED = "ws_closed"  # the server closed the socket with a close code (status)
DROPPED = "dropped"  # socket or connection gone without a close code, or a cut stream
TIMEOUT = "timeout"
CONNECT_ERROR = "connect_error"
BAD_RESPONSE = "bad_response"  # an answer that is not what the API documents

# Refusals a busy server may give any request: expected under load, with a retry hint.
BUSY_CODES = frozenset({"server_busy", "rate_limited", "worker_unavailable", "queue_full"})
# The WebSocket close codes the server uses for frames it will not read (README).
MALFORMED_CLOSE_CODES = frozenset({1007, 1009})
# A cancel that reached the server after the reply had ended.
LATE_CANCEL_CODES = frozenset({"nothing_to_cancel", "unknown_id"})
# aiohttp's close code for a connection lost without a close frame.
ABNORMAL_CLOSURE = 1006

OK, REFUSED, UNEXPECTED = "ok", "refused", "unexpected"


@dataclass(slots=True)
class Outcome:
    """One request: ``t`` seconds after the soak began it ended; times in seconds."""

    api: str
    kind: str
    result: str
    t: float = 0.0
    latency: float = 0.0
    ttft: float | None = None
    status: int | None = None  # HTTP status, or the WebSocket close code
    code: str | None = None  # the error code the server gave
    detail: str = ""

    @property
    def category(self) -> str:
        return classify(self)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "category": self.category}


def classify(o: Outcome) -> str:
    """``ok`` (went as planned), ``refused`` (an expected refusal) or ``unexpected``."""
    if o.result in (TIMEOUT, DROPPED, CONNECT_ERROR, BAD_RESPONSE):
        return UNEXPECTED
    if o.result == ERROR:
        if o.code in BUSY_CODES:
            return REFUSED
        if o.code == "internal_error" or (o.status is not None and o.status >= 500):
            return UNEXPECTED
        if o.kind == "malformed":
            return REFUSED
        if o.kind == "cancel" and o.code in LATE_CANCEL_CODES:
            return OK
        return UNEXPECTED  # a well-formed request refused
    if o.result == WS_CLOSED:
        if o.kind == "malformed" and o.status in MALFORMED_CLOSE_CODES:
            return REFUSED
        return UNEXPECTED
    if o.result == DONE:
        return UNEXPECTED if o.kind == "malformed" else OK
    if o.result == CANCELLED:
        return OK if o.kind in ("cancel", "disconnect") else UNEXPECTED
    if o.result == CLIENT_CLOSED:
        return OK if o.kind == "disconnect" else UNEXPECTED
    return UNEXPECTED


def count_outcomes(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Totals by category, and by API, kind, category and what was seen."""
    totals = {OK: 0, REFUSED: 0, UNEXPECTED: 0}
    by: dict[str, int] = {}
    for o in outcomes:
        cat = o.category
        totals[cat] += 1
        seen = o.result if o.code is None else f"{o.result}:{o.code}"
        if o.status is not None:
            seen += f" ({o.status})"
        key = f"{o.api} {o.kind} {cat} {seen}"
        by[key] = by.get(key, 0) + 1
    return {"requests": len(outcomes), **totals, "by_kind": dict(sorted(by.items()))}


# --- is a series flat? -----------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """A series is flat when its slope over 10 minutes is at most
    ``max(absolute, relative * median)``."""

    relative: float
    absolute: float = 0.0

    def limit(self, median: float) -> float:
        return max(self.absolute, self.relative * abs(median))


# The series sampled, their units and what counts as flat (see the module docstring).
SERIES: dict[str, tuple[str, str]] = {
    "server_rss_mib": ("server RSS", "MiB"),
    "workers_rss_mib": ("workers RSS", "MiB"),
    "server_fds": ("server open fds", ""),
    "server_threads": ("server threads", ""),
    "ttft_p50_ms": ("TTFT p50 (ws, openai)", "ms"),
    "query_p50_ms": ("query latency p50", "ms"),
}
TOLERANCES: dict[str, Tolerance] = {
    "server_rss_mib": Tolerance(0.01),
    "workers_rss_mib": Tolerance(0.01),
    "server_fds": Tolerance(0.05, 4.0),
    "server_threads": Tolerance(0.05, 2.0),
    "ttft_p50_ms": Tolerance(0.20),
    "query_p50_ms": Tolerance(0.20),
}
MIN_SAMPLES = 3


def slope_per_minute(ts: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``ys`` against ``ts`` (seconds), per minute; None for fewer
    than two distinct times."""
    n = len(ts)
    if n < 2 or n != len(ys):
        return None
    mt, my = sum(ts) / n, sum(ys) / n
    sxx = sum((t - mt) ** 2 for t in ts)
    if sxx == 0:
        return None
    sxy = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True))
    return 60.0 * sxy / sxx


def relative_growth(ys: Sequence[float]) -> float | None:
    """Mean of the last fifth over the mean of the first fifth, minus 1 (at least one
    value each); None for fewer than two values or a first fifth of mean 0."""
    if len(ys) < 2:
        return None
    k = max(1, len(ys) // 5)
    first, last = sum(ys[:k]) / k, sum(ys[-k:]) / k
    if first == 0:
        return None
    return last / first - 1.0


def flatness(
    samples: Sequence[dict[str, Any]], key: str, warmup: float, tolerance: Tolerance
) -> dict[str, Any]:
    """The verdict on one series over the samples at ``t >= warmup`` that have a value."""
    points = [
        (s["t"], float(s[key]))
        for s in samples
        if s["t"] >= warmup and s.get(key) is not None and math.isfinite(s[key])
    ]
    ts, ys = [p[0] for p in points], [p[1] for p in points]
    out: dict[str, Any] = {
        "samples": len(points),
        "median": percentile(ys, 50) if ys else None,
        "slope_per_min": None,
        "slope_per_10min": None,
        "limit_per_10min": None,
        "growth": None,
        "flat": None,
    }
    if len(points) < MIN_SAMPLES:
        return out
    slope = slope_per_minute(ts, ys)
    if slope is None:
        return out
    limit = tolerance.limit(out["median"])
    out.update(
        slope_per_min=slope,
        slope_per_10min=10.0 * slope,
        limit_per_10min=limit,
        growth=relative_growth(ys),
        flat=10.0 * slope <= limit,
    )
    return out


def default_warmup(duration: float) -> float:
    """The first fifth of the run, at most 60 s."""
    return min(60.0, duration / 5.0)


def verdicts(samples: Sequence[dict[str, Any]], warmup: float) -> dict[str, dict[str, Any]]:
    return {key: flatness(samples, key, warmup, TOLERANCES[key]) for key in SERIES}


def verdict_cell(v: dict[str, Any]) -> str:
    if v["flat"] is None:
        return "n/a (too few samples)"
    return "flat" if v["flat"] else "GROWING"


VERDICT_HEADERS = (
    "series",
    "median",
    "slope /min",
    "slope /10 min",
    "limit /10 min",
    "first→last fifth",
    "verdict",
)


def verdict_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for key, v in results.items():
        name, unit = SERIES[key]
        digits = 0 if unit == "" else 1
        growth = v["growth"]
        rows.append(
            (
                f"{name}" + (f" ({unit})" if unit else ""),
                fmt(v["median"], digits),
                fmt(v["slope_per_min"], 3),
                fmt(v["slope_per_10min"], 2),
                fmt(v["limit_per_10min"], 2),
                "n/a" if growth is None else f"{growth:+.1%}",
                verdict_cell(v),
            )
        )
    return markdown_table(VERDICT_HEADERS, rows)


# --- sampling the server's processes from /proc ----------------------------------------


def status_fields(text: str) -> dict[str, int]:
    """``VmRSS`` (kB) and ``Threads`` from the text of ``/proc/<pid>/status``."""
    out = {}
    for name in ("VmRSS", "Threads"):
        m = re.search(rf"^{name}:\s+(\d+)", text, re.MULTILINE)
        if m:
            out[name] = int(m.group(1))
    return out


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (its worker processes and theirs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                text = f.read()
            ppid = int(text[text.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return sorted(out)


def _status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return status_fields(f.read())


def process_sample(pid: int) -> dict[str, Any]:
    """RSS, fds and threads of ``pid``; RSS of its descendants. Raises if it is gone."""
    status = _status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    workers = {}
    for child in descendants(pid):
        try:
            workers[child] = _status(child).get("VmRSS", 0) / 1024.0
        except OSError:
            continue  # exited meanwhile
    return {
        "server_rss_mib": status.get("VmRSS", 0) / 1024.0,
        "server_threads": status.get("Threads"),
        "server_fds": fds,
        "workers": len(workers),
        "workers_rss_mib": sum(workers.values()) if workers else None,
        "workers_rss_by_pid": {str(p): round(v, 1) for p, v in workers.items()},
    }


def window_latency(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Over the requests that ended in a window: TTFT p50 of normal streamed ones and
    latency p50 of normal queries (ms), and the counts."""
    ttfts = [
        o.ttft * 1000.0
        for o in outcomes
        if o.kind == "normal" and o.api != "query" and o.result == DONE and o.ttft is not None
    ]
    queries = [
        o.latency * 1000.0
        for o in outcomes
        if o.kind == "normal" and o.api == "query" and o.result == DONE
    ]
    return {
        "ttft_p50_ms": percentile(ttfts, 50) if ttfts else None,
        "query_p50_ms": percentile(queries, 50) if queries else None,
        "requests": len(outcomes),
        "unexpected": sum(o.category == UNEXPECTED for o in outcomes),
    }


# --- the requests ------------------------------------------------------------------------


def malformed_ws_frame(rng: random.Random, mid: str) -> str:
    """A text frame the server must refuse with an error frame."""
    return rng.choice(
        (
            "{not json",
            '"\\ud800 lone surrogate"',
            "[" * 2000,
            json.dumps([1, 2, 3]),
            json.dumps({"type": "no_such_type", "id": mid}),
            json.dumps({"type": "chat", "id": mid, "content": 5}),
            json.dumps({"type": "chat", "id": mid, "content": "hi", "params": {"max_tokens": "x"}}),
            json.dumps({"type": "chat", "id": mid, "content": "hi", "params": {"top_p": 7}}),
        )
    )


def malformed_http_body(rng: random.Random, api: str) -> tuple[bytes, str]:
    """A body (and its content type) the ``query`` or ``openai`` route must refuse."""
    if api == "query":
        good = {"message": "hi", "max_tokens": 4}
        wrong = [{"message": 5}, {"message": "hi", "max_tokens": -1}, {"message": ["a"]}]
    else:
        good = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
        wrong = [
            {"model": "default", "messages": "hi"},
            {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            {"messages": [{"role": 7, "content": "hi"}]},
        ]
    return rng.choice(
        (
            (b"{not json", "application/json"),
            (
                b'{"message": "\\ud800"}' if api == "query" else b'{"messages": "\\ud800"}',
                "application/json",
            ),
            (b"[" * 2000, "application/json"),
            (json.dumps(rng.choice(wrong)).encode(), "application/json"),
            (json.dumps(good).encode(), "text/plain"),
        )
    )


def _error_code(body: bytes) -> str | None:
    try:
        err = json.loads(body).get("error")
        return str(err.get("code")) if isinstance(err, dict) and err.get("code") else None
    except (ValueError, AttributeError):
        return None


def _transport_failure(e: BaseException) -> tuple[str, str]:
    if isinstance(e, TimeoutError):
        return TIMEOUT, ""
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return DROPPED, type(e).__name__
    if isinstance(e, aiohttp.ClientConnectionError | ConnectionError | OSError):
        return CONNECT_ERROR, type(e).__name__
    if isinstance(e, json.JSONDecodeError | KeyError | TypeError | ValueError):
        return BAD_RESPONSE, f"{type(e).__name__}: {e}"[:200]
    return BAD_RESPONSE, type(e).__name__


@dataclass
class SoakSpec:
    clients: int = 8
    duration: float = 600.0
    sample_interval: float = 5.0
    max_tokens: int = 16
    timeout: float = 60.0
    max_requests: int = 200_000
    turns_per_session: int = 8
    seed: int = 0
    mix: dict[str, int] = field(default_factory=lambda: dict(MIX))


def kinds_for(api: str, mix: dict[str, int]) -> tuple[list[str], list[int]]:
    kinds = [k for k in KINDS if mix.get(k, 0) > 0 and (k != "cancel" or api == "ws")]
    return kinds, [mix[k] for k in kinds]


class SoakClient:
    """One client on one API: sends requests one after another until told to stop."""

    def __init__(
        self,
        index: int,
        api: str,
        http: aiohttp.ClientSession,
        base_url: str,
        spec: SoakSpec,
        model: str,
        record: Callable[[Outcome], None],
    ) -> None:
        self.index, self.api, self.http, self.base = index, api, http, base_url
        self.spec, self.model, self.record = spec, model, record
        self.rng = random.Random(f"soak:{spec.seed}:{index}")
        self.kinds, self.weights = kinds_for(api, spec.mix)
        self.n = 0
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session_id: str | None = None
        self.turns = 0

    def prompt(self) -> str:
        return f"{BUILTIN_PROMPTS[(self.index * 7 + self.n) % len(BUILTIN_PROMPTS)]} ({self.n})"

    def params(self) -> dict[str, Any]:
        return {"max_tokens": self.spec.max_tokens, "temperature": 0}

    async def run(self, deadline: float, budget: Callable[[], bool]) -> None:
        try:
            while time.perf_counter() < deadline and budget():
                kind = self.rng.choices(self.kinds, self.weights)[0]
                self.n += 1
                start = time.perf_counter()
                try:
                    async with asyncio.timeout(self.spec.timeout):
                        o = await getattr(self, f"_{self.api}")(kind, start)
                except Exception as e:  # noqa: BLE001 - every failure is counted by kind
                    result, detail = _transport_failure(e)
                    o = Outcome(self.api, kind, result, detail=detail)
                    await self._drop_ws()  # a socket in an unknown state is not reused
                o.latency = time.perf_counter() - start
                self.record(o)
                await self._rotate_session()
        finally:
            await self._drop_ws()
            await self._delete_session()

    # -- sessions: kept for a few turns, then deleted ------------------------------------

    async def _rotate_session(self) -> None:
        self.turns += 1
        if self.turns >= self.spec.turns_per_session:
            await self._drop_ws()
            await self._delete_session()

    async def _drop_ws(self) -> None:
        if self.ws is not None:
            ws, self.ws = self.ws, None
            await ws.close()
            await self._delete_session()

    async def _delete_session(self) -> None:
        self.turns = 0
        if self.session_id is None:
            return
        sid, self.session_id = self.session_id, None
        start = time.perf_counter()
        try:
            async with (
                asyncio.timeout(self.spec.timeout),
                self.http.delete(f"{self.base}/v1/sessions/{sid}") as r,
            ):
                body = await r.read()
                if r.status in (204, 404):
                    return
                o = Outcome(self.api, "cleanup", ERROR, status=r.status, code=_error_code(body))
        except Exception as e:  # noqa: BLE001
            result, detail = _transport_failure(e)
            o = Outcome(self.api, "cleanup", result, detail=detail)
        o.latency = time.perf_counter() - start
        self.record(o)

    # -- WebSocket ------------------------------------------------------------------------

    async def _socket(self) -> aiohttp.ClientWebSocketResponse:
        if self.ws is None or self.ws.closed:
            self.ws = await self.http.ws_connect(self.base + "/ws", autoping=True)
        return self.ws

    async def _ws(self, kind: str, start: float) -> Outcome:
        ws = await self._socket()
        mid = f"soak-{self.index}-{self.n}"
        if kind == "malformed":
            await ws.send_str(malformed_ws_frame(self.rng, mid))
        else:
            frame = {"type": "chat", "id": mid, "content": self.prompt(), "params": self.params()}
            await ws.send_str(json.dumps(frame))
        ttft = None
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if data.get("type") == "session":
                self.session_id = data.get("session_id") or self.session_id
                continue
            if data.get("id") not in (None, mid):
                continue  # a late answer to an earlier request (a cancel after its reply)
            t = data.get("type")
            if t == "error":
                return Outcome("ws", kind, ERROR, ttft=ttft, code=str(data.get("code")))
            if kind == "malformed":
                return Outcome("ws", kind, BAD_RESPONSE, detail=f"answered with {t}")
            if t == "token":
                if ttft is None:
                    ttft = time.perf_counter() - start
                    if kind == "cancel":
                        await ws.send_str(json.dumps({"type": "cancel", "id": mid}))
                    elif kind == "disconnect":
                        await self._drop_ws()
                        return Outcome("ws", kind, CLIENT_CLOSED, ttft=ttft)
            elif t == "done":
                reason = data.get("finish_reason")
                return Outcome("ws", kind, CANCELLED if reason == "cancelled" else DONE, ttft=ttft)
        code = ws.close_code
        self.ws = None
        if code is None or code == ABNORMAL_CLOSURE:
            return Outcome("ws", kind, DROPPED, ttft=ttft, status=code)
        return Outcome("ws", kind, WS_CLOSED, ttft=ttft, status=code)

    # -- /v1/query ------------------------------------------------------------------------

    async def _query(self, kind: str, start: float) -> Outcome:
        url = self.base + "/v1/query"
        if kind == "malformed":
            return await self._post_malformed(url)
        body: dict[str, Any] = {"message": self.prompt(), **self.params()}
        if self.session_id is not None:
            body["session_id"] = self.session_id
        if kind == "disconnect":  # not streamed: leave after a short while
            delay = self.rng.uniform(0.05, 0.5)
            try:
                async with asyncio.timeout(delay), self.http.post(url, json=body) as r:
                    raw = await r.read()
            except TimeoutError:
                self.session_id = None  # its turn may still be ending: start afresh
                return Outcome("query", kind, CLIENT_CLOSED)
        else:
            async with self.http.post(url, json=body) as r:
                raw = await r.read()
        if r.status != 200:
            return Outcome("query", kind, ERROR, status=r.status, code=_error_code(raw))
        data = json.loads(raw)
        self.session_id = data["session_id"]
        if not isinstance(data.get("reply"), str):
            return Outcome("query", kind, BAD_RESPONSE, detail="no reply")
        return Outcome("query", kind, DONE, status=200)

    async def _post_malformed(self, url: str) -> Outcome:
        body, content_type = malformed_http_body(self.rng, self.api)
        async with self.http.post(url, data=body, headers={"Content-Type": content_type}) as r:
            raw = await r.read()
        if r.status == 200:
            return Outcome(self.api, "malformed", DONE, status=200)
        return Outcome(self.api, "malformed", ERROR, status=r.status, code=_error_code(raw))

    # -- /v1/chat/completions ---------------------------------------------------------

    async def _openai(self, kind: str, start: float) -> Outcome:
        url = self.base + "/v1/chat/completions"
        if kind == "malformed":
            return await self._post_malformed(url)
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt()}],
            **self.params(),
            "stream": True,
        }
        ttft = None
        async with self.http.post(url, json=body) as r:
            if r.status != 200:
                raw = await r.read()
                return Outcome("openai", kind, ERROR, status=r.status, code=_error_code(raw))
            try:
                async for chunk in sse_chunks(r):
                    if "error" in chunk:
                        err = chunk["error"]
                        code = err.get("code") if isinstance(err, dict) else None
                        return Outcome("openai", kind, ERROR, ttft=ttft, code=str(code))
                    for choice in chunk.get("choices") or ():
                        if (choice.get("delta") or {}).get("content") and ttft is None:
                            ttft = time.perf_counter() - start
                            if kind == "disconnect":
                                r.close()
                                return Outcome("openai", kind, CLIENT_CLOSED, ttft=ttft)
            except StreamCut as e:
                return Outcome("openai", kind, DROPPED, ttft=ttft, detail=str(e))
            return Outcome("openai", kind, DONE, ttft=ttft, status=200)


# --- the run -----------------------------------------------------------------------------


async def soak(
    base_url: str, spec: SoakSpec, pid: int | None, *, progress: bool = False
) -> dict[str, Any]:
    """Run the clients and the sampler; return the samples and every outcome."""
    outcomes: list[Outcome] = []
    window: list[Outcome] = []
    samples: list[dict[str, Any]] = []
    started = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout()) as http:
        model = await served_model(http, base_url)
        t0 = time.perf_counter()
        deadline = t0 + spec.duration

        def record(o: Outcome) -> None:
            o.t = time.perf_counter() - t0
            outcomes.append(o)
            window.append(o)

        def budget() -> bool:
            nonlocal started
            started += 1
            return started <= spec.max_requests

        def sample() -> dict[str, Any]:
            s: dict[str, Any] = {"t": time.perf_counter() - t0}
            if pid is not None:
                try:
                    s.update(process_sample(pid))
                except OSError as e:
                    s["error"] = f"server process unreadable: {e}"
            s.update(window_latency(window))
            window.clear()
            return s

        async def sampler() -> None:
            samples.append(sample())
            n = 0
            while True:
                n += 1
                wake = t0 + n * spec.sample_interval
                if wake > deadline + 1e-6:
                    return
                await asyncio.sleep(max(0.0, wake - time.perf_counter()))
                s = sample()
                samples.append(s)
                if progress:
                    say(
                        f"soak t={s['t']:.0f}s rss={fmt(s.get('server_rss_mib'), 1)} MiB "
                        f"workers={fmt(s.get('workers_rss_mib'), 1)} MiB fds={s.get('server_fds')} "
                        f"threads={s.get('server_threads')} ttft_p50={fmt(s['ttft_p50_ms'], 0)} ms "
                        f"requests={s['requests']} unexpected={s['unexpected']}"
                    )

        clients = [
            SoakClient(i, APIS[i % len(APIS)], http, base_url, spec, model, record)
            for i in range(spec.clients)
        ]
        sampling = asyncio.create_task(sampler())
        try:
            await asyncio.gather(*(c.run(deadline, budget) for c in clients))
        finally:
            await sampling
        elapsed = time.perf_counter() - t0
    return {"duration_s": elapsed, "samples": samples, "outcomes": outcomes}


def summarize(run: dict[str, Any], spec: SoakSpec, warmup: float) -> dict[str, Any]:
    outcomes: list[Outcome] = run["outcomes"]
    return {
        "duration_s": run["duration_s"],
        "warmup_s": warmup,
        "counts": count_outcomes(outcomes),
        "verdicts": verdicts(run["samples"], warmup),
        "unexpected": [o.as_dict() for o in outcomes if o.category == UNEXPECTED],
        "samples": run["samples"],
    }


def print_report(report: dict[str, Any], spec: SoakSpec, header: list[str]) -> None:
    counts = report["counts"]
    print(
        f"## soak: {spec.clients} clients for {spec.duration:g} s over {', '.join(APIS)}, "
        f"{spec.max_tokens}-token greedy replies, sampled every {spec.sample_interval:g} s\n"
    )
    for line in header:
        print(line + "  ")
    print()
    print(f"### does it stay flat? (after a {report['warmup_s']:g} s warm-up)\n")
    print(verdict_table(report["verdicts"]))
    print()
    print(
        "flat: least-squares slope over 10 min at most the limit (RSS 1% of the median, "
        "latency 20%, fds max(4, 5%), threads max(2, 5%)); first→last fifth: mean of the "
        "last fifth of the samples over the first, after the warm-up.\n"
    )
    print(
        f"### requests: {counts['requests']} — {counts[OK]} as planned, {counts[REFUSED]} "
        f"refused as expected, {counts[UNEXPECTED]} failed unexpectedly\n"
    )
    rows = [(k, v) for k, v in counts["by_kind"].items()]
    print(markdown_table(("API kind category seen (status)", "count"), rows))
    print()
    for o in report["unexpected"][:20]:
        print(f"- unexpected at {o['t']:.1f} s: {json.dumps(o)}")
    if report["unexpected"]:
        print()


def plot_soak(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Each series against time (min), the warm-up shaded, its least-squares line drawn."""
    from load_tests.plot import _pyplot, _save

    plt = _pyplot()
    keys = list(SERIES)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    samples, warmup = report["samples"], report["warmup_s"]
    for ax, key in zip(axes.flat, keys, strict=True):
        name, unit = SERIES[key]
        pts = [(s["t"] / 60.0, s[key]) for s in samples if s.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1)
        v = report["verdicts"][key]
        after = [p for p in pts if p[0] * 60.0 >= warmup]
        if v["slope_per_min"] is not None and after:
            mt = sum(p[0] for p in after) / len(after)
            my = sum(p[1] for p in after) / len(after)
            xs = [after[0][0], after[-1][0]]
            ax.plot(xs, [my + v["slope_per_min"] * (x - mt) for x in xs], ls="--", color="k")
        ax.axvspan(0, warmup / 60.0, color="grey", alpha=0.15)
        ax.set(xlabel="minutes", ylabel=unit or "count", title=f"{name}: {verdict_cell(v)}")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    return _save(plt, fig, path, title)


def count_tracebacks(log: str) -> int:
    return log.count("Traceback (most recent call last)")


# --- the command ---------------------------------------------------------------------------


def build_parser(prog: str = "python -m load_tests.soak") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", help="drive this running server (loopback only) instead of one's own")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, to sample it")
    p.add_argument("--server-args", default="", help="`chatserver serve` flags of its own server")
    p.add_argument("--duration", type=positive_float, default=600.0, help="seconds of load")
    p.add_argument("--clients", type=positive_int, default=8, help="concurrent clients")
    p.add_argument("--sample-interval", type=positive_float, default=5.0, help="seconds")
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds left out of the verdicts; unset: a fifth of --duration, at most 60",
    )
    p.add_argument("--max-tokens", type=positive_int, default=16, help="tokens per reply")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="per-request seconds")
    p.add_argument("--max-requests", type=positive_int, default=200_000, help="cap, all clients")
    p.add_argument("--turns-per-session", type=positive_int, default=8, help="then a fresh session")
    p.add_argument("--seed", type=int, default=0, help="seed of the request kinds")
    p.add_argument("--ready-timeout", type=positive_float, default=300.0, help="server start")
    p.add_argument("--json", type=Path, default=RESULTS / "soak.json", help="results")
    p.add_argument("--plot", type=Path, default=RESULTS / "soak.png", help="PNG of the series")
    p.add_argument("--no-progress", action="store_true", help="no per-sample lines on stderr")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    try:
        url = check_url(args.url) if args.url else None
    except ValueError as e:
        parser.error(str(e))
    if args.pid is not None and url is None:
        parser.error("--pid goes with --url (a server of its own is sampled anyway)")
    spec = SoakSpec(
        clients=args.clients,
        duration=args.duration,
        sample_interval=args.sample_interval,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
        max_requests=args.max_requests,
        turns_per_session=args.turns_per_session,
        seed=args.seed,
    )
    warmup = default_warmup(args.duration) if args.warmup is None else args.warmup
    host = machine()
    say(describe_machine(host))
    flags = shlex.split(args.server_args)
    try:
        with target_server(url, flags, args.ready_timeout, args.pid) as (url, pid, server):
            info, precision = server_info(url), server_precision(url)
            say(f"server {url}: {json.dumps(info)}")
            for api in APIS:
                run_async(warm_server(url, api, 1, request_timeout=args.timeout))
            run = run_async(soak(url, spec, pid, progress=not args.no_progress))
            log = server.log_text() if server is not None else None
    except (ServerFailed, WarmupFailed) as e:
        say(f"soak: {e}")
        return 1
    report = summarize(run, spec, warmup)
    header = [
        describe_machine(host),
        describe_precision(precision),
        f"server: {url}"
        + (f", flags `{args.server_args}`" if server is not None else f", pid {pid}"),
    ]
    if pid is None:
        header.append("no --pid: process series not sampled")
    if log is not None:
        header.append(f"server log: {count_tracebacks(log)} tracebacks ({server.log_path})")
        report["server_tracebacks"] = count_tracebacks(log)
    print(describe_machine(host) + "\n")
    print_report(report, spec, header[1:])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in asdict(spec).items()}
        config["server_args"] = args.server_args if server is not None else None
        write_json(
            args.json,
            {
                "tool": "soak",
                "config": config,
                "url": url,
                "pid": pid,
                "server": info,
                "precision": precision,
                **report,
            },
        )
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_soak(report, args.plot, title=f"soak: {spec.clients} clients, {spec.duration:g} s")
        say(f"wrote {args.plot}")
    counts = report["counts"]
    return 0 if counts[UNEXPECTED] == 0 and counts[OK] else 1


if __name__ == "__main__":
    sys.exit(main())
