"""The engine end to end: a real fp32 server, compared with transformers itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serverproc import ServerProcess

PROMPT = "Write a haiku about the sea."


async def complete(http: aiohttp.ClientSession, url: str, content: str, max_tokens: int) -> dict:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_greedy_is_deterministic_and_equals_transformers_generate(
    two_workers, model_dir: Path
):
    """float32 (two_workers, below), whichever worker answers: transformers' own text."""
    async with aiohttp.ClientSession() as http:
        first = await complete(http, two_workers.url, PROMPT, 24)
        second = await complete(http, two_workers.url, PROMPT, 24)
    text = first["choices"][0]["message"]["content"]
    assert text == second["choices"][0]["message"]["content"]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert first["usage"]["prompt_tokens"] == ids.shape[1]


async def test_healthz_answers_quickly_while_workers_are_busy(exact_server):
    async with aiohttp.ClientSession() as http:
        load = [
            asyncio.create_task(
                complete(http, exact_server.url, f"Count from {i} to 100 in words.", 160)
            )
            for i in range(8)
        ]
        # Let the batch fill. With 8 x 48 tokens and a 1 s wait, the load once ended
        # after 3 probes (float32 on the Intel(R) Xeon(R) Processor, torch CPU
        # capability AVX512, VNNI avx_vnni).
        await asyncio.sleep(0.5)
        latencies = []
        while not all(t.done() for t in load) and len(latencies) < 40:
            started = time.perf_counter()
            async with http.get(exact_server.url + "/healthz") as resp:
                assert resp.status == 200
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*load)
    assert all(r["usage"]["completion_tokens"] > 0 for r in results)
    assert len(latencies) >= 5
    # Behaviour, not a benchmark: an inline engine takes a whole decoding step
    # (~100 ms at this load) to answer; the process engine answers at once.
    assert sorted(latencies)[len(latencies) // 2] < 0.05, latencies


def worker_pids(server_pid: int) -> list[int]:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


async def test_killed_worker_fails_its_streams_and_is_restarted(model_dir):
    proc = ServerProcess("--skip-quality-gate", "--log-level", "warning").wait_ready()
    try:
        async with aiohttp.ClientSession() as http:
            body = {
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 400,
                "stream": True,
            }
            # Streamed, so the worker is killed while the reply is surely still being
            # generated (a fast CPU finishes a short story before a fixed sleep ends).
            async with http.post(proc.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                events = []
                killed = None
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    events.append(line[6:].strip())
                    if killed is None and b'"content": "' in line and b'"content": ""' not in line:
                        (killed,) = worker_pids(proc.proc.pid)
                        os.kill(killed, signal.SIGKILL)
                        # Sent before or after the engine notices: a 503 to retry, never a 500.
                        query = {"message": "Hi", "max_tokens": 4}
                        async with http.post(proc.url + "/v1/query", json=query) as right_after:
                            error = (await right_after.json())["error"]
                            assert right_after.status == 503, error
                            assert error["code"] in ("worker_unavailable", "worker_failed")
                            assert int(right_after.headers["Retry-After"]) >= 1
            assert killed is not None, events
            assert events[-1] == b"[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "worker_failed", events[-3:]
            await wait_ready(http, proc.url)
            again = await complete(http, proc.url, "Say hello.", 8)
            assert again["usage"]["completion_tokens"] > 0
            async with http.get(proc.url + "/metrics") as resp:
                scrape = await resp.text()
            assert "chatserver:worker_restarts_total 1.0" in scrape.splitlines()
            # The stream, and the query if it reached the dying worker.
            failed = 'chatserver:request_success_total{finished_reason="worker_failed"}'
            assert any(line in (f"{failed} 1.0", f"{failed} 2.0") for line in scrape.splitlines())
            assert worker_pids(proc.proc.pid) != [killed]
    finally:
        proc.stop()


async def wait_ready(http: aiohttp.ClientSession, url: str, workers: int = 1) -> dict:
    """/readyz once ``workers`` workers serve."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        async with http.get(url + "/readyz") as resp:
            body = await resp.json()
        if sum(w["state"] == "ready" for w in body.get("workers", [])) >= workers:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {workers} workers ready: {body}")


@pytest.fixture(scope="module")
def two_workers():
    """Two fast-loading CPU workers, quick restarts and a short stall timeout."""
    proc = ServerProcess(
        "--engine",
        "pool",
        "--workers",
        "2",
        "--threads-per-worker",
        "1",
        "--dtype",
        "float32",
        "--skip-quality-gate",
        "--worker-stall-timeout",
        "2",
        "--worker-restart-delay",
        "0.05",
        "--log-level",
        "warning",
    ).wait_ready()
    yield proc
    proc.stop()


async def test_one_dead_worker_leaves_the_other_serving(two_workers):
    url = two_workers.url
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, url, 2)
        victim = worker_pids(two_workers.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        for _ in range(3):  # while it reloads, the other worker answers everyone
            assert (await complete(http, url, "Say hi.", 4))["usage"]["completion_tokens"] > 0
        async with http.get(url + "/readyz") as resp:
            assert resp.status == 200
        body = await wait_ready(http, url, 2)
        assert [w["state"] for w in body["workers"]] == ["ready", "ready"]


async def test_a_stuck_worker_is_killed_and_its_clients_told(two_workers):
    url = two_workers.url
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, url, 2)
        before = set(worker_pids(two_workers.proc.pid))
        body = {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400,
            "stream": True,
        }
        stopped: list[int] = []
        started = time.monotonic()
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            events = []
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                events.append(line[6:].strip())
                if not stopped and b'"content": "' in line and b'"content": ""' not in line:
                    # Stop every worker: the one decoding this reply is among them.
                    for pid in before:
                        os.kill(pid, signal.SIGSTOP)
                    stopped.extend(before)
                    started = time.monotonic()
        elapsed = time.monotonic() - started
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the watchdog killed it
        assert json.loads(events[-2])["error"]["code"] == "worker_failed", events[-3:]
        assert 2 <= elapsed < 10, elapsed  # --worker-stall-timeout 2, checked every 0.5 s
        await wait_ready(http, url, 2)
        assert len(set(worker_pids(two_workers.proc.pid)) & before) == 1  # only it was killed


async def test_restarts_leave_no_threads_or_descriptors_behind(two_workers):
    url = two_workers.url
    server = Path(f"/proc/{two_workers.proc.pid}")

    def counts() -> tuple[int, int]:
        return len(list((server / "task").iterdir())), len(list((server / "fd").iterdir()))

    async with aiohttp.ClientSession() as http:
        await wait_ready(http, url, 2)
        await complete(http, url, "Say hi.", 4)
        baseline = counts()
        for _ in range(3):
            os.kill(worker_pids(two_workers.proc.pid)[0], signal.SIGKILL)
            await asyncio.sleep(0.2)
            await wait_ready(http, url, 2)
        await complete(http, url, "Say hi.", 4)
        threads, fds = counts()
    # Before the fix each restart left a writer thread and a pipe: +3 of each here.
    assert threads <= baseline[0] + 2 and fds <= baseline[1] + 2, (baseline, (threads, fds))


@pytest.mark.parametrize(
    ("engine", "device", "gpus", "expected"),
    [
        ("auto", "auto", 0, ["cpu", "cpu"]),  # no CUDA: the CPU pool (--workers 2)
        ("gpu", "cpu", 0, ["cpu"]),
        ("pool", "cpu", 0, ["cpu", "cpu"]),
        ("auto", "auto", 2, ["cuda:0", "cuda:1"]),  # one worker owns each GPU
        ("gpu", "cuda:1", 2, ["cuda:1"]),
    ],
)
def test_worker_placement(monkeypatch, model_dir: Path, engine, device, gpus, expected) -> None:
    """Where workers go, per engine and device; the GPU count is the only thing faked."""
    from chatserver.config import Settings
    from chatserver.engine.engine import InferenceEngine
    from chatserver.models.loading import resolve_model
    from chatserver.workers import devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    real_resolve = devices.resolve_device
    monkeypatch.setattr(
        devices,
        "resolve_device",
        lambda d: ("cuda" if gpus else "cpu") if d == "auto" else real_resolve(d),
    )
    settings = Settings.from_env(engine=engine, device=device, workers=2)
    eng = InferenceEngine(settings)
    eng._source = resolve_model("default", model_dir.parent, model_dir.name)
    # Before the server's tokenizer loads: workers spawn first (engine.start).
    assert eng.tokenizer is None
    configs = eng._worker_configs()
    assert [c.device for c in configs] == expected
    # Each worker picks its precision on its device (test_precision.py has the chains).
    assert {c.dtype for c in configs} == {"auto"}
    # The model's context (8192 for the default model) caps --max-context, read from
    # config.json without the tokenizer.
    assert {c.max_context for c in configs} == {min(settings.max_context, 8192)}


async def test_stream_hands_a_lagging_reader_all_queued_text_at_once(model_dir: Path) -> None:
    """A reader that fell behind gets one delta for everything queued (fewer frames under
    load); one that keeps up gets each delta as it comes; the end is never swallowed."""
    from types import SimpleNamespace

    from chatserver.engine.engine import GenerationStream
    from chatserver.limits.admission import AdmissionQueue

    ticket = AdmissionQueue(max_queue=0).admit(running_slots=1)
    cancelled = []
    stream = GenerationStream(
        1,
        SimpleNamespace(ids=[1, 2, 3]),
        (),
        ticket,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        cancel=lambda s, gone, reason: cancelled.append(reason),
    )
    for piece in ("The", " capital", " is"):
        stream._push(piece)
    assert await anext(stream) == "The capital is"
    stream._push(" Paris")
    assert await anext(stream) == " Paris"
    stream._push(".")
    stream._finish("stop")
    assert [delta async for delta in stream] == ["."]
    assert stream.text == "The capital is Paris." and stream.finish_reason == "stop"
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    stream.interrupt()  # the stream asks its owner to stop the sequence: no engine needed
    assert cancelled == ["interrupted"]
