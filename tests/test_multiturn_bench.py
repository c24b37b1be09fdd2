"""load_tests/multiturn.py's summary logic: pure functions over made-up turns, no server."""

from __future__ import annotations

import pytest

from load_tests import multiturn
from load_tests.multiturn import (
    TurnResult,
    cached_share,
    cached_tokens_of,
    comparison_table,
    headline,
    history_share,
    report_table,
    same_replies,
    summarize_run,
    summary_table,
    ttft_growth,
    turn_rows,
    user_turn,
)


def _turn(
    conversation: int,
    turn: int,
    ttft_ms: float | None = 100.0,
    prompt: int = 200,
    cached: int | None = None,
    ok: bool = True,
    reply: str = "r",
    error: str | None = None,
) -> TurnResult:
    return TurnResult(
        conversation=conversation,
        turn=turn,
        ok=ok,
        ttft=None if ttft_ms is None else ttft_ms / 1000.0,
        latency=1.0,
        prompt_tokens=prompt if ok else 0,
        cached_tokens=cached,
        completion_tokens=32 if ok else 0,
        finish_reason="length" if ok else None,
        error=error,
        reply=reply,
    )


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_cached_tokens_read_from_either_shape_and_missing_is_none() -> None:
    usage = {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 7}}
    assert cached_tokens_of(usage) == 7
    assert cached_tokens_of({"prompt_tokens_details": {"cached_tokens": 7}}) == 7
    assert cached_tokens_of({"prompt_tokens": 9, "cached_tokens": 5}) == 5
    assert cached_tokens_of({"prompt_tokens_details": {"cached_tokens": 0}}) == 0
    for unsaid in (
        None,
        [],
        {},
        {"prompt_tokens": 9},
        {"prompt_tokens_details": None},
        {"prompt_tokens_details": {}},
        {"cached_tokens": None},
        {"cached_tokens": -1},
        {"cached_tokens": "5"},
        {"cached_tokens": 2.5},
        {"cached_tokens": True},
    ):
        assert cached_tokens_of(unsaid) is None, unsaid


def test_result_of_a_failed_turn_has_no_cached_tokens() -> None:
    from load_tests.stats import RequestResult

    ok = RequestResult(ok=True, start=0.0, latency=1.0, ttft=0.25, prompt_tokens=10)
    r = TurnResult.of(2, 3, ok, {"cached_tokens": 4}, "hi")
    assert (r.conversation, r.turn, r.ok, r.cached_tokens, r.reply) == (2, 3, True, 4, "hi")
    assert r.as_dict()["ttft_ms"] == 250.0 and "ttft" not in r.as_dict()
    bad = RequestResult(ok=False, start=0.0, latency=1.0, error="timeout")
    assert TurnResult.of(0, 1, bad, {"cached_tokens": 4}, "").cached_tokens is None


def test_cached_share_counts_unsaid_as_zero_and_skips_failures() -> None:
    results = [
        _turn(0, 2, prompt=400, cached=300),
        _turn(1, 2, prompt=400, cached=None),  # this server did not say: 0
        _turn(2, 2, ok=False, error="timeout"),
    ]
    assert cached_share(results) == pytest.approx(300 / 800)
    assert cached_share([]) is None
    assert cached_share([_turn(0, 1, ok=False)]) is None
    assert cached_share([_turn(0, 1, prompt=0)]) is None


