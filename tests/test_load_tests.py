"""The load tester itself: its arithmetic on known numbers, its guards, and short real runs
of each tool against the shared ``server`` fixture (a few requests of a few tokens each)."""

from __future__ import annotations

import ast
import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from load_tests import bench_batching, overload
from load_tests.__main__ import main as load_main
from load_tests.clients import open_client
from load_tests.guard import RemoteURLRefused, check_url, is_loopback_host
from load_tests.machine import describe_precision
from load_tests.prompts import BUILTIN_PROMPTS, load_prompts, prompt_for
from load_tests.runner import LoadSpec, arrival_schedule
from load_tests.server import (
    CLOCK_TICKS,
    free_port,
    measure_idle_cpu,
    parse_stat,
    tree_cpu_seconds,
)
from load_tests.stats import (
    RequestResult,
    distribution,
    format_summary,
    markdown_table,
    percentile,
    summarize,
)

LOCUSTFILE = Path(__file__).resolve().parent.parent / "load_tests" / "locustfile.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- stats on known numbers -------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile(values, 100) == 5.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_distribution_scales_and_handles_empty() -> None:
    d = distribution([0.001, 0.002, 0.003, 0.004], scale=1000.0)
    assert d["count"] == 4
    assert d["mean"] == pytest.approx(2.5)
    assert d["p50"] == pytest.approx(2.5)
    assert d["max"] == pytest.approx(4.0)
    assert distribution([]) == {
        "count": 0,
        "mean": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
    }


def _streamed(start: float, ttft: float, gaps: list[float], tokens: int) -> RequestResult:
    return RequestResult(
        ok=True,
        start=start,
        latency=ttft + sum(gaps),
        ttft=ttft,
        itl=gaps,
        prompt_tokens=10,
        completion_tokens=tokens,
        finish_reason="length",
    )


