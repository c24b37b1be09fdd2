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
