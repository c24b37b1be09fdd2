"""Command-line plumbing shared by ``python -m load_tests`` and the benchmark scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is installed (it is with chatserver), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``; every value at least 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1: {text!r}")
    return values


def errors_cell(errors: dict[str, int]) -> str:
    """``{"timeout": 2, "overloaded": 1}`` -> ``"overloaded 1, timeout 2"``; ``"0"`` if none."""
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def pass_errors_cell(summary: dict[str, Any]) -> str:
    """A pass's request errors and its /healthz probe errors (prefixed) in one cell."""
    probe = {f"healthz {k}": v for k, v in summary["healthz"]["errors"].items()}
    return errors_cell({**summary["errors"], **probe})


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write a report, with the machine it ran on (load_tests.machine) in every one."""
    from load_tests.machine import machine

    report = {"machine": machine(), **report}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def say(*parts: object) -> None:
    """Progress notes go to stderr, so stdout is the report alone."""
    print(*parts, file=sys.stderr, flush=True)


def add_benchmark_args(p: argparse.ArgumentParser, plot_help: str) -> None:
    """Options every benchmark script shares: probing, timeouts, prompts, outputs."""
    p.add_argument("--probe-rate", type=positive_float, default=20.0, help="/healthz probes a s")
    p.add_argument("--timeout", type=positive_float, default=180.0, help="per-request seconds")
    p.add_argument("--ready-timeout", type=positive_float, default=300.0, help="server start")
    p.add_argument("--prompts", type=Path, help='JSONL file of {"prompt": ...} lines')
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, help=plot_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
