"""load_tests/soak.py: its summary logic over made-up samples and outcomes, then one
short run against the shared real server."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from load_tests import soak
from load_tests.soak import (
    BAD_RESPONSE,
    CANCELLED,
    CLIENT_CLOSED,
    CONNECT_ERROR,
    DONE,
    DROPPED,
    ERROR,
    OK,
    REFUSED,
    TIMEOUT,
    UNEXPECTED,
    WS_CLOSED,
    Outcome,
    Tolerance,
    classify,
    count_outcomes,
    default_warmup,
    flatness,
    kinds_for,
    malformed_http_body,
    malformed_ws_frame,
    relative_growth,
    slope_per_minute,
    status_fields,
    verdict_table,
    verdicts,
    window_latency,
)
from tests.serverproc import ServerProcess

# --- slope and growth ----------------------------------------------------------------


def test_slope_is_least_squares_per_minute() -> None:
    ts = [0.0, 30.0, 60.0, 90.0, 120.0]
    assert slope_per_minute(ts, [100 + 2 * t / 60 for t in ts]) == pytest.approx(2.0)
    assert slope_per_minute(ts, [5.0] * 5) == pytest.approx(0.0)
    # Noise around a line: the fit, not the end points.
    assert slope_per_minute([0, 60, 120, 180], [10, 13, 12, 15]) == pytest.approx(1.4)
    assert slope_per_minute([], []) is None
    assert slope_per_minute([1.0], [2.0]) is None
    assert slope_per_minute([5.0, 5.0], [1.0, 2.0]) is None  # one time: no slope
    assert slope_per_minute([1.0, 2.0], [1.0]) is None


def test_relative_growth_is_last_fifth_over_first() -> None:
    ys = [100.0] * 5 + [105.0] * 10 + [110.0] * 5  # fifths of 4: 100 first, 110 last
    assert relative_growth(ys) == pytest.approx(0.10)
    assert relative_growth([100.0, 90.0]) == pytest.approx(-0.10)  # a fifth is one value
    assert relative_growth([3.0]) is None
    assert relative_growth([0.0, 1.0]) is None


def _samples(key: str, values: list[float | None], every: float = 5.0) -> list[dict]:
    return [{"t": i * every, key: v} for i, v in enumerate(values)]


def test_flat_series_pass_and_a_leak_is_caught() -> None:
    rng = random.Random(1)
    # 10 minutes of 500 MiB with 1 MiB of noise: flat.
    noisy = [500.0 + rng.uniform(-1, 1) for _ in range(120)]
    v = flatness(_samples("rss", noisy), "rss", 60.0, Tolerance(0.01))
    assert v["flat"] is True and v["samples"] == 108  # the first minute left out
    assert v["limit_per_10min"] == pytest.approx(0.01 * v["median"])
    # 10 MiB over 10 minutes (2% of the median) is a leak.
    leak = [500.0 + 10.0 * i / 120 for i in range(120)]
    v = flatness(_samples("rss", leak), "rss", 60.0, Tolerance(0.01))
    assert v["flat"] is False
    assert v["slope_per_10min"] == pytest.approx(10.0)
    assert v["growth"] > 0.01
    # Falling is not a leak.
    v = flatness(_samples("rss", [500.0 - i for i in range(20)]), "rss", 0.0, Tolerance(0.01))
    assert v["flat"] is True and v["growth"] < 0


def test_warmup_samples_are_left_out() -> None:
    # A steep rise in the first minute (allocator, caches), then flat.
    values = [100.0 + 10 * i for i in range(12)] + [220.0] * 60
    assert flatness(_samples("rss", values), "rss", 0.0, Tolerance(0.01))["flat"] is False
    assert flatness(_samples("rss", values), "rss", 60.0, Tolerance(0.01))["flat"] is True


def test_absolute_tolerance_for_small_counts() -> None:
    # fds wandering by a few with open connections: within max(4, 5%) per 10 min.
    fds = [30, 34, 31, 33, 36, 30, 32, 35, 31, 34] * 6
    v = flatness(_samples("fds", fds, every=10.0), "fds", 0.0, Tolerance(0.05, 4.0))
    assert v["limit_per_10min"] == 4.0 and v["flat"] is True
    # One fd leaked a minute is not.
    v = flatness(
        _samples("fds", [30 + i // 6 for i in range(60)], every=10.0),
        "fds",
        0.0,
        Tolerance(0.05, 4.0),
    )
    assert v["flat"] is False and v["slope_per_min"] == pytest.approx(1.0, rel=0.05)


def test_missing_values_and_too_few_samples_give_no_verdict() -> None:
    values = [None, None, 10.0, None, 11.0]
    v = flatness(_samples("x", values), "x", 0.0, Tolerance(0.1))
    assert v["samples"] == 2 and v["flat"] is None and v["median"] == 10.5
    assert flatness([], "x", 0.0, Tolerance(0.1))["median"] is None
    assert "n/a" in verdict_table({"ttft_p50_ms": v})


def test_verdicts_cover_every_series_and_print() -> None:
    samples = [
        {
            "t": 5.0 * i,
            "server_rss_mib": 300.0,
            "workers_rss_mib": 600.0 + i,  # growing 12 MiB/min
            "server_fds": 40,
            "server_threads": 20,
            "ttft_p50_ms": 80.0,
            "query_p50_ms": None,
        }
        for i in range(40)
    ]
    out = verdicts(samples, default_warmup(200.0))
    assert set(out) == set(soak.SERIES)
    assert out["server_rss_mib"]["flat"] and not out["workers_rss_mib"]["flat"]
    assert out["query_p50_ms"]["flat"] is None
    table = verdict_table(out)
    assert "GROWING" in table and "flat" in table and "workers RSS (MiB)" in table


def test_default_warmup() -> None:
    assert default_warmup(600.0) == 60.0
    assert default_warmup(20.0) == 4.0


# --- failure classification -----------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "category"),
    [
        (Outcome("ws", "normal", DONE), OK),
        (Outcome("openai", "normal", DONE, status=200), OK),
        (Outcome("ws", "cancel", CANCELLED), OK),
        (Outcome("ws", "cancel", DONE), OK),  # finished before the cancel arrived
        (Outcome("ws", "cancel", ERROR, code="nothing_to_cancel"), OK),
        (Outcome("ws", "disconnect", CLIENT_CLOSED), OK),
        (Outcome("query", "disconnect", DONE), OK),  # answered before we left
        (Outcome("ws", "malformed", ERROR, code="invalid_json"), REFUSED),
        (Outcome("query", "malformed", ERROR, status=400, code="invalid_json"), REFUSED),
        (Outcome("openai", "malformed", ERROR, status=415, code="unsupported_media_type"), REFUSED),
        (Outcome("ws", "malformed", WS_CLOSED, status=1009), REFUSED),
        (Outcome("query", "normal", ERROR, status=503, code="server_busy"), REFUSED),
        (Outcome("ws", "normal", ERROR, code="rate_limited"), REFUSED),
        # unexpected: 5xx, internal errors, drops, timeouts, odd answers
        (Outcome("query", "normal", ERROR, status=500, code="generation_failed"), UNEXPECTED),
        (Outcome("query", "malformed", ERROR, status=500, code="internal_error"), UNEXPECTED),
        (Outcome("ws", "malformed", ERROR, code="internal_error"), UNEXPECTED),
        (Outcome("openai", "normal", ERROR, status=502), UNEXPECTED),
        (Outcome("ws", "normal", DROPPED), UNEXPECTED),
        (Outcome("ws", "normal", DROPPED, status=1006), UNEXPECTED),
        (Outcome("ws", "normal", WS_CLOSED, status=1011), UNEXPECTED),
        (Outcome("ws", "malformed", WS_CLOSED, status=1000), UNEXPECTED),
        (Outcome("openai", "normal", TIMEOUT), UNEXPECTED),
        (Outcome("query", "normal", CONNECT_ERROR), UNEXPECTED),
        (Outcome("openai", "normal", BAD_RESPONSE), UNEXPECTED),
        # a bad request accepted, a good one refused, a cancel nobody asked for
        (Outcome("query", "malformed", DONE, status=200), UNEXPECTED),
        (Outcome("ws", "normal", ERROR, code="invalid_field"), UNEXPECTED),
        (Outcome("ws", "normal", CANCELLED), UNEXPECTED),
        (Outcome("ws", "normal", CLIENT_CLOSED), UNEXPECTED),
        (Outcome("query", "cleanup", ERROR, status=500), UNEXPECTED),
    ],
)
def test_classify(outcome: Outcome, category: str) -> None:
    assert classify(outcome) == category
    assert outcome.as_dict()["category"] == category


def test_counts_split_by_category_and_kind() -> None:
    outcomes = [
        Outcome("ws", "normal", DONE),
        Outcome("ws", "normal", DONE),
        Outcome("query", "malformed", ERROR, status=400, code="invalid_json"),
        Outcome("openai", "normal", TIMEOUT),
    ]
    counts = count_outcomes(outcomes)
    assert (counts["requests"], counts[OK], counts[REFUSED], counts[UNEXPECTED]) == (4, 2, 1, 1)
    assert counts["by_kind"] == {
        "openai normal unexpected timeout": 1,
        "query malformed refused error:invalid_json (400)": 1,
        "ws normal ok done": 2,
    }


def test_window_latency_takes_normal_completed_requests_only() -> None:
    window = [
        Outcome("ws", "normal", DONE, ttft=0.1, latency=0.5),
        Outcome("openai", "normal", DONE, ttft=0.3, latency=0.6),
        Outcome("ws", "cancel", CANCELLED, ttft=0.01),  # not normal
        Outcome("ws", "normal", DROPPED, ttft=0.9),  # not completed
        Outcome("query", "normal", DONE, latency=1.0),
        Outcome("query", "normal", DONE, latency=3.0),
    ]
    out = window_latency(window)
    assert out["ttft_p50_ms"] == pytest.approx(200.0)
    assert out["query_p50_ms"] == pytest.approx(2000.0)
    assert (out["requests"], out["unexpected"]) == (6, 1)
    assert window_latency([])["ttft_p50_ms"] is None


def test_cancel_only_on_the_websocket_and_malformed_inputs_are_malformed() -> None:
    assert "cancel" in kinds_for("ws", soak.MIX)[0]
    assert "cancel" not in kinds_for("query", soak.MIX)[0]
    assert kinds_for("openai", {"normal": 1, "cancel": 5})[0] == ["normal"]
    rng = random.Random(0)
    for _ in range(50):
        frame = malformed_ws_frame(rng, "m1")
        try:
            data = json.loads(frame)
        except (ValueError, RecursionError):
            continue  # not JSON (or too deep): malformed
        assert not (
            isinstance(data, dict)
            and data.get("type") == "chat"
            and isinstance(data.get("content"), str)
            and not data.get("params")
        ), frame
        for api in ("query", "openai"):
            body, content_type = malformed_http_body(rng, api)
            assert body and content_type


def test_proc_status_fields_and_this_process() -> None:
    text = "Name:\tpython\nVmRSS:\t  123456 kB\nThreads:\t7\n"
    assert status_fields(text) == {"VmRSS": 123456, "Threads": 7}
    s = soak.process_sample(os.getpid())
    assert s["server_rss_mib"] > 1 and s["server_threads"] >= 1 and s["server_fds"] > 0


def test_parser_defaults_follow_the_issue() -> None:
    args = soak.build_parser().parse_args([])
    assert (args.duration, args.clients, args.sample_interval) == (600.0, 8, 5.0)
    assert args.max_tokens <= 32
    assert args.json.name == "soak.json" and args.plot.name == "soak.png"


def test_remote_urls_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(SystemExit):
        soak.main(["--url", "http://example.com:8080", "--pid", "1"])
    with pytest.raises(SystemExit):  # --pid alone makes no sense
        soak.main(["--pid", "1"])


# --- one short run against the real server ---------------------------------------------


@pytest.mark.slow
def test_short_soak_against_the_server(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    argv = ["--url", server.url, "--pid", str(server.pid), "--duration", "5"]
    argv += ["--sample-interval", "0.5", "--clients", "3", "--max-tokens", "8"]
    argv += ["--timeout", "30", "--json", str(out), "--plot", str(png), "--no-progress"]
    start = time.monotonic()
    code = soak.main(argv)
    elapsed = time.monotonic() - start
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0, printed
    assert elapsed < 75, elapsed  # 5 s of traffic, then the last replies drain
    assert list(report)[0] == "machine"
    counts = report["counts"]
    assert counts[UNEXPECTED] == 0, report["unexpected"]
    # A malformed request the server accepted would count as unexpected (above).
    assert counts[OK] > 0
    assert len(report["samples"]) >= 8
    assert all(s["server_rss_mib"] > 0 and s["server_fds"] > 0 for s in report["samples"])
    assert set(report["verdicts"]) == set(soak.SERIES)
    assert png.stat().st_size > 0
    assert "does it stay flat?" in printed and "failed unexpectedly" in printed