def test_summarize_known_results() -> None:
    results = [
        _streamed(0.0, 0.1, [0.05, 0.05, 0.05], 4),  # latency 0.25, TPOT 0.05
        _streamed(0.0, 0.3, [0.1, 0.1, 0.1], 4),  # latency 0.6, TPOT 0.1
        RequestResult(ok=False, start=0.0, latency=0.01, error="overloaded"),
        RequestResult(ok=False, start=0.0, latency=0.01, error="overloaded"),
        RequestResult(ok=False, start=0.0, latency=5.0, error="timeout"),
    ]
    s = summarize(results, 2.0, mode="ws", concurrency=2, max_tokens=4)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 2, 3)
    assert s["errors"] == {"overloaded": 2, "timeout": 1}
    assert s["finish_reasons"] == {"length": 2}
    assert s["full_length"] == 2
    assert (s["input_tokens"], s["output_tokens"]) == (20, 8)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(4.0)
    assert s["total_token_throughput"] == pytest.approx(14.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(75.0)
    assert s["itl_ms"]["count"] == 6
    assert s["itl_ms"]["p50"] == pytest.approx(75.0)
    assert s["e2e_ms"]["max"] == pytest.approx(600.0)
    table = format_summary(s)
    for label in ("Successful requests:", "error overloaded:", "P99 TTFT (ms):", "ITL"):
        assert label in table
    json.dumps(s)  # the summary is plain JSON


def test_non_streaming_results_have_no_itl_or_tpot() -> None:
    r = RequestResult(
        ok=True, start=0.0, latency=0.5, ttft=0.5, completion_tokens=8, streamed=False
    )
    s = summarize([r], 0.5, mode="query", concurrency=1)
    assert s["streamed"] is False
    assert s["ttft_ms"]["p50"] == s["e2e_ms"]["p50"] == pytest.approx(500.0)
    assert s["tpot_ms"]["count"] == s["itl_ms"]["count"] == 0
    assert "does not stream" in format_summary(s)


def test_overload_summary_splits_admitted_and_refused() -> None:
    results = [
        RequestResult(ok=True, start=10.0, latency=2.0, ttft=0.5, completion_tokens=64),
        RequestResult(ok=True, start=10.5, latency=3.0, ttft=1.5, completion_tokens=32),
        RequestResult(ok=False, start=11.0, latency=0.002, error="server_busy"),
        RequestResult(ok=False, start=11.5, latency=0.004, error="server_busy"),
        RequestResult(ok=False, start=12.0, latency=30.0, error="timeout"),
    ]
    summary = overload.summarize_overload(results, duration=10.0, offered=0.5)
    assert (summary["completed"], summary["refused"], summary["other_error_count"]) == (2, 2, 1)
    assert summary["refused_share"] == pytest.approx(0.4)
    assert summary["goodput_rps"] == pytest.approx(0.2)
    assert summary["goodput_tok_s"] == pytest.approx(9.6)
    assert summary["ttft_admitted_ms"]["p50"] == pytest.approx(1000.0)
    assert summary["refusal_ms"]["max"] == pytest.approx(4.0)
    assert summary["samples"][0] == (0.0, 0.5, 2.0, None)
    assert overload.running_slots("--max-queue 2 --max-running 8") == 8


def test_a_report_says_when_the_server_was_held_to_avx2() -> None:
    """Figures of a --cpu-isa avx2 server are this CPU's speed, and the report says so."""
    precision = {"dtype": "int8", "kernels": "int8-avx2", "device": "cpu"}
    assert "held to" not in describe_precision(precision)
    held = describe_precision({**precision, "isa_limit": "avx2"})
    assert "held to AVX2" in held and "this CPU's speed" in held


def test_markdown_table_aligns_columns() -> None:
    table = markdown_table(("name", "tok/s"), [("a", 1.5), ("bb", None)]).splitlines()
    assert table[0] == "| name | tok/s |"
    assert table[1] == "| ---- | ----: |"
    assert table[2] == "| a    |  1.50 |"
    assert table[3] == "| bb   |   n/a |"


# --- arrival schedules and pass specs ---------------------------------------------------


def test_poisson_schedule_has_the_requested_rate() -> None:
    times = arrival_schedule(100.0, requests=4000, seed=1)
    assert len(times) == 4000
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    assert times[-1] / len(times) == pytest.approx(0.01, rel=0.06)
    assert times == arrival_schedule(100.0, requests=4000, seed=1)
    assert times != arrival_schedule(100.0, requests=4000, seed=2)
    within = arrival_schedule(50.0, duration=20.0, seed=3)
    assert max(within) < 20.0
    assert len(within) == pytest.approx(1000, rel=0.1)
    assert len(arrival_schedule(50.0, requests=10, duration=20.0)) == 10


def test_load_spec_needs_bounds() -> None:
    with pytest.raises(ValueError):
        LoadSpec(concurrency=1)  # neither a count nor a duration
    with pytest.raises(ValueError):
        LoadSpec(concurrency=0, requests=4)
    LoadSpec(concurrency=None, rate=2.0, duration=1.0)  # rate mode: the cap is optional


# --- prompts ----------------------------------------------------------------------------


def test_builtin_prompts_are_distinct_and_requests_stay_distinct() -> None:
    assert len(set(BUILTIN_PROMPTS)) == len(BUILTIN_PROMPTS) >= 24
    assert len({prompt_for(BUILTIN_PROMPTS, i) for i in range(200)}) == 200


def test_prompts_file(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "one"}\n\n{"prompt": "two"}\n')
    assert load_prompts(good) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompts(bad)


# --- the loopback guard -----------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.3.2.1", "localhost", "LOCALHOST.", "::1", "[::1]", "::ffff:127.0.0.1"],
)
def test_loopback_hosts_pass(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host", ["10.0.0.1", "192.168.1.2", "0.0.0.0", "example.com", "localhost.example.com", "::"]
)
def test_other_hosts_are_refused(host: str) -> None:
    assert not is_loopback_host(host)


