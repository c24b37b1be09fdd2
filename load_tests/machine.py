"""What a benchmark ran on, printed at the top of every report and saved in its JSON.

Figures from an AVX2 CPU and an AVX-512+VNNI one differ by kernel, not by
noise, so no number is recorded without the CPU's model, cores, torch's CPU
capability and, where a server is measured, the precision it actually served
(its /readyz says, after its quality gate chose).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any


def machine() -> dict[str, Any]:
    import torch

    from chatserver.workers.cpu_features import detect

    return {
        **detect().describe(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }


def server_precision(url: str) -> dict[str, Any]:
    """The precision a running server serves (dtype, kernels, quality gate), from /readyz."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            return json.loads(r.read()).get("precision", {})
    except (OSError, ValueError):
        return {}


def describe_machine(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch']} "
        f"CPU capability {info['cpu_capability']} ({info['cpu_kind']}), {info['date']}"
    )


def describe_precision(precision: dict[str, Any]) -> str:
    if not precision:
        return "precision: unknown (the server's /readyz did not say)"
    gate = "; ".join(
        f"{g['kernels']} {'passed' if g['passed'] else 'failed'} (ppl x{g['ppl_ratio']}, "
        f"decode x{g['decode_ppl_ratio']}, top-1 {g['top1_agreement']})"
        for g in precision.get("quality_gate", [])
    )
    held = (
        f", held to {precision['isa_limit'].upper()} (--cpu-isa: that kind's kernels, "
        "this CPU's speed)"
        if precision.get("isa_limit")
        else ""
    )
    return (
        f"precision: {precision.get('dtype')} (kernels {precision.get('kernels')}) on "
        f"{precision.get('device')}{held}" + (f"; quality gate: {gate}" if gate else "")
    )


def add_timing_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The options every in-process timing benchmark takes."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--json", help="write the rows here")


def start_timing(args: argparse.Namespace) -> dict[str, Any]:
    """Apply --threads, print the machine line, and return the machine for the JSON."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(describe_machine(info))
    return info


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return sorted(samples)[len(samples) // 2]
