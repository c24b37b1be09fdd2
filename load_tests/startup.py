"""How long ``chatserver serve`` takes to answer ``/readyz`` 200, from the moment it is spawned.

Every server start pays it: ``make run``, a restart after a deploy, each test
server of ``make test``. Runs are alternated between the configurations (and
checkouts) compared, so a machine that drifts slower over the minutes weighs on
all of them alike::

    python -m load_tests.startup --runs 5
    python -m load_tests.startup --runs 5 --config "float32=--dtype float32" \\
        --config "no gate=--skip-quality-gate"
    python -m load_tests.startup --runs 5 --checkout /tmp/chatserver-before  # A/B

``--checkout DIR`` runs the same configurations from another checkout of the
project (``python -m chatserver`` there imports that checkout's code; it needs
its ``models/`` too). Prints the machine, then one row per configuration:
median, min and max seconds to ready; ``--json`` saves every run.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from load_tests.cli import positive_int, write_json
from load_tests.machine import describe_machine, describe_precision, machine, server_precision
from load_tests.server import LaunchedServer
from load_tests.stats import markdown_table

DEFAULT_CONFIGS = ("default=",)


def parse_config(text: str) -> tuple[str, list[str]]:
    """``name=flags`` (flags split like a shell would)."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--config wants NAME=FLAGS, got {text!r}")
    return name.strip(), shlex.split(flags)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.startup",
        description="Seconds from spawning `chatserver serve` to /readyz 200.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--runs", type=positive_int, default=3, help="starts per configuration")
    p.add_argument(
        "--config",
        action="append",
        type=parse_config,
        help='NAME=FLAGS, e.g. "float32=--dtype float32" (repeatable; default: the defaults)',
    )
    p.add_argument(
        "--checkout",
        type=Path,
        help="also run every configuration from this other checkout of chatserver",
    )
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, help="write every run here")
    return p


def time_to_ready(flags: Sequence[str], cwd: Path | None, timeout: float) -> tuple[float, dict]:
    """One start: seconds to ready, and the precision the server then reported."""
    server = LaunchedServer(flags, ready_timeout=timeout, cwd=cwd)
    started = time.monotonic()
    server.spawn()
    try:
        server.wait_ready()
        return time.monotonic() - started, server_precision(server.url)
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configs = args.config or [parse_config(c) for c in DEFAULT_CONFIGS]
    names = [name for name, _ in configs]
    if len(set(names)) != len(names):
        print("--config names must differ", file=sys.stderr)
        return 2
    if args.checkout is not None and not (args.checkout / "chatserver").is_dir():
        print(f"--checkout {args.checkout}: no chatserver package there", file=sys.stderr)
        return 2
    info = machine()
    print(describe_machine(info))
    trees: list[tuple[str, Path | None]] = [("this checkout", None)]
    if args.checkout is not None:
        trees.append((str(args.checkout), args.checkout))
    seconds: dict[tuple[str, str], list[float]] = {}
    precisions: dict[tuple[str, str], dict[str, Any]] = {}
    for run in range(args.runs):
        for tree, cwd in trees:
            for name, flags in configs:
                try:
                    took, precision = time_to_ready(flags, cwd, args.ready_timeout)
                except (RuntimeError, TimeoutError) as exc:
                    print(f"{name} ({tree}): did not start: {exc}", file=sys.stderr)
                    return 1
                seconds.setdefault((tree, name), []).append(took)
                precisions[(tree, name)] = precision
                print(f"run {run + 1}/{args.runs}: {name} ({tree}) ready in {took:.2f} s")
    flags_of = {name: shlex.join(flags) or "(defaults)" for name, flags in configs}
    rows = [
        (name, tree, flags_of[name], f"{statistics.median(runs):.2f}")
        + (f"{min(runs):.2f}", f"{max(runs):.2f}")
        for (tree, name), runs in seconds.items()
    ]
    print()
    for (tree, name), precision in precisions.items():
        print(f"{name} ({tree}): {describe_precision(precision)}")
    print(markdown_table(("config", "checkout", "flags", "median s", "min s", "max s"), rows))
    if args.json is not None:
        write_json(
            args.json,
            {
                "machine": info,
                "runs": [
                    {"config": name, "checkout": tree, "seconds": [round(s, 3) for s in runs]}
                    for (tree, name), runs in seconds.items()
                ],
                "precision": {f"{name} ({tree})": p for (tree, name), p in precisions.items()},
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
