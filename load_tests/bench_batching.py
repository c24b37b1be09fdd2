"""Issue 3's benchmark: does continuous batching scale, and does the server stay responsive?

Drives one server through its streaming API at rising concurrency (default 1, 4, 16, 32,
64) with 64-token greedy replies (temperature 0) to distinct prompts, and prints a
markdown table: aggregate output tokens/s and its ratio to the first level, TTFT and ITL
p50/p99, and ``/healthz`` p50/p99 from a prober running alongside the load. Before the
load it measures the idle server's CPU use (% of one core over ``--idle-seconds``, from
``/proc`` of the server and its children).

    python -m load_tests.bench_batching                          # starts its own server
    python -m load_tests.bench_batching --server-args "--engine gpu --max-batch 32"
    python -m load_tests.bench_batching --url http://127.0.0.1:8080 --pid 1234
    python -m load_tests.bench_batching --baseline-args "--dtype float32"   # side by side

The report starts with the machine (CPU model, cores, torch's CPU capability) and
the precision the server actually served (its /readyz, after the quality gate).
With ``--baseline-args`` a second server with those flags runs the same levels
right after, and a last table gives each level's throughput ratio to it.

Every level is bounded: ``max(rounds * concurrency, min-requests)`` requests and at most
``--level-duration`` seconds. Loopback servers only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import urllib.request
from collections.abc import Sequence
from typing import Any

from load_tests.cli import (
    add_benchmark_args,
    int_list,
    non_negative_float,
    pass_errors_cell,
    positive_float,
    positive_int,
    run_async,
    say,
    write_json,
)
from load_tests.guard import check_url
from load_tests.machine import describe_machine, describe_precision, machine, server_precision
from load_tests.prompts import BUILTIN_PROMPTS, load_prompts
from load_tests.runner import LoadSpec, WarmupFailed, run_pass, warm_server
from load_tests.server import ServerFailed, measure_idle_cpu, parse_stat, target_server
from load_tests.stats import markdown_table

STREAMING_MODES = ("ws", "openai")
HEADERS = (
    "concurrency",
    "requests",
    "full-length",
    "out tok/s",
    "vs first level",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "/healthz p50 ms",
    "/healthz p99 ms",
    "server CPU µs/tok",
    "errors",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.bench_batching",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help="drive this running server (loopback only)")
    target.add_argument(
        "--start", action="store_true", help="start a server itself (the default without --url)"
    )
    p.add_argument("--server-args", default="", help="extra `chatserver serve` flags for --start")
    p.add_argument(
        "--baseline-args",
        help="also start a server with these flags (e.g. '--dtype float32') and compare",
    )
    p.add_argument("--pid", type=int, help="the --url server's pid, for the idle CPU measurement")
    p.add_argument("--mode", choices=STREAMING_MODES, default="ws", help="streaming API to drive")
    p.add_argument("--levels", type=int_list, default=[1, 4, 16, 32, 64], help="concurrencies")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="tokens per reply")
    p.add_argument("--rounds", type=positive_int, default=2, help="requests per worker per level")
    p.add_argument("--min-requests", type=positive_int, default=8, help="least requests a level")
    p.add_argument("--level-duration", type=positive_float, default=180.0, help="cap, s a level")
    p.add_argument("--idle-seconds", type=non_negative_float, default=10.0, help="0: skip")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests before all")
    p.add_argument(
        "--fresh-connections",
        action="store_true",
        help="a new connection a request (llama-server closes kept-alive streams)",
    )
    add_benchmark_args(p, plot_help="PNG of latency and throughput vs concurrency")
    return p


def server_info(url: str) -> dict[str, Any]:
    """What ``/healthz`` says about the server (model, engine...), for the record."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return {}


def level_requests(concurrency: int, rounds: int, min_requests: int) -> int:
    return max(rounds * concurrency, min_requests)


