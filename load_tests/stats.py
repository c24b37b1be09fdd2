"""What one request measured, and the pure arithmetic that turns many into a report.

The summary follows ``vllm bench serve``: request and token throughput, then TTFT, time
per output token (TPOT), inter-token latency (ITL) and end-to-end latency as mean, p50,
p90, p99 (and max), in milliseconds. Its JSON keys are stable so numbers can be compared
across commits.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it; times in seconds from ``time.perf_counter()``.

    ``ttft`` is the time to the first non-empty content frame/chunk (for a non-streaming
    request, the whole latency); ``itl`` the gaps between consecutive content
    frames/chunks; token counts come from the server's ``usage``.
    """

    ok: bool
    start: float
    latency: float
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    streamed: bool = True

    @property
    def end(self) -> float:
        return self.start + self.latency

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT); None if unmeasurable."""
        if not (self.ok and self.streamed) or self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.completion_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics.

    The same definition as ``numpy.percentile``'s default, so numbers match other tools.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 and max of ``values`` times ``scale`` (None when empty)."""
    scaled = [v * scale for v in values]
    out: dict[str, float | int | None] = {"count": len(scaled)}
    if not scaled:
        out.update({"mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None})
        return out
    out["mean"] = sum(scaled) / len(scaled)
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(scaled, q)
    out["max"] = max(scaled)
    return out


def summarize(
    results: Sequence[RequestResult],
    duration: float,
    *,
    mode: str,
    concurrency: int | None,
    rate: float | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """The report of one pass. ``duration`` is the wall time of the pass in seconds."""
    done = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown" for r in results if not r.ok)
    streamed = all(r.streamed for r in results) if results else True
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.completion_tokens for r in done)
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    ms = 1000.0
    return {
        "mode": mode,
        "streamed": streamed,
        "concurrency": concurrency,
        "rate": rate,
        "max_tokens": max_tokens,
        "requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": dict(sorted(errors.items())),
        "finish_reasons": dict(sorted(Counter(r.finish_reason or "none" for r in done).items())),
        "full_length": (
            sum(1 for r in done if r.completion_tokens >= max_tokens) if max_tokens else None
        ),
        "duration_s": duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "ttft_ms": distribution((r.ttft for r in done if r.ttft is not None), ms),
        "tpot_ms": distribution((t for r in done if (t := r.tpot) is not None), ms),
        "itl_ms": distribution((gap for r in done if r.streamed for gap in r.itl), ms),
        "e2e_ms": distribution((r.latency for r in done), ms),
    }


def fmt(value: float | int | None, digits: int = 2) -> str:
    """A number for a table cell; ``n/a`` for a missing one."""
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def format_summary(summary: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """The terminal table of one pass, laid out like ``vllm bench serve``'s."""
    width = 52
    lines = [f" {title} ".center(width, "=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40}{value:>12}")

    def section(name: str) -> None:
        lines.append(f" {name} ".center(width, "-"))

    row("Mode:", summary["mode"])
    if summary.get("rate"):
        row("Request rate (req/s, Poisson):", fmt(summary["rate"]))
    if summary.get("concurrency"):
        row("Concurrency:", summary["concurrency"])
    row("Requests sent:", summary["requests"])
    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    for kind, count in summary["errors"].items():
        row(f"  error {kind}:", count)
    if summary.get("full_length") is not None:
        row(f"Replies of full max_tokens ({summary['max_tokens']}):", summary["full_length"])
    row("Benchmark duration (s):", fmt(summary["duration_s"]))
    row("Total input tokens:", summary["input_tokens"])
    row("Total generated tokens:", summary["output_tokens"])
    row("Request throughput (req/s):", fmt(summary["request_throughput"]))
    row("Output token throughput (tok/s):", fmt(summary["output_throughput"]))
    row("Total token throughput (tok/s):", fmt(summary["total_token_throughput"]))
    metrics = [
        ("ttft_ms", "Time to First Token", "TTFT"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl_ms", "Inter-token Latency", "ITL"),
        ("e2e_ms", "End-to-end Latency", "E2EL"),
    ]
    for key, name, short in metrics:
        section(name)
        dist = summary[key]
        row(f"Mean {short} (ms):", fmt(dist["mean"]))
        for q in PERCENTILES:
            row(f"P{q} {short} (ms):", fmt(dist[f"p{q}"]))
    if not summary["streamed"]:
        lines.append("note: this mode does not stream: TTFT = end-to-end latency,")
        lines.append("      TPOT and ITL are not measured.")
    lines.append("=" * width)
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; numeric columns right-aligned, cells formatted by ``fmt``."""
    body = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        bool(body) and all(not row[i] or row[i][0].isdigit() or row[i] == "n/a" for row in body)
        for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric, strict=True)]
    return "\n".join([line(list(headers)), line(rule), *(line(r) for r in body)])


SWEEP_HEADERS = (
    "concurrency",
    "ok",
    "errors",
    "req/s",
    "out tok/s",
    "TTFT p50",
    "TTFT p99",
    "TPOT p50",
    "ITL p50",
    "ITL p99",
    "E2E p50",
    "E2E p99",
)


def sweep_table(summaries: Sequence[dict[str, Any]]) -> str:
    """One markdown row per pass of a sweep; latencies in ms."""
    rows = [
        (
            s["concurrency"] if s["concurrency"] is not None else "n/a",
            f"{s['completed']}/{s['requests']}",
            s["failed"],
            s["request_throughput"],
            s["output_throughput"],
            s["ttft_ms"]["p50"],
            s["ttft_ms"]["p99"],
            s["tpot_ms"]["p50"],
            s["itl_ms"]["p50"],
            s["itl_ms"]["p99"],
            s["e2e_ms"]["p50"],
            s["e2e_ms"]["p99"],
        )
        for s in summaries
    ]
    return markdown_table(SWEEP_HEADERS, rows)
