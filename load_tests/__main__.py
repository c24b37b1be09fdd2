"""``python -m load_tests`` / ``chatserver-load``: load-test a running chatserver.

Examples::

    chatserver-load --mode ws --concurrency 8 --requests 64 --max-tokens 64 --json out.json
    chatserver-load --mode openai --rate 4 --duration 30
    chatserver-load --mode query --sweep 1,2,4,8,16,32 --requests 64 --plot sweep.png
    chatserver-load multiturn --url http://127.0.0.1:8080 --conversations 1,4 --turns 10

Reports like ``vllm bench serve`` (a table per pass on stdout, a progress bar on stderr,
``--json`` for machines). Only loopback servers unless ``--allow-remote``.

``multiturn`` runs issue 11's conversation benchmark (``load_tests/multiturn.py``,
``chatserver-load multiturn --help``): each request is a turn of a growing conversation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from load_tests.cli import int_list, positive_float, positive_int, run_async, say, write_json
from load_tests.clients import MODES
from load_tests.guard import RemoteURLRefused, check_url
from load_tests.prompts import BUILTIN_PROMPTS, load_prompts
from load_tests.runner import LoadSpec, WarmupFailed, run_pass
from load_tests.stats import format_summary, sweep_table

DEFAULT_REQUESTS = 32


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatserver-load",
        description="Load-test a running chatserver over WebSocket, HTTP query or OpenAI API. "
        "`chatserver-load multiturn ...`: the multi-turn conversation benchmark instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    p.add_argument("--mode", choices=MODES, default="ws", help="API to drive")
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="requests in flight (fixed mode, default 1); with --rate: the cap (default none)",
    )
    p.add_argument("--rate", type=positive_float, help="Poisson arrivals of R requests/s")
    p.add_argument(
        "--requests",
        type=positive_int,
        help=f"requests per pass (default {DEFAULT_REQUESTS} when --duration is not given)",
    )
    p.add_argument(
        "--duration", type=positive_float, help="seconds per pass; no new requests after"
    )
    p.add_argument("--max-tokens", type=positive_int, default=64, help="max_tokens of each reply")
    p.add_argument("--prompts", type=Path, help='JSONL file of {"prompt": ...} lines')
    p.add_argument("--sweep", type=int_list, help="one pass per concurrency, e.g. 1,2,4,8,16,32")
    p.add_argument("--json", type=Path, help="write the summary (all passes) as JSON here")
    p.add_argument("--plot", type=Path, help="PNG of latency and throughput vs concurrency")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="per-request seconds")
    p.add_argument(
        "--warmup", type=int, default=1, help="unmeasured test requests before each pass"
    )
    p.add_argument("--probe-rate", type=positive_float, help="also probe /healthz at R/s")
    p.add_argument("--model", help="model name for --mode openai (default: from /v1/models)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback --url (careful)"
    )
    return p


def make_specs(args: argparse.Namespace) -> list[LoadSpec]:
    requests = args.requests
    if requests is None and args.duration is None:
        requests = DEFAULT_REQUESTS
    levels = args.sweep or [args.concurrency if args.rate or args.concurrency else 1]
    return [
        LoadSpec(
            concurrency=c,
            requests=requests,
            duration=args.duration,
            rate=args.rate,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        for c in levels
    ]


async def run_passes(
    url: str, args: argparse.Namespace, specs: Sequence[LoadSpec], prompts: Sequence[str]
) -> list[dict[str, Any]]:
    summaries = []
    for spec in specs:
        desc = f"{args.mode} c={spec.concurrency}" + (f" rate={spec.rate}" if spec.rate else "")
        summary = await run_pass(
            url,
            args.mode,
            spec,
            prompts,
            request_timeout=args.timeout,
            model=args.model,
            warmup=args.warmup,
            probe_rate=args.probe_rate,
            progress=not args.no_progress,
            desc=desc,
        )
        print(format_summary(summary), flush=True)
        summaries.append(summary)
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["multiturn"]:
        from load_tests import multiturn

        return multiturn.main(argv[1:], prog="chatserver-load multiturn")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        url = check_url(args.url, allow_remote=args.allow_remote)
    except RemoteURLRefused as e:
        print(f"chatserver-load: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        parser.error(str(e))
    try:
        specs = make_specs(args)
        prompts = load_prompts(args.prompts) if args.prompts else list(BUILTIN_PROMPTS)
    except (ValueError, OSError) as e:
        parser.error(str(e))

    try:
        summaries = run_async(run_passes(url, args, specs, prompts))
    except WarmupFailed as e:
        print(f"chatserver-load: {url}: {e}", file=sys.stderr)
        return 1
    if len(summaries) > 1:
        print("\n" + sweep_table(summaries) + "\n(latencies in ms)")
        if not summaries[0]["streamed"]:
            print(f"({args.mode} does not stream: TTFT = E2E; no TPOT or ITL)")
    if args.json:
        report = {
            "tool": "chatserver-load",
            "url": url,
            "config": {
                "mode": args.mode,
                "max_tokens": args.max_tokens,
                "requests": specs[0].requests,
                "duration": args.duration,
                "rate": args.rate,
                "concurrency": [s.concurrency for s in specs],
                "prompts": str(args.prompts) if args.prompts else "builtin",
            },
            "runs": summaries,
        }
        write_json(args.json, report)
    if args.plot:
        from load_tests.plot import plot_sweep

        plot_sweep(summaries, args.plot, title=f"chatserver {args.mode} ({url})")
        say(f"wrote {args.plot}")
    return 0 if all(s["completed"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