def server_cpu_seconds(pid: int | None) -> float | None:
    """CPU time of the front-end process alone (not its workers), or None if unknown."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())[1]
    except (OSError, ValueError, IndexError):
        return None


def run_levels(
    url: str, args: argparse.Namespace, prompts: Sequence[str], pid: int | None = None
) -> list[dict]:
    summaries = []
    for c in args.levels:
        cpu_before = server_cpu_seconds(pid)
        spec = LoadSpec(
            concurrency=c,
            requests=level_requests(c, args.rounds, args.min_requests),
            duration=args.level_duration,
            max_tokens=args.max_tokens,
        )
        summary = run_async(
            run_pass(
                url,
                args.mode,
                spec,
                prompts,
                request_timeout=args.timeout,
                warmup=0,
                probe_rate=args.probe_rate,
                progress=not args.no_progress,
                desc=f"c={c}",
                fresh_connections=args.fresh_connections,
            )
        )
        # How much of a core the server itself spends per streamed token: the front
        # end's ceiling once the model is fast (a GPU), whatever the workers do.
        cpu_after = server_cpu_seconds(pid)
        summary["server_cpu_us_per_token"] = (
            1e6 * (cpu_after - cpu_before) / summary["output_tokens"]
            if cpu_before is not None and cpu_after is not None and summary["output_tokens"]
            else None
        )
        summaries.append(summary)
    return summaries


def report_table(summaries: Sequence[dict[str, Any]]) -> str:
    base = summaries[0]["output_throughput"] if summaries else 0.0
    rows = []
    for s in summaries:
        health = s["healthz"]["latency_ms"]
        rows.append(
            (
                s["concurrency"],
                f"{s['completed']}/{s['requests']}",
                f"{s['full_length']}/{s['completed']}",
                s["output_throughput"],
                f"{s['output_throughput'] / base:.2f}x" if base else "n/a",
                s["ttft_ms"]["p50"],
                s["ttft_ms"]["p99"],
                s["itl_ms"]["p50"],
                s["itl_ms"]["p99"],
                health["p50"],
                health["p99"],
                _cpu_cell(s.get("server_cpu_us_per_token")),
                pass_errors_cell(s),
            )
        )
    headers = list(HEADERS)
    if summaries:
        headers[4] = f"vs c={summaries[0]['concurrency']}"
    return markdown_table(headers, rows)


def _cpu_cell(us_per_token: float | None) -> str:
    return "n/a" if us_per_token is None else f"{us_per_token:.0f}"


def notes(summaries: Sequence[dict[str, Any]], max_tokens: int) -> list[str]:
    out = [
        f"out tok/s counts every completed reply's tokens (server usage); full-length = "
        f"replies of all {max_tokens} tokens. TTFT includes the connection. server CPU "
        "µs/tok: CPU time of the server process alone (workers excluded) per output token.",
    ]
    short = sum(s["completed"] - s["full_length"] for s in summaries)
    if short:
        out.append(
            f"note: {short} {'reply' if short == 1 else 'replies'} ended before {max_tokens} "
            "tokens (the model chose to stop); their tokens are counted, so per-level "
            f"output is a little under requests x {max_tokens}."
        )
    return out


def bench_server(
    server_args: str, args: argparse.Namespace, prompts: Sequence[str], url: str | None = None
) -> dict[str, Any] | None:
    """Start (unless `url`), warm up, measure idle CPU and every level; None if it failed."""
    flags = shlex.split(server_args)
    try:
        with target_server(url, flags, args.ready_timeout, args.pid) as (url, pid, server):
            return _bench(url, pid, server is not None, server_args, args, prompts)
    except ServerFailed as e:
        say(f"bench_batching: {e}")
        return None


def _bench(
    url: str,
    pid: int | None,
    started: bool,
    server_args: str,
    args: argparse.Namespace,
    prompts: Sequence[str],
) -> dict[str, Any] | None:
    """Measure a ready server: warm-up, idle CPU, every level; None if the warm-up failed."""
    info = server_info(url)
    precision = server_precision(url)
    say(f"server {url}: {json.dumps(info)}")
    try:  # first-use costs (model warm-up, thread pools) are not what we measure
        if args.warmup:
            run_async(
                warm_server(
                    url,
                    args.mode,
                    args.warmup,
                    request_timeout=args.timeout,
                    fresh_connections=args.fresh_connections,
                )
            )
    except WarmupFailed as e:
        say(f"bench_batching: {url}: {e}")
        return None
    idle = None
    if pid and args.idle_seconds > 0:
        say(f"measuring idle CPU of pid {pid} and children for {args.idle_seconds:.0f}s")
        try:
            idle = measure_idle_cpu(pid, args.idle_seconds)
        except OSError as e:  # no such pid, or no /proc here
            say(f"idle CPU not measured: {e}")
    summaries = run_levels(url, args, prompts, pid)
    return {
        "url": url,
        "server": info,
        "server_args": server_args if started else None,
        "precision": precision,
        "idle_cpu": idle,
        "levels": summaries,
    }


def print_report(run: dict[str, Any], args: argparse.Namespace, label: str) -> None:
    summaries, idle = run["levels"], run["idle_cpu"]
    print(
        f"## bench_batching{label}: {args.mode} API, {args.max_tokens}-token greedy replies, "
        f"/healthz probed at {args.probe_rate:g}/s\n"
    )
    if run["server_args"] is not None:
        print(f"server flags: `{run['server_args']}`  ")
    print(describe_precision(run["precision"]) + "\n")
    print(report_table(summaries))
    print()
    for line in notes(summaries, args.max_tokens):
        print(line)
    if idle is not None:
        print(
            f"idle CPU: {idle['percent_of_one_core']:.2f}% of one core over "
            f"{idle['seconds']:.1f}s (pid {idle['pid']} and {idle['processes'] - 1} "
            "descendants, no traffic)"
        )
    else:
        print("idle CPU: not measured (give --pid with --url, or let it --start the server)")
    print()


def comparison_table(run: dict[str, Any], baseline: dict[str, Any]) -> str:
    rows = []
    for ours, theirs in zip(run["levels"], baseline["levels"], strict=True):
        ratio = ours["output_throughput"] / max(theirs["output_throughput"], 1e-9)
        rows.append(
            (
                ours["concurrency"],
                ours["output_throughput"],
                theirs["output_throughput"],
                f"{ratio:.2f}x",
                ours["ttft_ms"]["p50"],
                theirs["ttft_ms"]["p50"],
            )
        )
    mine = run["precision"].get("kernels", "server")
    base = baseline["precision"].get("kernels", "baseline")
    headers = (
        "concurrency",
        f"{mine} tok/s",
        f"{base} tok/s",
        "ratio",
        f"{mine} TTFT p50 ms",
        f"{base} TTFT p50 ms",
    )
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prompts = load_prompts(args.prompts) if args.prompts else list(BUILTIN_PROMPTS)
        url = check_url(args.url) if args.url else None
    except (ValueError, OSError) as e:
        parser.error(str(e))
    host = machine()
    say(describe_machine(host))
    run = bench_server(args.server_args, args, prompts, url)
    if run is None:
        return 1
    baseline = None
    if args.baseline_args is not None:
        baseline = bench_server(args.baseline_args, args, prompts)
        if baseline is None:
            return 1

    print(describe_machine(host) + "\n")
    print_report(run, args, "")
    if baseline is not None:
        print_report(baseline, args, " (baseline)")
        print("## throughput against the baseline, same run\n")
        print(comparison_table(run, baseline))
        print()

    if args.json:
        config = {
            "mode": args.mode,
            "levels": args.levels,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "rounds": args.rounds,
            "min_requests": args.min_requests,
            "probe_rate": args.probe_rate,
            "fresh_connections": args.fresh_connections,
        }
        write_json(
            args.json, {"tool": "bench_batching", "config": config, **run, "baseline": baseline}
        )
    if args.plot:
        from load_tests.plot import plot_sweep

        plot_sweep(run["levels"], args.plot, title=f"bench_batching ({args.mode})")
        say(f"wrote {args.plot}")
    runs = [run] + ([baseline] if baseline else [])
    return 0 if all(s["completed"] for r in runs for s in r["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
