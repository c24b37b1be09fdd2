"""Per-sequence sampling over a step's logits.

Greedy rows take one vectorised argmax; sampled rows apply their own
temperature, top-k and top-p and draw from their own `torch.Generator`, seeded
from the request's seed, so a seeded request is reproducible whatever else
shares its batch (up to floating-point differences in the logits).
"""

from __future__ import annotations

import random

import torch

from chatserver.protocol.worker import SamplingParams


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
    ) -> list[int]:
        if not seq_ids:
            return []
        chosen = logits.argmax(dim=-1).tolist()
        for row, (seq_id, p) in enumerate(zip(seq_ids, params, strict=True)):
            if p.greedy:
                continue
            scores = logits[row] / p.temperature
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
            chosen[row] = int(
                torch.multinomial(probs, 1, generator=self._generator(seq_id, p.seed))
            )
        return chosen
