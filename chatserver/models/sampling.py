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

Constrained rows (``SamplingParams.grammar``): the worker's `Constraints`
(workers/grammar.py) gives one allowed-token mask per constrained row of the
step, computed together; disallowed tokens become -inf after the offsets and
before temperature, top-k/top-p or the greedy argmax, and the sampled token
advances that row's matcher. A row whose grammar is complete after its token
is listed in ``completed`` (the scheduler finishes it with "stop"). Rows
without a grammar are never masked and cost nothing extra.

logprobs (``SamplingParams.logprobs``: 0, or k <= 20 alternatives): computed
from exactly the distribution the token was drawn from. Sampled rows: the
log-softmax of (logits + offsets, masked) / temperature after top-k and top-p
filtering, so a token outside the nucleus has -inf and is never listed; greedy
rows: the log-softmax of logits + offsets, masked, at temperature 1 (the
distribution greedy decoding takes the mode of). Each entry is (seq_id,
token, its logprob, the k most likely (token, logprob) pairs, most likely
first, -inf ones left out); they are in ``logprobs`` after each `sample` call,
only for rows that asked.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Protocol

import torch

from chatserver.protocol.worker import GrammarSpec, SamplingParams

log = logging.getLogger(__name__)


def adjusts_logits(p: SamplingParams) -> bool:
    """Whether a sequence's logits get offsets (a bias or penalties) before sampling."""
    return bool(p.logit_bias or p.presence_penalty or p.frequency_penalty)


@dataclass(slots=True)
class Offsets:
    """One sequence's additions to its logits: its logit_bias, less its penalties so far."""

    values: torch.Tensor  # float32, one per vocabulary entry
    seen: set[int] = field(default_factory=set)  # tokens generated at least once


# (seq_id, token, logprob, ((token, logprob), ...) most likely first): StepOutput.logprobs.
TokenLogprobs = tuple[int, int, float, tuple[tuple[int, float], ...]]


class Constraints(Protocol):
    """Per-sequence grammars (workers/grammar.py GrammarBook), as the sampler uses them."""

    def masks(
        self, rows: list[tuple[int, GrammarSpec, tuple[int, ...]]], width: int
    ) -> tuple[torch.Tensor, list[str | None]]: ...

    def advance(self, seq_id: int, token: int) -> bool: ...

    def forget(self, seq_id: int) -> None: ...


class Sampler:
    def __init__(self, device: torch.device, constraints: Constraints | None = None) -> None:
        self.device = device
        self.generators: dict[int, torch.Generator] = {}
        self.offsets: dict[int, Offsets] = {}
        self.constraints = constraints
        self.logprobs: list[TokenLogprobs] = []  # the last sample()'s, for rows that asked
        self.completed: set[int] = set()  # seq_ids whose grammar the last sample() completed

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        self.offsets.pop(seq_id, None)
        if self.constraints is not None:
            self.constraints.forget(seq_id)

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
        self.logprobs, self.completed = [], set()
        if not seq_ids:
            return []
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        chosen: list[int | None] = logits.argmax(dim=-1).tolist()
        masks, failures = self._masks(logits, seq_ids, params)
        for row, (seq_id, p) in enumerate(zip(seq_ids, params, strict=True)):
            if not finite[row]:
                log.error("sequence %d: non-finite logits; failing it alone", seq_id)
                chosen[row] = None
                continue
            if row in failures:
                log.error("sequence %d: %s; failing it alone", seq_id, failures[row])
                chosen[row] = None
                continue
            adjusted = adjusts_logits(p)
            mask = masks.get(row)
            if p.greedy and not adjusted and mask is None and p.logprobs is None:
                continue  # the shared argmax
            try:
                scores = logits[row].float()
                if adjusted:
                    offsets = self._offsets(seq_id, p, scores.shape[-1])
                    scores = scores + offsets.values
                if mask is not None:
                    if not bool(mask.any()):
                        log.error("sequence %d: its grammar allows no token; failing it", seq_id)
                        chosen[row] = None
                        continue
                    scores = scores.masked_fill(~mask, float("-inf"))
                if p.greedy:
                    token = int(scores.argmax()) if adjusted or mask is not None else chosen[row]
                    assert token is not None
                else:
                    token, scores = self._sample_row(scores, seq_id, p)
                if p.logprobs is not None:
                    self.logprobs.append(token_logprobs(seq_id, token, scores, p.logprobs))
                if adjusted:
                    self._penalize(offsets, token, p)
                if mask is not None and self.constraints is not None:
                    if self.constraints.advance(seq_id, token):
                        self.completed.add(seq_id)
                chosen[row] = token
            except (RuntimeError, ValueError):
                log.exception("sequence %d: sampling failed; failing it alone", seq_id)
                chosen[row] = None
        return chosen

    def _masks(
        self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]
    ) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
        """Allowed-token masks of the constrained rows (by row), computed in one call,
        and why a row cannot be sampled; both empty when no row has a grammar."""
        rows = [i for i, p in enumerate(params) if p.grammar is not None]
        if not rows:
            return {}, {}
        if self.constraints is None:
            return {}, {i: "this worker has no grammar support" for i in rows}
        wanted = [(seq_ids[i], params[i].grammar, params[i].stop_token_ids) for i in rows]
        try:
            allowed, errors = self.constraints.masks(wanted, logits.shape[-1])  # type: ignore[arg-type]
        except Exception as exc:
            log.exception("grammar masks failed; failing the constrained rows")
            return {}, {i: f"grammar masks failed: {exc}" for i in rows}
        allowed = allowed.to(logits.device)
        masks = {i: allowed[j] for j, i in enumerate(rows) if errors[j] is None}
        failures = {i: errors[j] for j, i in enumerate(rows) if errors[j] is not None}
        return masks, failures  # type: ignore[return-value]

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

    def _sample_row(
        self, logits: torch.Tensor, seq_id: int, p: SamplingParams
    ) -> tuple[int, torch.Tensor]:
        """A token drawn from the row's distribution, and the scores it is the softmax of."""
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
        token = int(torch.multinomial(probs, 1, generator=self._generator(seq_id, p.seed)))
        return token, scores


def token_logprobs(seq_id: int, token: int, scores: torch.Tensor, k: int) -> TokenLogprobs:
    """The sampled token's logprob under ``scores``' softmax and the k most likely ones."""
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
        top = tuple(
            (i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v != float("-inf")
        )
    return (seq_id, token, float(logprobs[token]), top)
