"""chatserver.models.sampling: one bad row never takes its neighbours down."""

from __future__ import annotations

import pytest
import torch

from chatserver.models.sampling import Sampler
from chatserver.protocol.worker import GREEDY_TEMPERATURE, SamplingParams


def test_tiny_temperature_is_greedy_and_never_overflows() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    sampler = Sampler(torch.device("cpu"))
    for temperature in (1e-40, GREEDY_TEMPERATURE / 10):
        params = SamplingParams(temperature=temperature)
        assert params.greedy
        assert sampler.sample(logits, [1], [params]) == [1]
    # Just above the threshold it samples, and still cannot overflow: the top
    # token dominates completely.
    params = SamplingParams(temperature=GREEDY_TEMPERATURE, seed=0)
    assert not params.greedy
    assert sampler.sample(logits * 1e4, [2], [params]) == [1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_row_fails_alone(bad: float) -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, bad, 1.0], [5.0, 1.0, 0.0]])
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=1), SamplingParams()]
    assert Sampler(torch.device("cpu")).sample(logits, [1, 2, 3], params) == [1, None, 0]


# --- logit_bias and penalties: per sequence, offsets on the raw logits ------------------


def test_huge_logit_bias_forces_its_token_greedy_and_sampled() -> None:
    logits = torch.tensor([[9.0, 1.0, 0.0, 5.0]] * 3)
    sampler = Sampler(torch.device("cpu"))
    params = [
        SamplingParams(logit_bias=((2, 100.0),)),
        SamplingParams(temperature=1.0, seed=7, logit_bias=((2, 100.0),)),
        SamplingParams(),  # the same logits, no bias: its neighbours' bias is not its own
    ]
    for _ in range(20):
        assert sampler.sample(logits, [1, 2, 3], params) == [2, 2, 0]


def test_negative_logit_bias_bans_a_token_and_ids_past_the_logits_are_dropped() -> None:
    sampler = Sampler(torch.device("cpu"))
    banned = SamplingParams(logit_bias=((0, -100.0), (99, 100.0)))
    assert sampler.sample(torch.tensor([[9.0, 1.0, 5.0]]), [1], [banned]) == [2]


def test_frequency_penalty_stops_a_token_repeating() -> None:
    # Token 0 leads by 1.5: greedy repeats it for ever; a frequency penalty of 1
    # takes 1 off it per time it was generated, so the runner-up gets its turn.
    logits = torch.tensor([[2.5, 1.0, 0.0]])
    plain, penalized = Sampler(torch.device("cpu")), Sampler(torch.device("cpu"))
    p = SamplingParams(frequency_penalty=1.0)
    greedy = [plain.sample(logits, [1], [SamplingParams()])[0] for _ in range(6)]
    out = [penalized.sample(logits, [1], [p])[0] for _ in range(6)]
    assert greedy == [0] * 6
    assert out[:3] == [0, 0, 1]  # 2.5 -> 1.5 -> 0.5 < 1.0
    assert all(a != b or a != c for a, b, c in zip(out, out[1:], out[2:], strict=False))


def test_presence_penalty_counts_a_token_once() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    sampler = Sampler(torch.device("cpu"))
    p = SamplingParams(presence_penalty=1.5)
    # Token 0 drops to 1.5 once generated, token 1 to 0.5; then 0 wins for good,
    # however often it repeats (a frequency penalty would keep lowering it).
    assert [sampler.sample(logits, [1], [p])[0] for _ in range(6)] == [0, 1, 0, 0, 0, 0]


def test_penalties_are_per_sequence_and_forgotten() -> None:
    logits = torch.tensor([[2.5, 1.0, 0.0]] * 2)
    sampler = Sampler(torch.device("cpu"))
    p = SamplingParams(frequency_penalty=2.0)
    assert sampler.sample(logits, [1, 2], [p, p]) == [0, 0]
    assert sampler.sample(logits, [1, 2], [p, SamplingParams()]) == [1, 0]
    assert sampler.sample(logits[:1], [3], [p]) == [0]  # a new sequence starts afresh
    sampler.forget(1)
    assert sampler.sample(logits[:1], [1], [p]) == [0]  # seq 1 again: its counts are gone


def test_rows_without_bias_or_penalties_keep_no_state() -> None:
    sampler = Sampler(torch.device("cpu"))
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=1)]
    sampler.sample(torch.tensor([[1.0, 3.0, 2.0]] * 2), [1, 2], params)
    assert sampler.offsets == {}
