"""Issue 14's benchmark: what does constrained decoding cost the batch?

``--concurrency`` streams (16) of chat completions over ``/v1/chat/completions``
(streamed, sampled at temperature 1, ``--max-tokens`` each; every stream sends
its next request as soon as one ends), first with no ``response_format``, then
with a ``json_schema`` on every stream, each for ``--duration`` seconds. It
reports generated tokens per second in both runs and their ratio (target:
constrained within 15% of unconstrained), every constrained reply's validity
against the schema, and the worker's grammar time per decoding step (masks
and matcher advances, from ``chatserver:grammar_mask_seconds_total`` over
``chatserver:worker_step_seconds_count`` on /metrics) beside the mean step.

    python -m load_tests.structured                    # starts its own server
    python -m load_tests.structured --duration 30 --server-args "--dtype float32"
    python -m load_tests.structured --url http://127.0.0.1:8000

The unconstrained replies ignore the end token (``ignore_eos``), so both runs
keep every stream generating; a constrained reply ends where its schema does.
Tokens/s counts what the server generated during the ``--duration`` window,
while every stream is busy (``chatserver:generation_tokens_total`` read at its
start and end); the replies in flight at the end are then awaited and
validated but not counted. Counting them too (``tokens_per_s_with_drain`` in
the JSON) measured the drain: streams whose last reply ended early sat idle
while the longest finished, which costs the run with shorter replies, the
constrained one (2-core AMD EPYC, torch capability AVX512, 2026-12-02, one
run: ratio 0.958 in the window, 0.918 with the drain).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema

from load_tests.cli import positive_float, positive_int, run_async, say, write_json
from load_tests.clients.openai_chat import served_model, sse_chunks
from load_tests.machine import describe_machine, machine
from load_tests.server import ServerFailed, target_server

TARGET_RATIO = 0.85
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "structured.json"
PROMPT = "Describe three people you know as JSON."
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "role": {"enum": ["friend", "family", "colleague"]},
                    "hobbies": {
                        "type": "array",
                        "maxItems": 3,
                        "items": {"type": "string", "maxLength": 16},
                    },
                },
                "required": ["name", "age", "role", "hobbies"],
                "additionalProperties": False,
            },
        },
        "summary": {"type": "string", "maxLength": 80},
    },
    "required": ["people", "summary"],
    "additionalProperties": False,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.structured",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--server-args", default="", help="extra `chatserver serve` flags")
    p.add_argument("--concurrency", type=positive_int, default=16, help="streams at once")
    p.add_argument("--max-tokens", type=positive_int, default=96, help="tokens per reply")
    p.add_argument("--duration", type=positive_float, default=20.0, help="seconds per run")
    p.add_argument("--ready-timeout", type=positive_float, default=300.0)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the report goes")
    return p


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    """The sum of one metric's samples on /metrics (0 when absent)."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    pattern = re.compile(rf"^chatserver:{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


async def one_reply(
    session: aiohttp.ClientSession, url: str, model: str, body: dict[str, Any]
) -> tuple[int, str, str]:
    """One streamed reply: (completion tokens, text, finish reason)."""
    request = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 1.0,
        **body,
    }
    text, tokens, reason = "", 0, ""
    async with session.post(url + "/v1/chat/completions", json=request) as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {await r.text()}")
        async for chunk in sse_chunks(r):
            for choice in chunk.get("choices") or []:
                text += choice.get("delta", {}).get("content") or ""
                reason = choice.get("finish_reason") or reason
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, text, reason


async def run(
    url: str, model: str, body: dict[str, Any], concurrency: int, duration: float
) -> dict[str, Any]:
    """``concurrency`` streams sending ``body`` back to back for ``duration`` seconds."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        grammar0 = await metric(session, url, "grammar_mask_seconds_total")
        steps0 = await metric(session, url, "worker_step_seconds_count")
        step_s0 = await metric(session, url, "worker_step_seconds_sum")
        replies: list[tuple[int, str, str]] = []
        generated0 = await metric(session, url, "generation_tokens_total")
        began = time.monotonic()
        deadline = began + duration

        async def stream() -> None:
            while time.monotonic() < deadline:
                replies.append(await one_reply(session, url, model, body))

        async def generated_by_deadline() -> float:
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            return await metric(session, url, "generation_tokens_total") - generated0

        window = asyncio.create_task(generated_by_deadline())
        await asyncio.gather(*(stream() for _ in range(concurrency)))
        wall = time.monotonic() - began
        in_window = await window
        steps = await metric(session, url, "worker_step_seconds_count") - steps0
        step_s = await metric(session, url, "worker_step_seconds_sum") - step_s0
        grammar = await metric(session, url, "grammar_mask_seconds_total") - grammar0
    tokens = sum(t for t, _, _ in replies)
    return {
        "replies": len(replies),
        "tokens": tokens,
        "seconds": round(wall, 2),
        "tokens_per_s": round(in_window / duration, 2),
        "tokens_per_s_with_drain": round(tokens / wall, 2),
        "steps": int(steps),
        "step_ms_mean": round(1000 * step_s / steps, 2) if steps else None,
        "grammar_ms_per_step": round(1000 * grammar / steps, 3) if steps else None,
        "texts": [(t, r) for _, t, r in replies],
    }


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        model = await served_model(session, url)
    fmt = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}
    # A short warm-up of each kind (the first grammar compiles, caches fill).
    await run(url, model, {"max_tokens": 8, "response_format": fmt}, 2, 0.1)
    base = {"max_tokens": args.max_tokens}
    say(f"unconstrained: {args.concurrency} streams for {args.duration:g} s")
    free = await run(url, model, {**base, "ignore_eos": True}, args.concurrency, args.duration)
    say(f"json_schema: {args.concurrency} streams for {args.duration:g} s")
    held = await run(url, model, {**base, "response_format": fmt}, args.concurrency, args.duration)
    texts = held.pop("texts")
    free.pop("texts")
    # A reply cut by max_tokens is unfinished JSON, not a broken guarantee.
    finished = [t for t, reason in texts if reason == "stop"]
    held["finished"] = len(finished)
    held["valid"] = sum(valid(t) for t in finished)
    ratio = held["tokens_per_s"] / free["tokens_per_s"] if free["tokens_per_s"] else 0.0
    return {
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "unconstrained": free,
        "json_schema": held,
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "passed": ratio >= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = shlex.split(args.server_args)
    try:
        with target_server(args.url, flags, args.ready_timeout) as (url, _, _):
            report = run_async(measure(args, url))
    except ServerFailed as e:
        print(e, file=sys.stderr)
        return 1
    report["machine"] = machine()
    write_json(args.json, report)
    free, held = report["unconstrained"], report["json_schema"]
    print(describe_machine(report["machine"]))
    print(
        f"tokens/s at concurrency {report['concurrency']}: unconstrained "
        f"{free['tokens_per_s']}, json_schema {held['tokens_per_s']} "
        f"(ratio {report['ratio']}, target >= {TARGET_RATIO}: "
        f"{'PASS' if report['passed'] else 'FAIL'})"
    )
    print(
        f"step: {free['step_ms_mean']} ms unconstrained, {held['step_ms_mean']} ms "
        f"constrained, of which grammar {held['grammar_ms_per_step']} ms; "
        f"{held['valid']}/{held['finished']} finished constrained replies valid for the schema "
        f"({held['replies'] - held['finished']} cut by max_tokens)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
