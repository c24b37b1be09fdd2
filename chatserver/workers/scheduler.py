"""The continuous-batching scheduler: which tokens of which sequences run next step.

Pure bookkeeping, no torch and no I/O, so it is tested without processes.

Every step takes one token from each decoding sequence plus up to
`prefill_chunk` prompt tokens (continuing a partly prefilled prompt first,
then admitting waiting sequences while fewer than `max_batch` run). A long
prompt is thus prefilled over several steps while the running streams keep
decoding: nobody's stream stalls behind a newcomer. Finished or cancelled
sequences leave at once.

Live sequences hold cache slots 0..n-1. When one leaves, the sequence in the
last slot moves into its place (`SlotMove`), so the runner's batched decode
reads one contiguous view of the cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from chatserver.protocol.worker import SamplingParams
from chatserver.workers.runner import StepItem


@dataclass(slots=True)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    slot: int = -1
    computed: int = 0  # tokens whose keys/values are in the cache
    output_ids: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt_ids)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True, slots=True)
class SlotMove:
    src: int
    dst: int
    length: int


@dataclass(slots=True)
class StepPlan:
    items: list[StepItem]
    sequences: list[Sequence]  # parallel to items
    active_slots: int
    admitted: list[int] = field(default_factory=list)  # seq_ids scheduled for the first time

    @property
    def empty(self) -> bool:
        return not self.items


class BatchScheduler:
    def __init__(self, max_batch: int, prefill_chunk: int, max_context: int) -> None:
        self.max_batch = max(1, max_batch)
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_context = max_context
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == slot
        self.pending_moves: list[SlotMove] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def cached_tokens(self) -> int:
        """Token positions whose keys/values the running sequences keep in the cache."""
        return sum(seq.computed for seq in self.running)

    def find(self, seq_id: int) -> Sequence | None:
        for seq in self.running:
            if seq.seq_id == seq_id:
                return seq
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                return seq
        return None

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled), compacting slots."""
        if seq.slot < 0:
            self.waiting.remove(seq)
            return
        last = self.running.pop()
        if last is not seq:
            self.running[seq.slot] = last
            self.pending_moves.append(SlotMove(last.slot, seq.slot, last.computed))
            last.slot = seq.slot
        seq.slot = -1

    def take_moves(self) -> list[SlotMove]:
        moves, self.pending_moves = self.pending_moves, []
        return moves

    def schedule(self) -> StepPlan:
        items: list[StepItem] = []
        seqs: list[Sequence] = []
        admitted: list[int] = []
        budget = self.prefill_chunk
        for seq in self.running:
            if not seq.prefilling:
                items.append(
                    StepItem(seq.seq_id, seq.slot, [seq.output_ids[-1]], seq.length - 1, True)
                )
                seqs.append(seq)
        for seq in self.running:
            if seq.prefilling and budget > 0:
                budget -= self._prefill_item(seq, budget, items, seqs)
        while budget > 0 and self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            seq.slot = len(self.running)
            self.running.append(seq)
            admitted.append(seq.seq_id)
            budget -= self._prefill_item(seq, budget, items, seqs)
        return StepPlan(items, seqs, len(self.running), admitted)

    def _prefill_item(
        self, seq: Sequence, budget: int, items: list[StepItem], seqs: list[Sequence]
    ) -> int:
        chunk = seq.prompt_ids[seq.computed : seq.computed + budget]
        done = seq.computed + len(chunk) == len(seq.prompt_ids)
        items.append(StepItem(seq.seq_id, seq.slot, chunk, seq.computed, done))
        seqs.append(seq)
        return len(chunk)

    def complete(
        self, plan: StepPlan, sampled: list[int | None]
    ) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
        """Record a step's sampled tokens (one per item with wants_logits, in order).

        Returns the (seq_id, token) pairs produced and the (seq_id, reason) of
        sequences that finished; finished ones are removed. A None token (its
        row could not be sampled) finishes that sequence alone with "error".
        """
        produced: list[tuple[int, int]] = []
        finished: list[tuple[int, str]] = []
        # All cache lengths first: a removal below may move a later item's sequence.
        for item, seq in zip(plan.items, plan.sequences, strict=True):
            seq.computed = item.start + len(item.token_ids)
        tokens = iter(sampled)
        for item, seq in zip(plan.items, plan.sequences, strict=True):
            if not item.wants_logits:
                continue
            token = next(tokens)
            if token is None:
                finished.append((seq.seq_id, "error"))
                self.remove(seq)
                continue
            seq.output_ids.append(token)
            produced.append((seq.seq_id, token))
            reason = self._finish_reason(seq, token)
            if reason:
                finished.append((seq.seq_id, reason))
                self.remove(seq)
        return produced, finished

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.params.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens or seq.length >= self.max_context:
            return "length"
        return None
