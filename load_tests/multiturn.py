"""Issue 11's benchmark: do conversations stay fast as they grow?

N conversations at once (default 1, then 4), each T turns (default 10) of a ~190-token
user message and a 32-token greedy reply (temperature 0), over each API of ``--apis``:

- ``ws``: one socket per conversation, the history kept by the server (its session);
  each turn sends only the new message;
- ``openai``: ``/v1/chat/completions`` with the history kept by the client; each turn
  re-sends the whole conversation, its own earlier replies included;
- ``query`` (not by default): ``/v1/query`` with a session; it does not stream, so its
  TTFT is the whole reply's latency.

For each API and conversation count it prints a table by turn: prompt tokens, the share
of them served from the server's prefix cache, the share that repeats the previous turn
(about the most a prefix cache can serve), and TTFT p50 (from sending the turn to its
first token frame / content delta); then JSON and a PNG (TTFT against turn) under
``load_tests/results/``.

    python -m load_tests.multiturn                               # starts its own server
    python -m load_tests.multiturn --server-args "--dtype float32" --turns 10
    python -m load_tests.multiturn --url http://127.0.0.1:8080 --conversations 4
    python -m load_tests.multiturn --baseline-args "--no-prefix-cache"   # side by side
    python -m load_tests multiturn --url http://127.0.0.1:8080           # the load tester

Cached tokens are what the server says: ``usage.prompt_tokens_details.cached_tokens``
(OpenAI API), ``usage.cached_tokens`` (``/ws`` done frames, ``/v1/query``); a server
that says nothing counts as 0 and the report says so. User turns are generated from a
fixed word list, seeded by API, conversation count, conversation and turn, so every
prompt is distinct (no run warms the cache for another) and the same in every run (a
baseline server gets the same prompts, and its greedy replies are compared). The OpenAI
conversations start with the server's default system prompt, as sessions do.

Every run is bounded: T turns per conversation, ``--timeout`` per turn and no new turn
after ``--run-duration`` seconds. Loopback servers only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from tqdm import tqdm

from load_tests.bench_batching import server_info
from load_tests.cli import (
    errors_cell,
    int_list,
    positive_float,
    positive_int,
    run_async,
    say,
    write_json,
)
from load_tests.clients.base import StreamTimer, error_kind, http_error_kind
from load_tests.clients.openai_chat import served_model, sse_chunks
from load_tests.guard import check_url
from load_tests.machine import describe_machine, describe_precision, machine, server_precision
from load_tests.runner import WarmupFailed, warm_server
from load_tests.server import ServerFailed, target_server
from load_tests.stats import RequestResult, fmt, markdown_table, percentile

APIS = ("ws", "openai", "query")
DEFAULT_APIS = ("ws", "openai")
RESULTS = Path(__file__).resolve().parent / "results"
# chatserver's --system-prompt default: the OpenAI conversations send it themselves.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Issue 11's targets on the 2-core machine, printed beside the figures.
TARGET_GROWTH = 1.5
TARGET_CACHED_SHARE = 0.8

# --- user turns: deterministic text of about N tokens ----------------------------------

WORDS: tuple[str, ...] = tuple(
    """
    garden river morning window table letter market village winter summer bridge
    kitchen teacher bicycle harbour orchard mountain station library candle forest
    journey friend neighbour lantern meadow picnic recipe basket festival castle
    painter sailor farmer doctor baker student traveller musician gardener
    quiet bright gentle careful early late small large warm cold green yellow
    old new busy calm happy tired curious patient
    walk visit carry build paint write read cook plant bake sing follow
    open close watch remember explain describe notice discover prepare
    through across beside after before during under along behind near
    every some many few several each slowly quickly often always sometimes never
    """.split()
)
TURN_HEADER = "Here are my notes. Tell me in one sentence what they are about.\n\n"
# Measured with the default model's tokenizer (SmolLM2): the header is 16 tokens and
# the words of WORDS, in sentences of 6-12, come to 1.14 tokens a word.
HEADER_TOKENS = 16
TOKENS_PER_WORD = 1.14


def user_turn(run: str, conversation: int, turn: int, tokens: int = 190) -> str:
    """The user message of ``turn`` of ``conversation`` in ``run``: about ``tokens`` tokens
    (with the default model's tokenizer), the same text every time it is asked for."""
    rng = random.Random(f"multiturn:{run}:{conversation}:{turn}")
    count = max(1, round((tokens - HEADER_TOKENS) / TOKENS_PER_WORD))
    words: list[str] = []
    while len(words) < count:
        sentence = [rng.choice(WORDS) for _ in range(min(rng.randint(6, 12), count - len(words)))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        words += sentence
    return TURN_HEADER + " ".join(words)


def run_tag(api: str, conversations: int) -> str:
    """The seed of one run's texts: distinct per API and conversation count."""
    return f"{api}-c{conversations}"


# --- what one turn measured, and the pure arithmetic over many -------------------------


@dataclass(slots=True)
class TurnResult:
    """One turn of one conversation; times in seconds. ``cached_tokens`` None: the server
    did not say (counted as 0)."""

    conversation: int
    turn: int  # 1-based
    ok: bool
    ttft: float | None = None
    latency: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    reply: str = ""

    @classmethod
    def of(
        cls, conversation: int, turn: int, result: RequestResult, usage: Any, reply: str
    ) -> TurnResult:
        return cls(
            conversation=conversation,
            turn=turn,
            ok=result.ok,
            ttft=result.ttft,
            latency=result.latency,
            prompt_tokens=result.prompt_tokens,
            cached_tokens=cached_tokens_of(usage) if result.ok else None,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            error=result.error,
            reply=reply,
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ttft_ms"] = None if self.ttft is None else self.ttft * 1000.0
        out["latency_ms"] = self.latency * 1000.0
        del out["ttft"], out["latency"]
        return out


def cached_tokens_of(usage: Any) -> int | None:
    """Prompt tokens served from cache, as a usage object says; None if it does not.

    Read defensively, either shape on either API: ``prompt_tokens_details.cached_tokens``
    (OpenAI's) or ``cached_tokens`` (chatserver's native APIs). Anything but a
    non-negative integer is "not said".
    """
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    for value in (
        details.get("cached_tokens") if isinstance(details, dict) else None,
        usage.get("cached_tokens"),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def cached_share(results: Iterable[TurnResult]) -> float | None:
    """Cached prompt tokens over all prompt tokens of the completed turns (unsaid = 0);
    None when they had no prompt tokens."""
    done = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in done)
    if not prompt:
        return None
    return sum(r.cached_tokens or 0 for r in done) / prompt


def history_share(results: Sequence[TurnResult]) -> float | None:
    """The share of prompt tokens that repeat the conversation's previous turn (its prompt
    and reply), over the completed turns after a completed one; None if there are none.

    That is about the most a prefix cache can serve (a reply re-tokenized may differ a
    little from the tokens generated; a system prompt shared across conversations
    comes on top): a 190-token user message in a 435-token prompt leaves ~55%.
    """
    by_key = {(r.conversation, r.turn): r for r in results if r.ok}
    repeated = total = 0
    for (conversation, turn), r in by_key.items():
        prev = by_key.get((conversation, turn - 1))
        if prev is None:
            continue
        repeated += min(prev.prompt_tokens + prev.completion_tokens, r.prompt_tokens)
        total += r.prompt_tokens
    return repeated / total if total else None


def turn_rows(results: Sequence[TurnResult], turns: int) -> list[dict[str, Any]]:
    """One row per turn index 1..turns over all conversations: completed and failed
    turns, TTFT p50 and max (ms), mean prompt and cached tokens, the cached share and
    the history share (``history_share``: what a prefix cache could serve)."""
    rows = []
    for t in range(1, turns + 1):
        at = [r for r in results if r.turn == t]
        done = [r for r in at if r.ok]
        ttfts = [r.ttft * 1000.0 for r in done if r.ttft is not None]
        rows.append(
            {
                "turn": t,
                "completed": len(done),
                "failed": len(at) - len(done),
                "ttft_ms": {
                    "p50": percentile(ttfts, 50) if ttfts else None,
                    "max": max(ttfts) if ttfts else None,
                },
                "prompt_tokens": _mean([r.prompt_tokens for r in done]),
                "cached_tokens": _mean([r.cached_tokens or 0 for r in done]),
                "cached_share": cached_share(done),
                "history_share": history_share([r for r in results if r.turn in (t - 1, t)]),
            }
        )
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ttft_growth(rows: Sequence[dict[str, Any]]) -> float | None:
    """The last turn's TTFT p50 over the first's; None if either is missing."""
    if not rows:
        return None
    first, last = rows[0]["ttft_ms"]["p50"], rows[-1]["ttft_ms"]["p50"]
    if first is None or last is None or first <= 0:
        return None
    return last / first


def summarize_run(
    results: Sequence[TurnResult],
    *,
    api: str,
    conversations: int,
    turns: int,
    duration: float,
) -> dict[str, Any]:
    """The report of one run (one API, one conversation count). Stable JSON keys."""
    rows = turn_rows(results, turns)
    failed = [r for r in results if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    return {
        "api": api,
        "conversations": conversations,
        "turns": turns,
        "planned": conversations * turns,
        "completed": len(results) - len(failed),
        "failed": len(failed),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration,
        "cached_reported": any(r.cached_tokens is not None for r in results),
        "ttft_growth": ttft_growth(rows),
        "cached_share_after_first": cached_share(r for r in results if r.turn > 1),
        "history_share_after_first": history_share(results),
        "per_turn": rows,
        "samples": [r.as_dict() for r in sorted(results, key=lambda r: (r.conversation, r.turn))],
    }


def _share_cell(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def _tokens_cell(tokens: float | None) -> str:
    return "n/a" if tokens is None else f"{tokens:.0f}"


def _ratio_cell(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


TABLE_HEADERS = (
    "turn",
    "ok",
    "prompt tokens",
    "cached tokens",
    "from cache",
    "history",
    "TTFT p50 ms",
    "TTFT max ms",
    "vs turn 1",
)


def report_table(run: dict[str, Any]) -> str:
    """The run's per-turn table (token counts are means over its conversations)."""
    rows = run["per_turn"]
    base = rows[0]["ttft_ms"]["p50"] if rows else None
    cells = []
    for row in rows:
        p50 = row["ttft_ms"]["p50"]
        cells.append(
            (
                row["turn"],
                f"{row['completed']}/{run['conversations']}",
                _tokens_cell(row["prompt_tokens"]),
                _tokens_cell(row["cached_tokens"]),
                _share_cell(row["cached_share"]),
                _share_cell(row["history_share"]),
                fmt(p50, 0),
                fmt(row["ttft_ms"]["max"], 0),
                _ratio_cell(p50 / base if p50 is not None and base else None),
            )
        )
    return markdown_table(TABLE_HEADERS, cells)


def headline(run: dict[str, Any]) -> str:
    """One line: growth of TTFT over the run and the cached share after turn 1, against
    issue 11's targets."""
    turns = run["turns"]
    share = run["cached_share_after_first"]
    line = (
        f"turn {turns} TTFT p50 is {_ratio_cell(run['ttft_growth'])} turn 1's "
        f"(target <= {TARGET_GROWTH:g}x)"
    )
    if turns > 1:
        line += (
            f"; from turn 2 on {_share_cell(share)} of prompt tokens came from the cache "
            f"(target >= {TARGET_CACHED_SHARE:.0%}; the history is "
            f"{_share_cell(run['history_share_after_first'])} of them)"
        )
    if not run["cached_reported"]:
        line += "; the server reported no cached_tokens (counted as 0)"
    if run["failed"]:
        line += f"; failed turns: {errors_cell(run['errors'])} (their conversations stopped)"
    return line


SUMMARY_HEADERS = (
    "API",
    "conversations",
    "turns ok",
    "TTFT p50 turn 1 ms",
    "TTFT p50 last turn ms",
    "growth",
    "from cache, turns 2+",
    "history, turns 2+",
    "errors",
)


def summary_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run: the headline figures side by side."""
    cells = []
    for run in runs:
        rows = run["per_turn"]
        cells.append(
            (
                run["api"],
                run["conversations"],
                f"{run['completed']}/{run['planned']}",
                fmt(rows[0]["ttft_ms"]["p50"], 0) if rows else "n/a",
                fmt(rows[-1]["ttft_ms"]["p50"], 0) if rows else "n/a",
                _ratio_cell(run["ttft_growth"]),
                _share_cell(run["cached_share_after_first"])
                if run["cached_reported"]
                else "not reported",
                _share_cell(run["history_share_after_first"]),
                errors_cell(run["errors"]),
            )
        )
    return markdown_table(SUMMARY_HEADERS, cells)


def same_replies(run: dict[str, Any], baseline: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """Per turn: (replies equal to the baseline's, replies both completed), matched by
    conversation and turn. Greedy replies to the same prompts should be equal."""
    theirs = {(s["conversation"], s["turn"]): s["reply"] for s in baseline["samples"] if s["ok"]}
    out: dict[int, tuple[int, int]] = {}
    for s in run["samples"]:
        other = theirs.get((s["conversation"], s["turn"]))
        if not s["ok"] or other is None:
            continue
        same, both = out.get(s["turn"], (0, 0))
        out[s["turn"]] = (same + (s["reply"] == other), both + 1)
    return out


COMPARISON_HEADERS = (
    "turn",
    "prompt tokens",
    "TTFT p50 ms",
    "baseline TTFT p50 ms",
    "ratio",
    "from cache",
    "baseline from cache",
    "same reply",
)


def comparison_table(run: dict[str, Any], baseline: dict[str, Any]) -> str:
    """One run against the baseline server's run of the same API and conversation count."""
    same = same_replies(run, baseline)
    cells = []
    for ours, theirs in zip(run["per_turn"], baseline["per_turn"], strict=True):
        a, b = ours["ttft_ms"]["p50"], theirs["ttft_ms"]["p50"]
        equal, both = same.get(ours["turn"], (0, 0))
        cells.append(
            (
                ours["turn"],
                _tokens_cell(ours["prompt_tokens"]),
                fmt(a, 0),
                fmt(b, 0),
                _ratio_cell(a / b if a is not None and b else None),
                _share_cell(ours["cached_share"]),
                _share_cell(theirs["cached_share"]),
                f"{equal}/{both}",
            )
        )
    return markdown_table(COMPARISON_HEADERS, cells)


def run_label(run: dict[str, Any]) -> str:
    n = run["conversations"]
    return f"{run['api']}, {n} conversation{'' if n == 1 else 's'}"


# --- conversations over each API ---------------------------------------------------------


class Conversation(Protocol):
    """One conversation: ``turn`` sends the next user message and waits for the reply."""

    async def turn(
        self, conversation: int, index: int, content: str, max_tokens: int
    ) -> TurnResult: ...


def _chat_params(max_tokens: int) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": 0}


class WsConversation:
    """One socket for the whole conversation; the server keeps the history (its session)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout

    async def turn(
        self, conversation: int, index: int, content: str, max_tokens: int
    ) -> TurnResult:
        message_id = f"mt-{conversation}-{index}"
        frame = {
            "type": "chat",
            "content": content,
            "id": message_id,
            "params": _chat_params(max_tokens),
        }
        timer = StreamTimer()
        reply: list[str] = []
        try:
            async with asyncio.timeout(self.timeout):
                await self.ws.send_str(json.dumps(frame))
                async for msg in self.ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    data = json.loads(msg.data)
                    if data.get("id") not in (None, message_id):
                        continue
                    kind = data.get("type")
                    if kind == "token":
                        timer.content(data.get("content"))
                        reply.append(data.get("content") or "")
                    elif kind == "done":
                        usage = data.get("usage")
                        result = timer.done(usage, data.get("finish_reason"))
                        return TurnResult.of(conversation, index, result, usage, "".join(reply))
                    elif kind == "error":
                        result = timer.failed(str(data.get("code") or "ws_error"))
                        return TurnResult.of(conversation, index, result, None, "")
                code = self.ws.close_code
                result = timer.failed(f"ws_closed_{code}" if code else "disconnected")
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            result = timer.failed(error_kind(e))
        return TurnResult.of(conversation, index, result, None, "".join(reply))


class OpenAIConversation:
    """The client keeps the history and re-sends all of it, its replies included, each turn."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        timeout: float,
        model: str,
        system_prompt: str,
    ) -> None:
        self.session = session
        self.url = base_url + "/v1/chat/completions"
        self.timeout = timeout
        self.model = model
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": system_prompt}] if system_prompt else []
        )

    async def turn(
        self, conversation: int, index: int, content: str, max_tokens: int
    ) -> TurnResult:
        user = {"role": "user", "content": content}
        body = {
            "model": self.model,
            "messages": [*self.messages, user],
            **_chat_params(max_tokens),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        timer = StreamTimer()
        reply: list[str] = []
        usage: dict | None = None
        finish_reason: str | None = None
        try:
            async with asyncio.timeout(self.timeout), self.session.post(self.url, json=body) as r:
                if r.status != 200:
                    result = timer.failed(http_error_kind(r.status, await r.read()))
                    return TurnResult.of(conversation, index, result, None, "")
                async for chunk in sse_chunks(r):
                    if "error" in chunk:
                        err = chunk["error"]
                        code = err.get("code") if isinstance(err, dict) else None
                        result = timer.failed(str(code or "stream_error"))
                        return TurnResult.of(conversation, index, result, None, "")
                    for choice in chunk.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content")
                        timer.content(delta)
                        reply.append(delta or "")
                        finish_reason = choice.get("finish_reason") or finish_reason
                    usage = chunk.get("usage") or usage
                result = timer.done(usage, finish_reason)
            text = "".join(reply)
            self.messages += [user, {"role": "assistant", "content": text}]
            return TurnResult.of(conversation, index, result, usage, text)
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            result = timer.failed(error_kind(e))
        return TurnResult.of(conversation, index, result, None, "")


class QueryConversation:
    """``/v1/query`` with a session: the server keeps the history; not streamed."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self.session = session
        self.url = base_url + "/v1/query"
        self.timeout = timeout
        self.session_id: str | None = None

    async def turn(
        self, conversation: int, index: int, content: str, max_tokens: int
    ) -> TurnResult:
        body: dict[str, Any] = {"message": content, **_chat_params(max_tokens)}
        if self.session_id is not None:
            body["session_id"] = self.session_id
        timer = StreamTimer(streamed=False)
        try:
            async with asyncio.timeout(self.timeout), self.session.post(self.url, json=body) as r:
                raw = await r.read()
                if r.status != 200:
                    result = timer.failed(http_error_kind(r.status, raw))
                    return TurnResult.of(conversation, index, result, None, "")
                data = json.loads(raw)
                self.session_id = data["session_id"]
                usage = data.get("usage")
                result = timer.done(usage, data.get("finish_reason"), ttft_is_latency=True)
                return TurnResult.of(conversation, index, result, usage, str(data.get("reply")))
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            result = timer.failed(error_kind(e))
        return TurnResult.of(conversation, index, result, None, "")


@dataclass(frozen=True)
class RunSpec:
    """One run: ``conversations`` at once over ``api``, ``turns`` each."""

    api: str
    conversations: int
    turns: int = 10
    user_tokens: int = 190
    max_tokens: int = 32
    timeout: float = 180.0
    duration: float = 600.0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


@asynccontextmanager
async def open_conversation(
    session: aiohttp.ClientSession, base_url: str, spec: RunSpec, model: str | None
) -> AsyncIterator[Conversation]:
    """A fresh conversation over ``spec.api`` (for ``ws``, its socket, open until the end)."""
    if spec.api == "ws":
        async with asyncio.timeout(spec.timeout):
            ws = await session.ws_connect(base_url + "/ws", autoping=True)
        try:
            yield WsConversation(ws, spec.timeout)
        finally:
            await ws.close()
    elif spec.api == "openai":
        assert model is not None, "the OpenAI API needs a model name"
        yield OpenAIConversation(session, base_url, spec.timeout, model, spec.system_prompt)
    else:
        yield QueryConversation(session, base_url, spec.timeout)


async def run_conversations(
    base_url: str, spec: RunSpec, *, model: str | None = None, progress: bool = False
) -> dict[str, Any]:
    """Run ``spec`` and return its summary (``summarize_run``). Conversations start
    together; each sends its next turn when the last one is answered, and stops at its
    first failed turn or once ``spec.duration`` has passed."""

    results: list[TurnResult] = []
    tag = run_tag(spec.api, spec.conversations)
    bar = tqdm(
        total=spec.conversations * spec.turns,
        desc=f"{spec.api} x{spec.conversations}",
        unit="turn",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout()) as s:
        if spec.api == "openai" and model is None:
            model = await served_model(s, base_url)
        start = time.perf_counter()
        deadline = start + spec.duration

        async def converse(c: int) -> None:
            opened = False
            try:
                async with open_conversation(s, base_url, spec, model) as conv:
                    opened = True
                    for t in range(1, spec.turns + 1):
                        if time.perf_counter() >= deadline:
                            return
                        content = user_turn(tag, c, t, spec.user_tokens)
                        result = await conv.turn(c, t, content, spec.max_tokens)
                        results.append(result)
                        bar.update(1)
                        if not result.ok:
                            return
            except Exception as e:
                if opened:  # turns report their own failures: this is a bug, not a result
                    raise
                results.append(TurnResult(c, 1, ok=False, error=error_kind(e)))
                bar.update(1)

        try:
            await asyncio.gather(*(converse(c) for c in range(spec.conversations)))
        finally:
            bar.close()
        duration = time.perf_counter() - start
    return summarize_run(
        results,
        api=spec.api,
        conversations=spec.conversations,
        turns=spec.turns,
        duration=duration,
    )


# --- the command ---------------------------------------------------------------------------


def api_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in APIS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown APIs {unknown}; choose from {', '.join(APIS)}")
    return names


def build_parser(prog: str = "python -m load_tests.multiturn") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
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
        help="also start a server with these flags (e.g. '--no-prefix-cache') and compare",
    )
    p.add_argument(
        "--apis", type=api_list, default=list(DEFAULT_APIS), help=f"any of {', '.join(APIS)}"
    )
    p.add_argument(
        "--conversations", type=int_list, default=[1, 4], help="one run per count, e.g. 1,4"
    )
    p.add_argument("--turns", type=positive_int, default=10, help="turns per conversation")
    p.add_argument(
        "--user-tokens", type=positive_int, default=190, help="about this many tokens a user turn"
    )
    p.add_argument("--max-tokens", type=positive_int, default=32, help="tokens per reply")
    p.add_argument(
        "--system-prompt",
        default=DEFAULT_SYSTEM_PROMPT,
        help="first message of the OpenAI conversations (match the server's --system-prompt)",
    )
    p.add_argument("--run-duration", type=positive_float, default=600.0, help="cap, s a run")
    p.add_argument("--timeout", type=positive_float, default=180.0, help="per-turn seconds")
    p.add_argument("--ready-timeout", type=positive_float, default=300.0, help="server start")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests per API first")
    p.add_argument("--json", type=Path, default=RESULTS / "multiturn.json", help="results")
    p.add_argument(
        "--plot", type=Path, default=RESULTS / "multiturn.png", help="PNG of TTFT against turn"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    return [
        RunSpec(
            api=api,
            conversations=n,
            turns=args.turns,
            user_tokens=args.user_tokens,
            max_tokens=args.max_tokens,
            timeout=args.timeout,
            duration=args.run_duration,
            system_prompt=args.system_prompt,
        )
        for n in args.conversations
        for api in args.apis
    ]


def bench_server(
    server_args: str, args: argparse.Namespace, url: str | None = None
) -> dict[str, Any] | None:
    """Start (unless `url`), warm up every API and run every spec; None if it failed."""
    flags = shlex.split(server_args)
    try:
        with target_server(url, flags, args.ready_timeout) as (url, _, server):
            return _bench(url, server_args if server else None, args)
    except ServerFailed as e:
        say(f"multiturn: {e}")
        return None


def _bench(url: str, server_args: str | None, args: argparse.Namespace) -> dict[str, Any] | None:
    """Every spec against a ready server; None if the warm-up failed."""
    info = server_info(url)
    precision = server_precision(url)
    say(f"server {url}: {json.dumps(info)}")
    try:  # first-use costs (model warm-up, thread pools) are not what we measure
        for api in args.apis:
            if args.warmup > 0:
                run_async(warm_server(url, api, args.warmup, request_timeout=args.timeout))
    except WarmupFailed as e:
        say(f"multiturn: {url}: {e}")
        return None
    runs = [
        run_async(run_conversations(url, spec, progress=not args.no_progress))
        for spec in run_specs(args)
    ]
    return {
        "url": url,
        "server": info,
        "server_args": server_args,
        "precision": precision,
        "runs": runs,
    }


def _flags(server_args: str | None) -> str:
    if server_args is None:
        return "(a running server, --url)"
    return f"`{server_args}`" if server_args.strip() else "(defaults)"


def print_report(bench: dict[str, Any], args: argparse.Namespace, label: str) -> None:
    print(
        f"## multiturn{label}: {args.turns} turns of ~{args.user_tokens}-token user messages, "
        f"{args.max_tokens}-token greedy replies\n"
    )
    if bench["server_args"] is not None:
        print(f"server flags: {_flags(bench['server_args'])}  ")
    print(describe_precision(bench["precision"]) + "\n")
    for run in bench["runs"]:
        print(f"### {run_label(run)}\n")
        print(report_table(run))
        print()
        print(headline(run) + "\n")
    print(summary_table(bench["runs"]))
    print()
    print(
        "TTFT: from sending the turn to its first token frame / content delta (the socket "
        "or connection already open); tokens are means over the conversations; from cache: "
        "the server's cached_tokens over prompt_tokens; history: the previous turn's prompt "
        "and reply over prompt_tokens, about the most a prefix cache can serve."
    )
    if "query" in args.apis:
        print("query does not stream: its TTFT is the whole reply's latency.")
    print()


def plot_turns(
    curves: Sequence[tuple[str, dict[str, Any]]], path: str | Path, title: str = ""
) -> Path:
    """TTFT p50 (left) and the cached share (right) against turn, one line per run."""
    from load_tests.plot import _pyplot, _save

    plt = _pyplot()
    fig, (lat, share) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, run in curves:
        rows = run["per_turn"]
        xs = [r["turn"] for r in rows]
        style = "--" if label.startswith("baseline") else "-"
        ttft = [float("nan") if (v := r["ttft_ms"]["p50"]) is None else v for r in rows]
        shares = [float("nan") if (v := r["cached_share"]) is None else 100.0 * v for r in rows]
        lat.plot(xs, ttft, marker="o", ls=style, label=label)
        share.plot(xs, shares, marker="o", ls=style, label=label)
    lat.set(xlabel="turn", ylabel="TTFT p50 (ms)", title="Time to first token")
    share.set(xlabel="turn", ylabel="% of prompt tokens", title="Served from the prefix cache")
    lat.set_ylim(bottom=0)
    share.set_ylim(-5, 105)
    for ax in (lat, share):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(plt, fig, path, title)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    try:
        url = check_url(args.url) if args.url else None
    except ValueError as e:
        parser.error(str(e))
    host = machine()
    say(describe_machine(host))
    bench = bench_server(args.server_args, args, url)
    if bench is None:
        return 1
    baseline = None
    if args.baseline_args is not None:
        baseline = bench_server(args.baseline_args, args)
        if baseline is None:
            return 1

    print(describe_machine(host) + "\n")
    print_report(bench, args, "")
    if baseline is not None:
        print_report(baseline, args, " (baseline)")
        print("## against the baseline, same run\n")
        print(
            f"server: {_flags(bench['server_args'])}, baseline: {_flags(baseline['server_args'])}\n"
        )
        for ours, theirs in zip(bench["runs"], baseline["runs"], strict=True):
            print(f"### {run_label(ours)}\n")
            print(comparison_table(ours, theirs))
            print()

    if args.json:
        config = {
            "apis": args.apis,
            "conversations": args.conversations,
            "turns": args.turns,
            "user_tokens": args.user_tokens,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "system_prompt": args.system_prompt,
            "run_duration": args.run_duration,
            "timeout": args.timeout,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            args.json, {"tool": "multiturn", "config": config, **bench, "baseline": baseline}
        )
    if args.plot:
        curves = [(run_label(r), r) for r in bench["runs"]]
        if baseline is not None:
            curves += [(f"baseline {run_label(r)}", r) for r in baseline["runs"]]
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_turns(curves, args.plot, title=f"multiturn: {args.turns} turns, TTFT against turn")
        say(f"wrote {args.plot}")
    runs = bench["runs"] + (baseline["runs"] if baseline else [])
    return 0 if all(r["failed"] == 0 and r["completed"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