def test_check_url() -> None:
    assert check_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert check_url("http://[::1]:8080") == "http://[::1]:8080"
    with pytest.raises(RemoteURLRefused):
        check_url("http://example.com:8080")
    assert check_url("https://example.com", allow_remote=True) == "https://example.com"
    with pytest.raises(ValueError):
        check_url("ftp://127.0.0.1/")


def test_guard_refuses_remote_url_before_sending_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the load tester touched the network")

    monkeypatch.setattr(aiohttp.ClientSession, "__init__", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    assert load_main(["--url", "http://example.com:8080", "--requests", "1"]) == 2
    assert "refusing to load-test 'example.com'" in capsys.readouterr().err


# --- CPU accounting from /proc ----------------------------------------------------------


def test_parse_stat_copes_with_odd_command_names() -> None:
    fields = ["S", "42"] + ["0"] * 9 + ["300", "200"] + ["0"] * 10
    text = "1234 (a b) (c)) " + " ".join(fields)
    ppid, seconds = parse_stat(text)
    assert ppid == 42
    assert seconds == pytest.approx(500 / CLOCK_TICKS)


def test_cpu_of_a_process_tree_includes_children() -> None:
    """A parent that sleeps and a child that spins: the tree uses about one core."""
    spin = "import time\nt = time.time() + 5\nwhile time.time() < t: pass"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])",
        ]
    )
    try:
        deadline = time.monotonic() + 5
        while len(tree_cpu_seconds(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        idle = measure_idle_cpu(parent.pid, 0.8)
    finally:
        parent.kill()
        parent.wait()
    assert idle["processes"] == 2
    assert idle["percent_of_one_core"] > 40  # the spinning child; the machine may be busy


# --- the Locust file (locust is an optional extra) --------------------------------------


def test_locustfile_defines_both_users() -> None:
    users = {"ChatWebSocketUser", "ChatHttpUser"}
    if importlib.util.find_spec("locust") is None:  # not installed here: check it statically
        tree = ast.parse(LOCUSTFILE.read_text())
        assert users <= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
        return
    # importing locust monkey-patches the process with gevent: do it in another one
    check = (
        f"import runpy; names = runpy.run_path({str(LOCUSTFILE)!r}); assert {users!r} <= set(names)"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60, cwd=LOCUSTFILE.parents[1])


# --- real runs against the shared server ------------------------------------------------


def _ordered(dist: dict) -> bool:
    return dist["p50"] <= dist["p90"] <= dist["p99"] <= dist["max"]


def _run(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    assert load_main([*args, "--json", str(out), "--no-progress", "--warmup", "0"]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["ws", "query", "openai"])
def test_each_mode_against_the_server(
    mode: str, server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _run(
        ["--url", server_url, "--mode", mode, "--concurrency", "2", "--requests", "4"]
        + ["--max-tokens", "4"],
        tmp_path,
    )
    (s,) = report["runs"]
    assert s["mode"] == mode
    assert (s["requests"], s["completed"], s["failed"], s["errors"]) == (4, 4, 0, {})
    assert 0 < s["output_tokens"] <= 4 * 4
    assert s["input_tokens"] > 0
    assert s["output_throughput"] > 0 and s["request_throughput"] > 0
    assert _ordered(s["ttft_ms"]) and _ordered(s["e2e_ms"])
    assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["max"]
    if mode == "query":
        assert s["streamed"] is False and s["itl_ms"]["count"] == 0
    else:
        assert s["streamed"] is True
        assert s["itl_ms"]["count"] > 0 and _ordered(s["itl_ms"])
    assert "Successful requests:" in capsys.readouterr().out


def test_rate_mode(server_url: str, tmp_path: Path) -> None:
    report = _run(
        ["--url", server_url, "--rate", "20", "--requests", "4", "--max-tokens", "4"], tmp_path
    )
    (s,) = report["runs"]
    assert s["rate"] == 20.0 and s["concurrency"] is None
    assert (s["completed"], s["failed"]) == (4, 0)


def test_duration_bound(server_url: str, tmp_path: Path) -> None:
    start = time.monotonic()
    report = _run(
        ["--url", server_url, "--duration", "1", "--concurrency", "2", "--max-tokens", "4"],
        tmp_path,
    )
    (s,) = report["runs"]
    assert s["completed"] >= 1 and s["failed"] == 0
    assert time.monotonic() - start < 30


def test_sweep_writes_a_plot(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "sweep.png"
    report = _run(
        ["--url", server_url, "--sweep", "1,2", "--requests", "2", "--max-tokens", "4"]
        + ["--plot", str(png)],
        tmp_path,
    )
    assert [s["concurrency"] for s in report["runs"]] == [1, 2]
    assert all(s["completed"] == 2 for s in report["runs"])
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert "| concurrency |" in capsys.readouterr().out


def test_bench_batching_small(
    server, server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["--url", server_url, "--pid", str(server.proc.pid), "--levels", "1,2"]
    argv += ["--max-tokens", "4", "--rounds", "1", "--min-requests", "2", "--idle-seconds", "1"]
    argv += ["--warmup", "0"]
    argv += ["--probe-rate", "20", "--json", str(out), "--no-progress"]
    assert bench_batching.main(argv) == 0
    report = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["completed"] == 2 and level["failed"] == 0
        assert level["healthz"]["latency_ms"]["count"] > 0
        # measured from /proc in clock ticks: a tiny level may round to 0, never to None
        assert level["server_cpu_us_per_token"] is not None
        assert level["server_cpu_us_per_token"] >= 0
    assert 0 <= report["idle_cpu"]["percent_of_one_core"] < 400
    stdout = capsys.readouterr().out
    assert "| concurrency |" in stdout and "idle CPU:" in stdout


def test_random_model_keeps_config_and_tokenizer(model_dir: Path, tmp_path: Path) -> None:
    """The GPU benchmark's stand-in model: same shapes and tokenizer, other weights, and it
    runs through the worker like the real one."""
    import torch
    from safetensors import safe_open

    from chatserver.protocol.worker import GenerateRequest, SamplingParams, WorkerConfig
    from chatserver.workers.core import build_core
    from load_tests.random_model import TOKENIZER_FILES, write_random_model

    light = tmp_path / "light"  # what travels: config and tokenizer only
    light.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        if (model_dir / name).exists():
            (light / name).write_bytes((model_dir / name).read_bytes())
    out = write_random_model(light, tmp_path / "random")

    assert (
        json.loads((out / "config.json").read_text())["num_hidden_layers"]
        == json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    )
    assert (out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    name = "model.layers.0.mlp.down_proj.weight"
    with (
        safe_open(out / "model.safetensors", "pt") as new,
        safe_open(model_dir / "model.safetensors", "pt") as real,
    ):
        assert new.get_tensor(name).shape == real.get_tensor(name).shape
        assert not torch.equal(new.get_tensor(name), real.get_tensor(name))

    # Random weights have no quality to gate: near-flat logits make top-1 agreement noise.
    config = WorkerConfig(str(out), "random", "cpu", "int8", 512, 4, 64, 2, skip_quality_gate=True)
    core, ready = build_core(0, config)
    assert ready.runner == "llama-slots"
    core.submit(GenerateRequest(1, [1, 2, 3, 4], SamplingParams(max_tokens=5)))
    tokens = []
    while core.has_work:
        tokens += core.step().tokens
    assert len(tokens) == 5


def test_gpu_runner_check_runs_its_checks_on_the_cpu(model_dir: Path, tmp_path: Path) -> None:
    """The GPU session's first check (load_tests/gpu_check.sh), on a one-layer random
    model here: the runner agrees with transformers, and every batch size is timed."""
    from load_tests import gpu_runner_check
    from load_tests.random_model import write_random_model

    model = write_random_model(model_dir, tmp_path / "random", overrides={"num_hidden_layers": 1})
    out = tmp_path / "runner.json"
    argv = ["--model", str(model), "--device", "cpu", "--batches", "1,3", "--steps", "2"]
    assert gpu_runner_check.main([*argv, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["agreement_passed"] and record["agreement"]["float32"] <= 1e-3
    assert record["kernels"].startswith("bfloat16")
    assert [row["batch"] for row in record["steps"]] == [1, 3]
    assert all(row["runner_tok_s"] > 0 and row["core_tok_s"] > 0 for row in record["steps"])


def test_the_gpu_scripts_name_what_exists() -> None:
    """gpu_check.sh runs modules and flags that exist, on what gpu_bundle.sh writes."""
    root = Path(__file__).resolve().parent.parent
    check = (root / "load_tests" / "gpu_check.sh").read_text()
    bundle = (root / "load_tests" / "gpu_bundle.sh").read_text()
    for module in ("random_model", "gpu_runner_check", "bench_batching"):
        assert f"python3 -m load_tests.{module}" in check
        assert importlib.util.find_spec(f"load_tests.{module}") is not None
    assert ".gpu/wheels" in check and ".gpu/wheels" in bundle
    assert ".gpu/model" in check and ".gpu/model" in bundle
    assert "/.gpu/" in (root / ".gitignore").read_text().splitlines()
    for flag in ("--levels", "--rounds", "--min-requests", "--idle-seconds", "--level-duration"):
        assert flag in check and flag in (root / "load_tests" / "bench_batching.py").read_text()
    serve_help = subprocess.run(
        [sys.executable, "-m", "chatserver", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--model", "--engine", "--max-batch", "--skip-quality-gate"):
        assert flag in check and flag in serve_help
    for script in ("gpu_check.sh", "gpu_bundle.sh"):
        syntax = subprocess.run(["bash", "-n", str(root / "load_tests" / script)])
        assert syntax.returncode == 0, script


def test_startup_times_a_real_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from load_tests import startup

    out = tmp_path / "startup.json"
    config = "f32=--dtype float32 --max-context 1024"
    assert startup.main(["--runs", "1", "--config", config, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report)[0] == "machine"
    [run] = report["runs"]
    assert run["config"] == "f32" and len(run["seconds"]) == 1 and run["seconds"][0] > 0
    assert report["precision"]["f32 (this checkout)"]["dtype"] == "float32"
    printed = capsys.readouterr().out
    assert "| f32 " in printed and "--dtype float32 --max-context 1024" in printed
    assert startup.main(["--checkout", str(tmp_path)]) == 2  # no chatserver there


def test_gemm_ceiling_times_every_kernel_path(tmp_path: Path) -> None:
    from load_tests import gemm_ceiling

    out = tmp_path / "gemm.json"
    args = ["--rows", "1,3", "--layers", "2", "--repeats", "2", "--json", str(out)]
    assert gemm_ceiling.main(args) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_capability"] and report["shape"]["num_hidden_layers"] == 2
    rows = report["rows"]
    assert {(r["rows"], r["path"].split()[0]) for r in rows} == {
        (n, path) for n in (1, 3) for path in ("float32", "fbgemm")
    }
    for r in rows:  # the ceiling is the step's rows over the step's time
        assert r["ceiling_tok_s"] == pytest.approx(r["rows"] / r["step_ms"] * 1e3, rel=0.02)
    macs = 2 * (960 * 576 + 576 * 576 + 3072 * 576 + 576 * 1536) + 49152 * 576
    for r in rows:
        assert r["gops"] == pytest.approx(2 * macs * r["rows"] / r["step_ms"] / 1e6, rel=0.02)


async def test_fresh_connections_survive_a_server_that_closes_kept_alive_streams() -> None:
    """llama-server advertises keep-alive, then closes the connection after a streamed
    reply; ``--fresh-connections`` gives every request its own, so none fails on that."""
    peers: list[int] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"delta": {"content": "hi"}, "finish_reason": "length"}]}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        request.transport.close()  # after the reply, as llama-server does
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}"
        async with open_client("openai", url, model="m", fresh_connections=True) as client:
            results = [await client.request("Hi", 1, f"r{i}") for i in range(6)]
        assert [r.error for r in results] == [None] * 6
        assert len(set(peers)) == 6  # one connection a request
    finally:
        await runner.cleanup()
