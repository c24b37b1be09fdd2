"""Per-sequence sampling over a step's logits.

Greedy rows take one vectorised argmax; sampled rows apply their own
temperature, top-k and top-p and draw from their own `torch.Generator`, seeded
from the request's seed, so a seeded request is reproducible whatever else
shares its batch (up to floating-point differences in the logits).

A row that cannot be sampled (non-finite logits, a sampling error) yields
None: that sequence fails alone, never the whole step. Scores are shifted by
their maximum before the temperature divides them, so no temperature the API
accepts can overflow to inf or NaN.
"""

from __future__ import annotations

import logging
import random

import torch

from chatserver.protocol.worker import SamplingParams

log = logging.getLogger(__name__)


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generators: dict[int, torch.Generator] = {}

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def _generator(self, seq_id: int, seed: int | None) -> torch.Generator:
        gen = self.generators.get(seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed % (1 << 64) if seed is not None else random.getrandbits(63))
            self.generators[seq_id] = gen
        return gen

    def sample(
        self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]
    ) -> list[int | None]:
        """One token per row, or None for a row that could not be sampled."""
        if not seq_ids:
            return []
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        chosen: list[int | None] = logits.argmax(dim=-1).tolist()
        for row, (seq_id, p) in enumerate(zip(seq_ids, params, strict=True)):
            if not finite[row]:
                log.error("sequence %d: non-finite logits; failing it alone", seq_id)
                chosen[row] = None
            elif not p.greedy:
                try:
                    chosen[row] = self._sample_row(logits[row], seq_id, p)
                except RuntimeError:
                    log.exception("sequence %d: sampling failed; failing it alone", seq_id)
                    chosen[row] = None
        return chosen

    def _sample_row(self, logits: torch.Tensor, seq_id: int, p: SamplingParams) -> int:
        scores = (logits - logits.max()) / p.temperature  # <= 0 everywhere, 0 at the top
        if p.top_k > 0 and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= p.top_p
            drop[0] = False  # always keep the most likely token
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(seq_id, p.seed)))
