"""Issue 9's overload benchmark: offer more than the server can do, and see who waits.

Starts a server with admission control (``--server-args``), measures its
capacity (requests/s at ``--max-running``-many concurrent streams), then offers
``--factor`` times that as Poisson arrivals for ``--duration`` seconds over the
OpenAI streaming API. Reports goodput (requests and output tokens a second that
completed), the share refused (503 ``server_busy``), TTFT p50/p99 of the
admitted requests and how fast refusals were answered. With
``--baseline-args`` a second server (e.g. admission effectively off: a huge
``--max-queue``) gets the same offered load right after, for comparison.

    python -m load_tests.overload
    python -m load_tests.overload --server-args "--max-running 16 --max-queue 0" \\
        --baseline-args "--max-running 16 --max-queue 4" \\
        --baseline-args "--max-running 16 --max-queue 100000"

Loopback servers only; every pass is bounded by ``--duration`` for arrivals and
``--timeout`` per request.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from load_tests.cli import positive_float, positive_int, run_async, say, write_json
from load_tests.clients import open_client
from load_tests.machine import describe_machine, describe_precision, machine, server_precision
from load_tests.prompts import BUILTIN_PROMPTS
from load_tests.runner import LoadSpec, run_load, warm_server
from load_tests.server import LaunchedServer
from load_tests.stats import RequestResult, distribution, markdown_table

REFUSED = "server_busy"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.overload",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--server-args", default="--max-running 16 --max-queue 0")
    p.add_argument(
        "--baseline-args",
        action="append",
        help="flags of a server to compare under the same offered load (repeatable; "
        "default: admission effectively off, --max-running 16 --max-queue 100000)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline server(s)")
    p.add_argument("--factor", type=positive_float, default=3.0, help="offered load / capacity")
    p.add_argument("--duration", type=positive_float, default=60.0, help="seconds of arrivals")
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument(
        "--capacity-requests",
        type=positive_int,
        default=48,
        help="requests of the capacity measurement",
    )
    p.add_argument("--capacity", type=positive_float, help="requests/s (skip the measurement)")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="per-request seconds")
    p.add_argument("--json", help="write the results as JSON here")
    return p


def running_slots(server_args: str) -> int:
    """--max-running from the flags (the concurrency capacity is measured at)."""
    words = shlex.split(server_args)
    if "--max-running" in words:
        return int(words[words.index("--max-running") + 1])
    return 16


async def measure_capacity(url: str, concurrency: int, requests: int, max_tokens: int) -> float:
    """Completed requests a second with ``concurrency`` streams always in flight."""
    spec = LoadSpec(concurrency=concurrency, requests=requests, max_tokens=max_tokens)
    async with open_client("openai", url) as client:
        outcome = await run_load(client, BUILTIN_PROMPTS, spec, desc="capacity")
    done = [r for r in outcome.results if r.ok]
    if not done:
        raise RuntimeError("no request completed while measuring capacity")
    return len(done) / outcome.duration


def summarize_overload(
    results: Sequence[RequestResult], duration: float, offered: float
) -> dict[str, Any]:
    first = min((r.start for r in results), default=0.0)
    admitted = [r for r in results if r.ok]
    refused = [r for r in results if not r.ok and r.error == REFUSED]
    other = [r for r in results if not r.ok and r.error != REFUSED]
    ms = 1000.0
    return {
        "offered_rps": offered,
        "requests": len(results),
        "completed": len(admitted),
        "refused": len(refused),
        "other_errors": sorted({r.error or "unknown" for r in other}),
        "other_error_count": len(other),
        "refused_share": len(refused) / len(results) if results else 0.0,
        "goodput_rps": len(admitted) / duration if duration else 0.0,
        "goodput_tok_s": sum(r.completion_tokens for r in admitted) / duration if duration else 0.0,
        "ttft_admitted_ms": distribution((r.ttft for r in admitted if r.ttft is not None), ms),
        "refusal_ms": distribution((r.latency for r in refused), ms),
        "duration_s": duration,
        # Every request: seconds from the first arrival to its start, TTFT, latency, error.
        "samples": [
            (round(r.start - first, 4), r.ttft, round(r.latency, 4), r.error)
            for r in sorted(results, key=lambda r: r.start)
        ],
    }


async def overload_pass(
    url: str, rate: float, duration: float, max_tokens: int, request_timeout: float
) -> dict[str, Any]:
    spec = LoadSpec(concurrency=None, rate=rate, duration=duration, max_tokens=max_tokens)
    async with open_client("openai", url, request_timeout=request_timeout) as client:
        outcome = await run_load(client, BUILTIN_PROMPTS, spec, desc=f"{rate:.1f} req/s")
    return summarize_overload(outcome.results, outcome.duration, rate)


def run_server(server_args: str, args: argparse.Namespace, capacity: float | None) -> dict:
    server = LaunchedServer(shlex.split(server_args))
    say(f"starting: chatserver serve {server_args}")
    with server.start():
        run_async(warm_server(server.url, "openai", 2, request_timeout=args.timeout))
        precision = server_precision(server.url)
        if capacity is None:
            slots = running_slots(server_args)
            capacity = run_async(
                measure_capacity(server.url, slots, args.capacity_requests, args.max_tokens)
            )
            say(f"capacity: {capacity:.2f} requests/s at {slots} concurrent streams")
        rate = capacity * args.factor
        result = run_async(
            overload_pass(server.url, rate, args.duration, args.max_tokens, args.timeout)
        )
    return {"server_args": server_args, "precision": precision, "capacity_rps": capacity, **result}


def report_table(runs: Sequence[dict[str, Any]]) -> str:
    headers = (
        "server flags",
        "capacity req/s",
        "offered req/s",
        "requests",
        "completed",
        "refused",
        "other errors",
        "goodput req/s",
        "goodput tok/s",
        "TTFT p50 ms (admitted)",
        "TTFT p99 ms (admitted)",
        "refusal p50 ms",
        "refusal p99 ms",
    )
    rows = []
    for r in runs:
        rows.append(
            (
                f"`{r['server_args']}`",
                r["capacity_rps"],
                r["offered_rps"],
                r["requests"],
                r["completed"],
                f"{r['refused']} ({100 * r['refused_share']:.0f}%)",
                r["other_error_count"],
                r["goodput_rps"],
                r["goodput_tok_s"],
                r["ttft_admitted_ms"]["p50"],
                r["ttft_admitted_ms"]["p99"],
                r["refusal_ms"]["p50"],
                r["refusal_ms"]["p99"],
            )
        )
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    host = machine()
    say(describe_machine(host))
    runs = [run_server(args.server_args, args, args.capacity)]
    if not args.no_baseline:
        # The same offered load: baselines get the first server's measured capacity.
        for baseline in args.baseline_args or ["--max-running 16 --max-queue 100000"]:
            runs.append(run_server(baseline, args, runs[0]["capacity_rps"]))
    print(describe_machine(host) + "\n")
    print(describe_precision(runs[0]["precision"]) + "\n")
    print(
        f"## overload: {args.factor:g}x measured capacity for {args.duration:g} s, "
        f"OpenAI streaming API, {args.max_tokens}-token replies\n"
    )
    print(report_table(runs))
    if args.json:
        from pathlib import Path

        write_json(Path(args.json), {"tool": "overload", "config": vars(args), "runs": runs})
    return 0 if all(r["completed"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
