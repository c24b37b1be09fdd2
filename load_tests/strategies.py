"""Issue 4's comparison: the same workload against the server's four ways of running a model.

For each strategy it starts ``chatserver serve --engine X`` itself on a free loopback
port, waits for ``/readyz``, sends one warm-up request, runs the workload with a
``/healthz`` prober alongside (event-loop responsiveness), and stops the server with
SIGTERM. Output: a markdown table, ``--json`` and a ``--plot`` PNG.

    python -m load_tests.strategies                                  # all four, modest load
    python -m load_tests.strategies --engines thread,gpu --concurrency 16 --requests 64

Strategies: ``inline`` (model on the event loop: the loop stalls), ``thread`` (a thread,
GIL-bound), ``pool`` (worker processes), all three one sequence at a time
(``--max-batch 1``), and ``gpu`` (the batching worker; on a machine without CUDA it runs
on the CPU). ``inline-batch`` and ``thread-batch`` host the batching loop in-process. The default
workload (8 concurrent, 32 requests of 32 tokens) finishes in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from load_tests.cli import (
    add_benchmark_args,
    pass_errors_cell,
    positive_float,
    positive_int,
    run_async,
    say,
    write_json,
)
from load_tests.prompts import BUILTIN_PROMPTS, load_prompts
from load_tests.runner import LoadSpec, WarmupFailed, run_pass
from load_tests.server import LaunchedServer
from load_tests.stats import markdown_table

# name -> (label, chatserver serve flags)
STRATEGIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "inline": ("inline, no batching", ("--engine", "inline", "--max-batch", "1")),
    "thread": ("thread, no batching", ("--engine", "thread", "--max-batch", "1")),
    "pool": ("pool, no batching", ("--engine", "pool", "--max-batch", "1")),
    "gpu": ("gpu worker, batching", ("--engine", "gpu")),
    # The same batching loop hosted in-process, to separate "where" from "batching".
    "inline-batch": ("inline, batching", ("--engine", "inline")),
    "thread-batch": ("thread, batching", ("--engine", "thread")),
}
DEFAULT_STRATEGIES = ("inline", "thread", "pool", "gpu")
HEADERS = (
    "strategy",
    "server flags",
    "ok",
    "req/s",
    "out tok/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "/healthz p50 ms",
    "/healthz p99 ms",
    "errors",
)


def engine_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.strategies",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--engines",
        type=engine_list,
        default=list(DEFAULT_STRATEGIES),
        help="comma-separated subset",
    )
    p.add_argument("--mode", choices=("ws", "query", "openai"), default="ws", help="API to drive")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight")
    p.add_argument("--requests", type=positive_int, default=32, help="requests per strategy")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="tokens per reply")
    p.add_argument("--duration", type=positive_float, default=300.0, help="cap, s a strategy")
    p.add_argument("--server-args", default="", help="extra `chatserver serve` flags for all")
    add_benchmark_args(p, plot_help="PNG chart of the table")
    return p


def run_strategy(name: str, args: argparse.Namespace, prompts: Sequence[str]) -> dict[str, Any]:
    label, flags = STRATEGIES[name]
    server_flags = [*flags, *shlex.split(args.server_args)]
    row: dict[str, Any] = {"name": name, "label": label, "flags": shlex.join(server_flags)}
    server = LaunchedServer(server_flags, ready_timeout=args.ready_timeout)
    say(f"[{name}] starting: {shlex.join(server.command)}")
    try:
        server.start()
    except (RuntimeError, TimeoutError) as e:
        row["error"] = f"server did not start: {e}"
        say(f"[{name}] {row['error']}")
        return row
    try:
        spec = LoadSpec(
            concurrency=args.concurrency,
            requests=args.requests,
            duration=args.duration,
            max_tokens=args.max_tokens,
        )
        row["summary"] = run_async(
            run_pass(
                server.url,
                args.mode,
                spec,
                prompts,
                request_timeout=args.timeout,
                warmup=1,
                probe_rate=args.probe_rate,
                progress=not args.no_progress,
                desc=name,
            )
        )
    except WarmupFailed as e:
        row["error"] = str(e)
        say(f"[{name}] {e}\n{server.log_tail()}")
    finally:
        row["exit_status"] = server.stop()
    return row


def report_table(rows: Sequence[dict[str, Any]]) -> str:
    cells = []
    for r in rows:
        s = r.get("summary")
        if s is None:
            cells.append((r["label"], r["flags"], "n/a", *["n/a"] * 6, r.get("error", "?")))
            continue
        health = s["healthz"]
        cells.append(
            (
                r["label"],
                r["flags"],
                f"{s['completed']}/{s['requests']}",
                s["request_throughput"],
                s["output_throughput"],
                s["ttft_ms"]["p50"],
                s["ttft_ms"]["p99"],
                health["latency_ms"]["p50"],
                health["latency_ms"]["p99"],
                pass_errors_cell(s),
            )
        )
    return markdown_table(HEADERS, cells)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prompts = load_prompts(args.prompts) if args.prompts else list(BUILTIN_PROMPTS)
    except (ValueError, OSError) as e:
        parser.error(str(e))

    rows = [run_strategy(name, args, prompts) for name in args.engines]

    print(
        f"## strategies: {args.mode} API, concurrency {args.concurrency}, "
        f"{args.requests} requests of {args.max_tokens} tokens, "
        f"/healthz probed at {args.probe_rate:g}/s\n"
    )
    print(report_table(rows))
    if args.json:
        write_json(
            args.json,
            {
                "tool": "strategies",
                "config": {
                    "mode": args.mode,
                    "concurrency": args.concurrency,
                    "requests": args.requests,
                    "max_tokens": args.max_tokens,
                    "probe_rate": args.probe_rate,
                    "server_args": args.server_args,
                },
                "strategies": rows,
            },
        )
    if args.plot:
        from load_tests.plot import plot_strategies

        measured = [r for r in rows if "summary" in r]
        if measured:
            plot_strategies(
                [{**r, "name": r["label"]} for r in measured],
                args.plot,
                title=f"{args.concurrency} concurrent {args.mode} chats, "
                f"{args.max_tokens}-token replies",
            )
            say(f"wrote {args.plot}")
    return 0 if all(r.get("summary", {}).get("completed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