def test_turn_rows_take_the_percentile_per_turn_over_conversations() -> None:
    # Turn 1 of four conversations, then turn 2 of three (one failed), listed out of order.
    results = [
        _turn(3, 1, ttft_ms=400, prompt=200, cached=0),
        _turn(0, 2, ttft_ms=50, prompt=420, cached=400),
        _turn(0, 1, ttft_ms=100, prompt=200, cached=0),
        _turn(1, 1, ttft_ms=200, prompt=200, cached=20),
        _turn(1, 2, ttft_ms=70, prompt=430, cached=410),
        _turn(2, 1, ttft_ms=300, prompt=200, cached=20),
        _turn(2, 2, ok=False, ttft_ms=None, error="timeout"),
    ]
    first, second, third = turn_rows(results, 3)
    assert first["turn"] == 1 and (first["completed"], first["failed"]) == (4, 0)
    assert first["ttft_ms"] == {"p50": 250.0, "max": 400.0}  # numpy's linear p50
    assert first["prompt_tokens"] == 200 and first["cached_tokens"] == 10
    assert first["cached_share"] == pytest.approx(40 / 800)
    assert (second["completed"], second["failed"]) == (2, 1)
    assert second["ttft_ms"] == {"p50": 60.0, "max": 70.0}  # the failed turn is left out
    assert second["prompt_tokens"] == 425 and second["cached_tokens"] == 405
    assert second["cached_share"] == pytest.approx(810 / 850)
    # A turn nobody reached (stopped early, or a deadline) is all n/a, not an error.
    assert third == {
        "turn": 3,
        "completed": 0,
        "failed": 0,
        "ttft_ms": {"p50": None, "max": None},
        "prompt_tokens": None,
        "cached_tokens": None,
        "cached_share": None,
        "history_share": None,
    }


def test_history_share_is_the_previous_turn_over_this_prompt() -> None:
    results = [
        _turn(0, 1, prompt=200),  # + 32 reply tokens
        _turn(0, 2, prompt=430),
        _turn(1, 1, prompt=200),
        _turn(1, 2, ok=False),  # failed: no pair
        _turn(1, 3, prompt=700),  # its previous turn failed: no pair either
        _turn(2, 2, prompt=100),  # shorter than the last turn (history dropped): capped
        _turn(2, 1, prompt=300),
    ]
    assert history_share(results) == pytest.approx((232 + 100) / (430 + 100))
    rows = turn_rows(results, 3)
    assert rows[0]["history_share"] is None  # turn 1 repeats nothing
    assert rows[1]["history_share"] == pytest.approx((232 + 100) / (430 + 100))
    assert rows[2]["history_share"] is None
    assert history_share([]) is None


def test_ttft_growth_is_last_turn_over_first() -> None:
    rows = turn_rows([_turn(0, 1, ttft_ms=200), _turn(0, 2, ttft_ms=300)], 2)
    assert ttft_growth(rows) == pytest.approx(1.5)
    assert ttft_growth(turn_rows([_turn(0, 1, ttft_ms=200)], 2)) is None  # no last turn
    assert ttft_growth([]) is None


def test_summarize_run_and_its_tables() -> None:
    results = [
        _turn(0, 1, ttft_ms=100, prompt=200, cached=0),
        _turn(1, 1, ttft_ms=300, prompt=200, cached=0),
        _turn(0, 2, ttft_ms=120, prompt=430, cached=420),
        _turn(1, 2, ok=False, ttft_ms=None, error="timeout"),
    ]
    run = summarize_run(results, api="ws", conversations=2, turns=2, duration=3.0)
    assert (run["api"], run["conversations"], run["turns"]) == ("ws", 2, 2)
    assert (run["planned"], run["completed"], run["failed"]) == (4, 3, 1)
    assert run["errors"] == {"timeout": 1}
    assert run["cached_reported"] is True
    assert run["ttft_growth"] == pytest.approx(120 / 200)
    assert run["cached_share_after_first"] == pytest.approx(420 / 430)
    assert [(s["conversation"], s["turn"]) for s in run["samples"]] == [
        (0, 1),
        (0, 2),
        (1, 1),
        (1, 2),
    ]

    table = report_table(run).splitlines()
    assert _cells(table[0]) == list(multiturn.TABLE_HEADERS)
    assert _cells(table[2]) == ["1", "2/2", "200", "0", "0%", "n/a", "200", "300", "1.00x"]
    # history: turn 1's 200 prompt + 32 reply tokens of 430
    assert _cells(table[3]) == ["2", "1/2", "430", "420", "98%", "54%", "120", "120", "0.60x"]

    line = headline(run)
    assert "turn 2 TTFT p50 is 0.60x turn 1's" in line and "98% of prompt tokens" in line
    assert "timeout 1" in line and "reported no cached_tokens" not in line
    summary = summary_table([run]).splitlines()
    expected = ["ws", "2", "3/4", "200", "120", "0.60x", "98%", "54%", "timeout 1"]
    assert _cells(summary[2]) == expected


