"""Metrics: every Prometheus series the server exposes, in one registry per app.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` becomes
``chatserver:time_to_first_token_seconds``) where the meaning is the same, so
dashboards built for vLLM work; the rest are ours. Each app owns its own
``CollectorRegistry`` rather than prometheus_client's global one, so several
apps in one process (tests, benchmarks) never collide.

Workers never write metrics files: what they measure (step time, batch size,
KV cache use, which sequences were scheduled) rides on the ``StepOutput`` they
already send, and the engine observes it here. Labels take bounded values
only (reasons, routes, status codes): never session ids, keys or request ids.

This module is the low layer: the engine and the API import it, it imports
neither.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "chatserver:"

# vLLM's buckets for the same histograms (vllm/v1/metrics/loggers.py), so
# quantiles computed across both servers line up.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2) + REQUEST_BUCKETS
STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# requests_rejected_total's reason for each error code that refuses a request
# before any work: the codes of chatserver's errors, grouped into few values.
REJECTION_REASONS = {
    "server_busy": "busy",
    "rate_limited": "rate_limited",
    "unauthorized": "unauthorized",
    "body_too_large": "too_large",
    "frame_too_large": "too_large",
    "prompt_too_large": "too_large",
    "context_length_exceeded": "too_large",
}

FINISH_REASONS = (
    "stop",
    "length",
    "cancelled",
    "interrupted",
    "error",
    "timeout",
    "worker_failed",
)

# How often the event-loop sampler wakes; its overshoot is the loop's lag.
LOOP_LAG_INTERVAL_S = 0.1


class Metrics:
    """The app's series; the engine and the API layer update them, /metrics renders them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        p = PREFIX
        # --- the engine (vLLM's names) ---
        self.requests_running = Gauge(
            p + "num_requests_running",
            "Generations scheduled on a worker and not finished.",
            registry=r,
        )
        self.requests_waiting = Gauge(
            p + "num_requests_waiting",
            "Generations handed to a worker and not scheduled yet.",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds",
            "From generate() to the first token delivered to the request's stream.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            p + "inter_token_latency_seconds",
            "Time between deliveries of a stream's tokens, per token (one observation a delivery).",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            p + "e2e_request_latency_seconds",
            "From generate() to the end of the generation, whatever its finish reason.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.request_queue_time = Histogram(
            p + "request_queue_time_seconds",
            "From generate() to the start of the worker step that first scheduled it.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens", "Prompt tokens of generations started.", registry=r
        )
        self.generation_tokens = Counter(
            p + "generation_tokens", "Tokens generated and delivered to streams.", registry=r
        )
        self.request_success = Counter(
            p + "request_success",
            "Generations finished, by finish reason (stop, length, cancelled, error).",
            ["finished_reason"],
            registry=r,
        )
        # --- ours ---
        self.requests_rejected = Counter(
            p + "requests_rejected",
            "Requests refused before generating, by reason.",
            ["reason"],
            registry=r,
        )
        self.requests_dropped = Counter(
            p + "requests_dropped",
            "Generations cancelled because their client went away.",
            registry=r,
        )
        self.worker_restarts = Counter(
            p + "worker_restarts", "Worker processes restarted after exiting.", registry=r
        )
        self.worker_step = Histogram(
            p + "worker_step_seconds",
            "Duration of one worker decoding step (forward pass and sampling).",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.grammar_seconds = Counter(
            p + "grammar_mask_seconds",
            "Worker time computing constrained decoding's token masks and advancing its "
            "matchers (workers/grammar.py), part of worker_step_seconds.",
            registry=r,
        )
        self.batch_size = Histogram(
            p + "batch_size",
            "Sequences in one worker decoding step.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            p + "kv_cache_usage_ratio",
            "Token positions of the workers' KV caches holding running sequences, over the "
            "positions their memory budget holds (0 to 1).",
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            p + "prefix_cache_queries",
            "Prompt tokens looked up in the workers' prefix caches.",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            p + "prefix_cache_hits",
            "Prompt tokens found in the workers' prefix caches (not computed again).",
            registry=r,
        )
        self.event_loop_lag = Histogram(
            p + "event_loop_lag_seconds",
            f"How late the server's event loop woke a {LOOP_LAG_INTERVAL_S}s sleep.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.websocket_connections = Gauge(
            p + "websocket_connections", "Open /ws connections.", registry=r
        )
        self.http_requests = Counter(
            p + "http_requests",
            "HTTP requests answered, by route template and status (/ws counted when it closes).",
            ["route", "status"],
            registry=r,
        )

        # Known label values start at 0, so a dashboard sees the series before the first event.
        for reason in FINISH_REASONS:
            self.request_success.labels(reason)
        for reason in sorted(set(REJECTION_REASONS.values())):
            self.requests_rejected.labels(reason)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def count_rejection(self, code: str) -> None:
        """Count an error answer if its code refuses the request (see REJECTION_REASONS)."""
        reason = REJECTION_REASONS.get(code)
        if reason is not None:
            self.requests_rejected.labels(reason).inc()

    def read_gauges(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_cache_usage: Callable[[], float],
    ) -> None:
        """Have the engine's gauges read its state at scrape time (no work per request)."""
        self.requests_running.set_function(running)
        self.requests_waiting.set_function(waiting)
        self.kv_cache_usage.set_function(kv_cache_usage)


async def sample_event_loop_lag(
    histogram: Histogram, interval: float = LOOP_LAG_INTERVAL_S
) -> None:
    """Sleep `interval` again and again, observing how late each wake-up comes.

    A loop busy with blocking work (a long tokenization on the loop, a slow
    JSON dump) wakes the sampler late; the overshoot is what every client
    waiting on the loop waited too. Runs until cancelled.
    """
    while True:
        start = time.monotonic()
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, time.monotonic() - start - interval))
