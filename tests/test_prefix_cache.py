"""Prefix reuse in a real worker on the real default model (workers/kv_cache.py wired in).

float32 is the reference: a conversation's greedy replies with reuse must be
the ones it gets when every turn is computed from scratch, alone or
interleaved with others, when its prefix was evicted, and under a memory
budget smaller than the load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from transformers import AutoTokenizer

from chatserver.models.prompt import render
from chatserver.protocol.worker import CancelRequest, GenerateRequest, SamplingParams, WorkerConfig
from chatserver.workers.core import build_core
from tests.serverproc import EXACT_FLAGS, ServerProcess

QUESTIONS = ["What is the capital of France?", "And what is it famous for?", "Name a museum."]
OTHER = ["Write a haiku about the sea.", "Now one about the mountains."]


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def config(model_dir: Path) -> WorkerConfig:
    return WorkerConfig(
        str(model_dir), "m", "cpu", "float32", 512, 8, 64, 2, skip_quality_gate=True
    )


@pytest.fixture(scope="module")
def cached_core(config):
    return build_core(0, config)[0]


@pytest.fixture(scope="module")
def uncached_core(config):
    return build_core(0, dataclasses.replace(config, prefix_cache=False))[0]


class Conversation:
    """A chat whose every turn re-sends the whole history, as the APIs build prompts."""

    def __init__(self, tokenizer, questions: list[str]) -> None:
        self.tokenizer = tokenizer
        self.questions = questions
        self.messages: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]
        self.replies: list[list[int]] = []

    def prompt(self, turn: int) -> list[int]:
        return render(
            self.tokenizer, self.messages + [{"role": "user", "content": self.questions[turn]}]
        )

    def answer(self, turn: int, reply_ids: list[int]) -> None:
        self.replies.append(reply_ids)
        text = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.messages += [
            {"role": "user", "content": self.questions[turn]},
            {"role": "assistant", "content": text},
        ]


def generate(core, requests: list[tuple[int, list[int]]], max_tokens: int = 12):
    """Run requests (seq_id, prompt) together; their tokens and cached prompt tokens."""
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=(2,))
    for seq_id, ids in requests:
        core.submit(GenerateRequest(seq_id, ids, params))
    tokens: dict[int, list[int]] = {seq_id: [] for seq_id, _ in requests}
    cached: dict[int, int] = {}
    while core.has_work:
        out = core.step()
        cached.update(out.started)
        for seq_id, token in out.tokens:
            tokens[seq_id].append(token)
    return tokens, cached


def converse(core, tokenizer, chats: list[list[str]], first_id: int):
    """Every chat's turns, the chats' turns interleaved in one batch per turn index."""
    conversations = [Conversation(tokenizer, q) for q in chats]
    cached_per_turn = []
    for turn in range(max(len(q) for q in chats)):
        requests = [
            (first_id + 100 * c + turn, conv.prompt(turn))
            for c, conv in enumerate(conversations)
            if turn < len(conv.questions)
        ]
        tokens, cached = generate(core, requests)
        cached_per_turn.append([cached[seq_id] for seq_id, _ in requests])
        for c, conv in enumerate(conversations):
            if turn < len(conv.questions):
                conv.answer(turn, tokens[first_id + 100 * c + turn])
    return [conv.replies for conv in conversations], cached_per_turn


def test_reuse_gives_the_replies_computing_everything_gives(cached_core, uncached_core, tokenizer):
    reused, cached = converse(cached_core, tokenizer, [QUESTIONS, OTHER], first_id=1000)
    fresh, nothing = converse(uncached_core, tokenizer, [QUESTIONS, OTHER], first_id=1000)
    assert reused == fresh
    assert all(n == 0 for turn in nothing for n in turn)
    # From turn 2 on, each conversation finds its history cached, more each turn.
    assert cached[0] == [0, 0]
    assert all(n > 0 for n in cached[1]), cached
    assert cached[2][0] > cached[1][0], cached
    stats = cached_core.kv.snapshot()
    assert stats.hits > 0 and stats.slots_running == 0 and stats.slots_retained >= 2


def test_an_evicted_conversation_is_recomputed_correctly(
    config, cached_core, uncached_core, tokenizer
):
    # Room for two slots: three interleaved conversations evict each other's prefixes.
    slot_bytes = cached_core.runner.slot_bytes()
    small = build_core(0, dataclasses.replace(config, kv_cache_bytes=2 * slot_bytes))[0]
    assert small.kv.num_slots == 2
    chats = [QUESTIONS, OTHER, ["Say hello.", "Say goodbye."]]
    tight, _ = converse(small, tokenizer, chats, first_id=2000)
    fresh, _ = converse(uncached_core, tokenizer, chats, first_id=2000)
    assert tight == fresh
    assert small.runner.slots <= 2  # never more memory than the budget


def test_more_sequences_than_the_budget_holds_queue_and_all_finish(config, cached_core, tokenizer):
    slot_bytes = cached_core.runner.slot_bytes()
    core = build_core(0, dataclasses.replace(config, kv_cache_bytes=3 * slot_bytes))[0]
    questions = QUESTIONS + OTHER
    prompts = [
        (3000 + i, render(tokenizer, [{"role": "user", "content": q}]))
        for i, q in enumerate(questions)
    ]
    params = SamplingParams(max_tokens=8)
    for seq_id, ids in prompts:
        core.submit(GenerateRequest(seq_id, ids, params))
    finished = {}
    most_running = 0
    while core.has_work:
        out = core.step()
        most_running = max(most_running, len(core.scheduler.running))
        finished.update(out.finished)
    assert most_running == 3 and len(finished) == len(prompts)
    assert set(finished.values()) <= {"stop", "length"}
    assert core.runner.slots <= 3


def test_cancel_releases_its_slot_and_keeps_what_it_computed(cached_core, tokenizer):
    ids = render(tokenizer, [{"role": "user", "content": "Count to fifty."}])
    cached_core.submit(GenerateRequest(4000, ids, SamplingParams(max_tokens=100)))
    for _ in range(4):
        cached_core.step()
    assert cached_core.kv.running == 1
    cached_core.cancel(CancelRequest(4000))
    cached_core.step()
    assert cached_core.kv.running == 0
    _, cached = generate(cached_core, [(4001, ids)], max_tokens=2)
    assert cached[4001] == (len(ids) - 1) // 16 * 16


# --- over real sockets: the engine, the APIs, metrics and worker affinity ---------


async def ws_turn(ws, content: str, message_id: str, max_tokens: int = 8) -> dict:
    """Send one chat message; its done frame."""
    params = {"max_tokens": max_tokens, "ignore_eos": True}
    await ws.send_json({"type": "chat", "content": content, "id": message_id, "params": params})
    while True:
        frame = await ws.receive_json(timeout=120)
        if frame.get("id") == message_id and frame["type"] in ("done", "error"):
            assert frame["type"] == "done", frame
            return frame


async def metric(http, server, name: str) -> float:
    async with http.get(server.url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_sessions_next_turn_is_served_from_the_cache(server):
    async with aiohttp.ClientSession() as http:
        hits_before = await metric(http, server, "chatserver:prefix_cache_hits_total")
        async with http.ws_connect(server.url + "/ws") as ws:
            first = await ws_turn(ws, "What is the capital of France?", "t1")
            second = await ws_turn(ws, "And of Italy?", "t2")
        assert first["usage"]["cached_tokens"] < first["usage"]["prompt_tokens"]
        # Turn 2's prompt is turn 1's prompt and reply, then the new message.
        assert second["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 16
        hits = await metric(http, server, "chatserver:prefix_cache_hits_total")
        assert hits - hits_before >= second["usage"]["cached_tokens"]
        async with http.get(server.url + "/readyz") as r:
            kv = (await r.json())["workers"][0]["kv_cache"]
        assert kv["prefix_hits"] > 0 and kv["kv_retained"] > 0 and kv["kv_budget"] > 0


@pytest.fixture(scope="module")
def two_workers():
    proc = ServerProcess(
        "--engine", "pool", "--workers", "2", *EXACT_FLAGS, "--log-level", "warning"
    ).wait_ready()
    # /readyz is 200 once one worker serves; this test needs both.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with urllib.request.urlopen(proc.url + "/readyz", timeout=5) as r:
            if all(w["state"] == "ready" for w in json.loads(r.read())["workers"]):
                break
        time.sleep(0.2)
    yield proc
    proc.stop()


async def test_a_conversation_goes_back_to_the_worker_holding_its_prefix(two_workers):
    """Two conversations start together (one per worker, by load); each next turn, sent
    alone, finds its history cached: the engine routed it to the worker holding it,
    where least-loaded placement would send both to the same worker."""
    async with aiohttp.ClientSession() as http:
        url = two_workers.url + "/ws"

        async def busy_workers() -> list[int]:
            async with http.get(two_workers.url + "/readyz") as r:
                return [w["generations"] for w in (await r.json())["workers"]]

        async with http.ws_connect(url) as a, http.ws_connect(url) as b:
            first = asyncio.create_task(ws_turn(a, "Write a haiku about the sea.", "a1", 48))
            async with asyncio.timeout(60):
                while sum(await busy_workers()) == 0:  # noqa: ASYNC110 (a1 runs: b1 goes elsewhere)
                    await asyncio.sleep(0.02)
            await ws_turn(b, "List three primary colors.", "b1")
            await first
            async with http.get(two_workers.url + "/readyz") as r:
                workers = (await r.json())["workers"]
            assert all(w.get("kv_cache", {}).get("kv_retained") for w in workers), workers
            for ws, key in ((a, "a2"), (b, "b2"), (a, "a3"), (b, "b3")):
                done = await ws_turn(ws, "Tell me more.", key)
                assert done["usage"]["cached_tokens"] > 16, (key, done)