def test_a_server_that_reports_no_cached_tokens_says_so() -> None:
    run = summarize_run(
        [_turn(0, 1), _turn(0, 2, prompt=430)], api="openai", conversations=1, turns=2, duration=1
    )
    assert run["cached_reported"] is False
    assert run["cached_share_after_first"] == 0.0  # counted as 0, not n/a
    assert "reported no cached_tokens (counted as 0)" in headline(run)
    assert "not reported" in summary_table([run])


def test_comparison_matches_replies_by_conversation_and_turn() -> None:
    ours = summarize_run(
        [
            _turn(0, 1, ttft_ms=100, reply="a"),
            _turn(0, 2, ttft_ms=100, reply="b", cached=400, prompt=430),
            _turn(1, 1, ttft_ms=100, reply="c"),
            _turn(1, 2, ttft_ms=100, reply="d", cached=400, prompt=430),
        ],
        api="ws",
        conversations=2,
        turns=2,
        duration=1,
    )
    theirs = summarize_run(
        [
            _turn(0, 1, ttft_ms=200, reply="a"),
            _turn(0, 2, ttft_ms=400, reply="b", prompt=430),
            _turn(1, 1, ttft_ms=200, reply="c"),
            _turn(1, 2, ttft_ms=400, reply="other", prompt=430),
        ],
        api="ws",
        conversations=2,
        turns=2,
        duration=1,
    )
    assert same_replies(ours, theirs) == {1: (2, 2), 2: (1, 2)}
    rows = comparison_table(ours, theirs).splitlines()
    assert _cells(rows[2]) == ["1", "200", "100", "200", "0.50x", "0%", "0%", "2/2"]
    assert _cells(rows[3]) == ["2", "430", "100", "400", "0.25x", "93%", "0%", "1/2"]


def test_user_turns_are_deterministic_distinct_and_about_the_size_asked() -> None:
    assert user_turn("ws-c1", 0, 1) == user_turn("ws-c1", 0, 1)
    texts = {
        user_turn(multiturn.run_tag(api, n), c, t)
        for api in ("ws", "openai")
        for n in (1, 4)
        for c in range(n)
        for t in range(1, 11)
    }
    assert len(texts) == 2 * 5 * 10
    # ~1.14 tokens a word with the default tokenizer: about 190 tokens is ~153 words.
    words = len(user_turn("ws-c1", 0, 1).split())
    assert 140 <= words <= 170
    assert len(user_turn("ws-c1", 0, 1, tokens=400).split()) > 2 * words - 20


def test_parser_defaults_follow_the_issue() -> None:
    args = multiturn.build_parser().parse_args([])
    assert args.conversations == [1, 4] and args.turns == 10
    assert args.apis == ["ws", "openai"] and args.max_tokens == 32 and args.user_tokens == 190
    assert args.json.parent.name == "results" and args.plot.suffix == ".png"
    specs = multiturn.run_specs(args)
    assert [(s.api, s.conversations) for s in specs] == [
        ("ws", 1),
        ("openai", 1),
        ("ws", 4),
        ("openai", 4),
    ]
    with pytest.raises(SystemExit):
        multiturn.build_parser().parse_args(["--apis", "ws,grpc"])


def test_remote_urls_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(SystemExit):
        multiturn.main(["--url", "http://example.com:8080"])


def test_the_load_tester_runs_it_as_a_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from load_tests.__main__ import main as load_main

    with pytest.raises(SystemExit):
        load_main(["multiturn", "--url", "http://example.com:8080"])
    assert "chatserver-load multiturn" in capsys.readouterr().err
