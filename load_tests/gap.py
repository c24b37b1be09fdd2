"""Issue 10's benchmark: does prompt work from a few hostile clients stall everyone's tokens?

One client streams greedy replies over WebSocket (a fresh session each) while 4
clients send 1 MiB messages over ``POST /v1/query`` into a 150-turn session
(each client its own copy of it: one session's turns run one at a time, so a
shared one would queue them), all 4 at once every ``--interval`` seconds (0:
each sends again as soon as it is answered, a flood that measures how the
cores are shared rather than what one message costs). It reports the gaps
between the stream's token frames (p50, p99 and the longest), first with no
other traffic, then under that load; the target is a longest gap under load
below 250 ms.

    python -m load_tests.gap                           # starts its own server
    python -m load_tests.gap --duration 60 --server-args "--engine pool --workers 2"
    python -m load_tests.gap --message-bytes 300000    # just under the character bound
    python -m load_tests.gap --interval 0              # as fast as the server answers

The server it starts keeps sessions in Redis (``--redis-url``, a key prefix
of its own, deleted afterwards), so the 150-turn sessions are written straight
into the store instead of being generated; it is started with room for them
(``--max-history-messages``) and for the messages (``--max-body-bytes``). A 1
MiB message is more than the context can hold, so the expected answer is 400
``context_length_exceeded``; what is measured is what its reading, history
and prompt work cost the stream. The load runs in a process of its own, so it
does not share the stream reader's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shlex
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from load_tests.cli import (
    errors_cell,
    non_negative_float,
    positive_float,
    positive_int,
    run_async,
    say,
    write_json,
)
from load_tests.machine import describe_machine, describe_precision, machine, server_precision
from load_tests.prompts import BUILTIN_PROMPTS
from load_tests.server import ServerFailed, target_server
from load_tests.stats import distribution, markdown_table

TARGET_MS = 250.0
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "gap.json"
STREAM_PROMPT = "Count from 1 to 300, one number per line."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.gap",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--server-args", default="", help="extra `chatserver serve` flags")
    p.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="the Redis the server uses"
    )
    p.add_argument("--clients", type=positive_int, default=4, help="clients sending big messages")
    p.add_argument("--message-bytes", type=positive_int, default=1 << 20, help="each message")
    p.add_argument(
        "--interval",
        type=non_negative_float,
        default=0.5,
        help="seconds between one client's messages (0: send again once answered)",
    )
    p.add_argument("--turns", type=positive_int, default=150, help="turns in the big session")
    p.add_argument(
        "--shared-session",
        action="store_true",
        help="all clients send into one session (their turns then run one at a time)",
    )
    p.add_argument("--max-tokens", type=positive_int, default=256, help="tokens a streamed reply")
    p.add_argument("--idle-seconds", type=positive_float, default=10.0, help="stream, no load")
    p.add_argument("--duration", type=positive_float, default=20.0, help="stream under load, s")
    p.add_argument("--ready-timeout", type=positive_float, default=300.0, help="server start")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the results here")
    return p


# --- the 150-turn sessions ------------------------------------------------------------


def history_turn(i: int) -> tuple[dict[str, str], dict[str, str]]:
    """A plausible turn of about 150 tokens: a question and a longer answer."""
    topic = BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]
    answer = " ".join(
        f"{topic} Part {i}.{k}: this is how it goes, in some detail." for k in range(8)
    )
    return {"role": "user", "content": f"{i}: {topic}"}, {"role": "assistant", "content": answer}


async def seed_sessions(redis_url: str, prefix: str, sessions: int, turns: int) -> list[str]:
    """Sessions of `turns` turns each, written into the server's store (owner: no API key)."""
    from chatserver.sessions.redis import RedisSessionStore

    store = RedisSessionStore(redis_url, ttl=3600, prefix=prefix)
    try:
        ids = []
        for _ in range(sessions):
            sid = await store.create(owner="")
            for i in range(turns):
                await store.append_turn(sid, *history_turn(i), owner="")
            ids.append(sid)
        return ids
    finally:
        await store.close()


