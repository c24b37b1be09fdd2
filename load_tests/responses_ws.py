"""Issue 14's benchmark: a Responses API conversation over WebSocket mode vs HTTP chaining.

One conversation of T turns (default 10) per transport, each turn a new ~60-word user
message and a fixed-length greedy reply (``--max-tokens``, ``ignore_eos``), chained by
``previous_response_id`` so the server holds the history either way:

- ``ws``: one WebSocket on ``GET /v1/responses`` for the whole conversation, one
  ``response.create`` frame a turn;
- ``http``: ``POST /v1/responses`` with ``stream: true`` a turn (one keep-alive
  connection), the SSE events read as they come.

It prints, per turn, TTFT (from sending the turn to its first
``response.output_text.delta``), the turn's whole time, its input tokens and how many
the prefix cache served (``usage.input_tokens_details.cached_tokens``); then JSON under
``load_tests/results/`` (``--json``). User messages come from a fixed word list seeded by
transport and turn: both conversations have the same shape but share no text, so
neither warms the cache for the other.

    python -m load_tests.responses_ws                      # starts its own float32 server
    python -m load_tests.responses_ws --url http://127.0.0.1:8080 --turns 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from load_tests.guard import check_url
from load_tests.server import target_server

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = (
    "river stone garden lamp winter market letter violin harbor pepper window candle "
    "forest engine silver meadow ladder pocket thunder mirror basket orchard cotton "
    "island copper saddle velvet lantern compass pillow marble feather tunnel"
).split()
INSTRUCTIONS = "You are a helpful assistant."
TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}


def user_message(transport: str, turn: int, words: int = 60) -> str:
    rng = random.Random(f"{transport}:{turn}")
    return "Remember these words: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def create_body(model: str, text: str, previous: str | None, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "input": text,
        "instructions": INSTRUCTIONS,
        "previous_response_id": previous,
        "max_output_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def turn_row(turn: int, sent: float, first: float | None, response: dict[str, Any]) -> dict:
    usage = response.get("usage") or {}
    return {
        "turn": turn,
        "ttft_ms": None if first is None else round((first - sent) * 1000, 1),
        "turn_ms": round((time.perf_counter() - sent) * 1000, 1),
        "input_tokens": usage.get("input_tokens", 0),
        "cached_tokens": (usage.get("input_tokens_details") or {}).get("cached_tokens", 0),
        "status": response.get("status"),
    }


async def over_websocket(
    http: aiohttp.ClientSession, url: str, model: str, turns: int, max_tokens: int
) -> list[dict]:
    rows, previous = [], None
    async with http.ws_connect(url.replace("http", "ws", 1) + "/v1/responses") as ws:
        for turn in range(1, turns + 1):
            body = create_body(model, user_message("ws", turn), previous, max_tokens)
            sent, first = time.perf_counter(), None
            await ws.send_json({"type": "response.create", **body})
            while True:
                event = await ws.receive_json()
                if event["type"] == "response.output_text.delta" and first is None:
                    first = time.perf_counter()
                if event["type"] in TERMINAL:
                    break
            if event["type"] == "error":
                raise RuntimeError(f"turn {turn}: {event['error']}")
            rows.append(turn_row(turn, sent, first, event["response"]))
            previous = event["response"]["id"]
    return rows


async def over_http(
    http: aiohttp.ClientSession, url: str, model: str, turns: int, max_tokens: int
) -> list[dict]:
    rows, previous = [], None
    for turn in range(1, turns + 1):
        body = {**create_body(model, user_message("http", turn), previous, max_tokens)}
        sent, first, final = time.perf_counter(), None, None
        async with http.post(url + "/v1/responses", json={**body, "stream": True}) as r:
            if r.status != 200:
                raise RuntimeError(f"turn {turn}: {r.status} {await r.text()}")
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "response.output_text.delta" and first is None:
                    first = time.perf_counter()
                if event["type"] in TERMINAL:
                    final = event
        if final is None or final["type"] == "error":
            raise RuntimeError(f"turn {turn}: {final}")
        rows.append(turn_row(turn, sent, first, final["response"]))
        previous = final["response"]["id"]
    return rows


def print_table(results: dict[str, list[dict]]) -> None:
    print(
        f"{'turn':>4}  {'ws TTFT ms':>10} {'http TTFT ms':>12}  {'ws turn ms':>10} "
        f"{'http turn ms':>12}  {'input tok':>9}  {'cached ws/http':>14}"
    )
    for ws_row, http_row in zip(results["ws"], results["http"], strict=True):
        print(
            f"{ws_row['turn']:>4}  {ws_row['ttft_ms']:>10} {http_row['ttft_ms']:>12}  "
            f"{ws_row['turn_ms']:>10} {http_row['turn_ms']:>12}  {ws_row['input_tokens']:>9}  "
            f"{ws_row['cached_tokens']:>6}/{http_row['cached_tokens']:<7}"
        )
    for name, rows in results.items():
        ttfts = [r["ttft_ms"] for r in rows if r["ttft_ms"] is not None]
        print(
            f"{name}: TTFT p50 {statistics.median(ttfts):.1f} ms, mean {statistics.mean(ttfts):.1f}"
        )


async def run(url: str, turns: int, max_tokens: int) -> dict[str, list[dict]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async with http.get(url + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        # Warm both paths (first request compiles nothing, but loads the tokenizer pool).
        await over_http(http, url, model, 1, 2)
        return {
            "ws": await over_websocket(http, url, model, turns, max_tokens),
            "http": await over_http(http, url, model, turns, max_tokens),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--server-args", default="--dtype float32", help="flags of the started one")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=RESULTS / "responses_ws.json")
    args = p.parse_args(argv)
    if args.url:
        check_url(args.url)
    with target_server(args.url, shlex.split(args.server_args), args.ready_timeout) as (url, *_):
        results = asyncio.run(run(url, args.turns, args.max_tokens))
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"turns": args.turns, "max_tokens": args.max_tokens, "results": results}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
