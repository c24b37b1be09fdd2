"""Per-sequence sampling over a step's logits.

Greedy rows take one vectorised argmax; sampled rows apply their own
temperature, top-k and top-p and draw from their own `torch.Generator`, seeded
from the request's seed, so a seeded request is reproducible whatever else
shares its batch (up to floating-point differences in the logits).

A row that cannot be sampled (non-finite logits, a sampling error) yields
None: that sequence fails alone, never the whole step. Scores are shifted by
their maximum before the temperature divides them, so no temperature the API
accepts can overflow to inf or NaN.

A sequence with OpenAI's ``logit_bias``, ``presence_penalty`` or
``frequency_penalty`` keeps one vector of offsets added to its raw logits
before anything else (greedy or sampled): the bias, less ``frequency_penalty``
for every time a token was generated and ``presence_penalty`` once a token has
been. It is built at its first step and updated in place by one element per
sampled token, so a step costs such a row one vector add; the generated tokens
are the ones this sampler chose (every one joins its sequence, or ends it), so
no counts cross the process boundary. Rows without these settings take the
batch's shared argmax as before and keep no state here.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from chatserver.protocol.worker import SamplingParams

log = logging.getLogger(__name__)


def adjusts_logits(p: SamplingParams) -> bool:
    """Whether a sequence's logits get offsets (a bias or penalties) before sampling."""
    return bool(p.logit_bias or p.presence_penalty or p.frequency_penalty)


@dataclass(slots=True)
class Offsets:
    """One sequence's additions to its logits: its logit_bias, less its penalties so far."""

    values: torch.Tensor  # float32, one per vocabulary entry
    seen: set[int] = field(default_factory=set)  # tokens generated at least once


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generators: dict[int, torch.Generator] = {}
        self.offsets: dict[int, Offsets] = {}

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        self.offsets.pop(seq_id, None)

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
                continue
            adjusted = adjusts_logits(p)
            if p.greedy and not adjusted:
                continue  # the shared argmax
            try:
                scores = logits[row]
                if adjusted:
                    offsets = self._offsets(seq_id, p, scores.shape[-1])
                    scores = scores.float() + offsets.values
                token = int(scores.argmax()) if p.greedy else self._sample_row(scores, seq_id, p)
                if adjusted:
                    self._penalize(offsets, token, p)
                chosen[row] = token
            except RuntimeError:
                log.exception("sequence %d: sampling failed; failing it alone", seq_id)
                chosen[row] = None
        return chosen

    def _offsets(self, seq_id: int, p: SamplingParams, vocab: int) -> Offsets:
        offsets = self.offsets.get(seq_id)
        if offsets is None:
            values = torch.zeros(vocab, dtype=torch.float32, device=self.device)
            # The API checks ids against the tokenizer; ids past the logits are dropped.
            pairs = [(i, b) for i, b in p.logit_bias if i < vocab]
            if pairs:
                ids, biases = zip(*pairs, strict=True)
                values[list(ids)] = torch.tensor(biases, dtype=torch.float32, device=self.device)
            offsets = self.offsets[seq_id] = Offsets(values)
        return offsets

    @staticmethod
    def _penalize(offsets: Offsets, token: int, p: SamplingParams) -> None:
        """Count one generated token: frequency_penalty each time, presence_penalty once."""
        if not (p.frequency_penalty or p.presence_penalty):
            return  # a logit_bias alone
        penalty = p.frequency_penalty
        if token not in offsets.seen:
            offsets.seen.add(token)
            penalty += p.presence_penalty
        if penalty:
            offsets.values[token] -= penalty

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