async def delete_prefix(redis_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# --- the load: big messages, in a process of its own ----------------------------------


def load_process(
    url: str, session_ids: list[str], message_bytes: int, interval: float, stop: Any, results: Any
) -> None:
    """Entry point of the load process: send until `stop` is set, then put the outcome."""
    results.put(asyncio.run(send_big_messages(url, session_ids, message_bytes, interval, stop)))


async def send_big_messages(
    url: str, session_ids: list[str], message_bytes: int, interval: float, stop: Any
) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    message = ("word " * (message_bytes // 5 + 1))[:message_bytes]

    async def client(http: aiohttp.ClientSession, sid: str) -> None:
        body = json.dumps({"message": message, "session_id": sid, "max_tokens": 16}).encode()
        next_at = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += interval
            started = time.perf_counter()
            try:
                async with http.post(
                    url + "/v1/query", data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    answer = await r.json()
                    code = answer.get("error", {}).get("code") if r.status != 200 else "ok"
                    statuses[f"{r.status} {code}"] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                statuses[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - started)

    timeout = aiohttp.ClientTimeout(total=120)
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(client(http, sid) for sid in session_ids))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "statuses": dict(sorted(statuses.items())),
        "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "latency_ms": distribution(latencies, 1000.0),
    }


# --- the stream being watched ---------------------------------------------------------


async def watch_stream(url: str, seconds: float, max_tokens: int) -> dict[str, Any]:
    """Stream replies one after another for `seconds`; the gaps between token frames."""
    ws_url = url.replace("http://", "ws://") + "/ws"
    gaps: list[float] = []
    replies = tokens = 0
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    frame = {
        "type": "chat",
        "id": "s",
        "content": STREAM_PROMPT,
        "params": {"max_tokens": max_tokens, "temperature": 0},
    }
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.ws_connect(ws_url) as ws:  # a fresh session: history stays short
                await ws.send_json(frame)
                last = None
                while True:
                    try:
                        msg = json.loads((await ws.receive(timeout=120)).data)
                    except (TimeoutError, TypeError, ValueError) as exc:
                        errors[type(exc).__name__] += 1  # no frame for 2 minutes, or closed
                        break
                    if msg["type"] == "token":
                        now = time.perf_counter()
                        if last is not None and time.monotonic() < deadline:
                            gaps.append(now - last)
                        last = now
                    elif msg["type"] == "done":
                        replies += 1
                        tokens += msg["usage"]["completion_tokens"]
                        break
                    elif msg["type"] == "error":
                        errors[msg["code"]] += 1
                        break
    return {
        "replies": replies,
        "tokens": tokens,
        "errors": dict(errors),
        "gap_ms": distribution(gaps, 1000.0),
    }


async def loaded_stream(
    url: str, args: argparse.Namespace, session_ids: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    load = ctx.Process(
        target=load_process,
        args=(url, session_ids, args.message_bytes, args.interval, stop, results),
    )
    load.start()
    try:
        await asyncio.sleep(2.0)  # the load process is up and its first messages are in
        stream = await watch_stream(url, args.duration, args.max_tokens)
    finally:
        stop.set()
    outcome = await asyncio.to_thread(results.get, True, 180)
    load.join(30)
    return stream, outcome


# --- report ---------------------------------------------------------------------------


def report(
    idle: dict[str, Any], loaded: dict[str, Any], load: dict[str, Any], args: argparse.Namespace
) -> str:
    rows = []
    for phase, run in (("no other traffic", idle), ("under load", loaded)):
        gap = run["gap_ms"]
        errors = errors_cell(run["errors"])
        rows.append(
            (phase, run["replies"], run["tokens"], gap["p50"], gap["p99"], gap["max"], errors)
        )
    headers = ("stream", "replies", "tokens", "gap p50 ms", "gap p99 ms", "longest gap ms")
    table = markdown_table((*headers, "errors"), rows)
    longest = loaded["gap_ms"]["max"]
    verdict = (
        "n/a (no gaps measured)"
        if longest is None
        else f"{longest:.1f} ms {'<' if longest < TARGET_MS else '>='} {TARGET_MS:g} ms: "
        + ("met" if longest < TARGET_MS else "NOT met")
    )
    statuses = ", ".join(f"{k}: {v}" for k, v in load["statuses"].items()) or "none"
    pace = f"each every {args.interval:g} s" if args.interval else "each again once answered"
    lat = load["latency_ms"]
    return "\n".join(
        [
            f"## gap: {args.clients} clients sending {args.message_bytes} B messages "
            f"({pace}) into {'one' if args.shared_session else 'their own'} "
            f"{args.turns}-turn session{'' if args.shared_session else 's'}, one WebSocket "
            "stream watched\n",
            table,
            "",
            f"load: {load['requests']} requests ({load['requests_per_s']:.1f}/s), answers "
            f"{statuses}; latency p50 {lat['p50'] or 0:.0f} ms, max {lat['max'] or 0:.0f} ms",
            f"longest inter-token gap under load: {verdict}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    host = machine()
    say(describe_machine(host))
    prefix = f"chatserver-gap-{uuid.uuid4().hex[:8]}:"
    flags = [
        "--redis-url",
        args.redis_url,
        "--redis-prefix",
        prefix,
        "--max-history-messages",
        str(2 * args.turns + 64),
        "--max-body-bytes",
        str(args.message_bytes + (64 << 10)),
        "--log-level",
        "warning",
        *shlex.split(args.server_args),
    ]
    try:
        with target_server(None, flags, args.ready_timeout) as (url, _, _):
            precision = server_precision(url)
            sessions = 1 if args.shared_session else args.clients
            say(f"writing {sessions} session(s) of {args.turns} turns into Redis")
            ids = run_async(seed_sessions(args.redis_url, prefix, sessions, args.turns))
            if args.shared_session:
                ids *= args.clients
            say("warm-up reply")
            run_async(watch_stream(url, 0.1, 8))
            say(f"watching a stream for {args.idle_seconds:g} s with no other traffic")
            idle = run_async(watch_stream(url, args.idle_seconds, args.max_tokens))
            say(f"watching a stream for {args.duration:g} s under load")
            loaded, load = run_async(loaded_stream(url, args, ids))
    except ServerFailed as e:
        say(f"gap: {e}")
        return 1
    finally:
        run_async(delete_prefix(args.redis_url, prefix))
    print(describe_machine(host) + "\n")
    print(describe_precision(precision) + "\n")
    print(report(idle, loaded, load, args))
    config = {
        "clients": args.clients,
        "message_bytes": args.message_bytes,
        "interval": args.interval,
        "turns": args.turns,
        "shared_session": args.shared_session,
        "max_tokens": args.max_tokens,
        "idle_seconds": args.idle_seconds,
        "duration": args.duration,
        "server_args": args.server_args,
        "target_ms": TARGET_MS,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        args.json,
        {
            "tool": "gap",
            "config": config,
            "precision": precision,
            "idle": idle,
            "loaded": loaded,
            "load": load,
            "longest_gap_ms": loaded["gap_ms"]["max"],
            "met": loaded["gap_ms"]["max"] is not None and loaded["gap_ms"]["max"] < TARGET_MS,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
