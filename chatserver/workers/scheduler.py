"""The continuous-batching scheduler: which tokens of which sequences run next step.

Pure bookkeeping, no torch and no I/O, so it is tested without processes.

Every step takes one token from each decoding sequence plus up to
`prefill_chunk` prompt tokens (continuing a partly prefilled prompt first,
then admitting waiting sequences while fewer than `max_batch` run). A long
prompt is thus prefilled over several steps while the running streams keep
decoding: nobody's stream stalls behind a newcomer. Finished or cancelled
sequences leave at once.

Which cache slot a sequence runs in, and how much of its prompt is already
cached, is the KV cache manager's decision (workers/kv_cache.py): a sequence
is admitted only while the manager has a free slot (the memory budget), starts
its prefill after the prefix it reuses, and leaves its tokens cached when it
ends. The slot copies and swaps this implies are handed to the runner
(`take_ops`) before the step that needs them.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from chatserver.protocol.worker import SamplingParams
from chatserver.workers.kv_cache import KVCacheManager, SlotOp
from chatserver.workers.runner import StepItem

# A waiting prompt sharing at least this many tokens with one still being
# prefilled waits for those rows rather than computing them too (four cache
# blocks: below that, computing is cheaper than the step it would wait).
SHARED_PREFIX_MIN = 64


@dataclass(slots=True)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    slot: int = -1
    computed: int = 0  # tokens whose keys/values are in the cache
    cached: int = 0  # of which found in the prefix cache at admission
    output_ids: list[int] = field(default_factory=list)

    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt_ids)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(slots=True)
class StepPlan:
    items: list[StepItem]
    sequences: list[Sequence]  # parallel to items
    active_slots: int
    admitted: list[Sequence] = field(default_factory=list)  # scheduled for the first time

    @property
    def empty(self) -> bool:
        return not self.items


class BatchScheduler:
    def __init__(
        self,
        max_batch: int,
        prefill_chunk: int,
        max_context: int,
        kv_cache: KVCacheManager | None = None,
    ) -> None:
        self.max_batch = max(1, max_batch)
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_context = max_context
        self.kv = kv_cache or KVCacheManager(self.max_batch, max_context)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == slot

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

    def remove(self, seq: Sequence, retain: bool = True) -> None:
        """Take a sequence out (finished or cancelled); its cached tokens stay reusable.

        ``retain`` False (a sequence whose values may not be finite): its slot
        is cleared instead.
        """
        if seq.slot < 0:
            self.waiting.remove(seq)
            return
        self.kv.computed(seq.slot, seq.computed)
        last = self.running[-1]
        if last is not seq:
            self.kv.computed(last.slot, last.computed)
        self.kv.release(seq.slot, seq.tokens()[: seq.computed], retain)
        self.running.pop()
        if last is not seq:
            self.running[seq.slot] = last
            last.slot = seq.slot
        seq.slot = -1

    def take_ops(self) -> list[SlotOp]:
        """Cache copies and swaps the runner applies, in order, before the next forward."""
        return self.kv.take_ops()

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
        deferred: list[Sequence] = []
        while (
            budget > 0 and self.waiting and len(self.running) < self.max_batch and self.kv.can_admit
        ):
            seq = self.waiting.popleft()
            if self._prefix_in_flight(seq):
                deferred.append(seq)
                continue
            reuse = self.kv.admit(seq.seq_id, seq.prompt_ids)
            seq.slot, seq.computed = reuse.slot, reuse.cached_tokens
            seq.cached = reuse.cached_tokens
            self.running.append(seq)
            admitted.append(seq)
            budget -= self._prefill_item(seq, budget, items, seqs)
        self.waiting.extendleft(reversed(deferred))
        return StepPlan(items, seqs, len(self.running), admitted)

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Whether a running sequence is still prefilling a long prefix of seq's prompt.

        Then seq waits (a step or a few; others behind it are admitted) and
        copies those rows once computed, rather than computing them again: the
        `n` choices of one request, or identical prompts sent at once, are
        prefilled once.
        """
        if not self.kv.prefix_cache:
            return False
        prompt = seq.prompt_ids
        for other in self.running:
            if (
                not other.prefilling
                or other.prompt_ids[:SHARED_PREFIX_MIN] != prompt[:SHARED_PREFIX_MIN]
            ):
                continue
            shared = len(os.path.commonprefix([other.prompt_ids, prompt]))
            if other.computed < min(shared, len(prompt) - 1) - SHARED_PREFIX_MIN:
                return True
        return False

    def _prefill_item(
        self, seq: Sequence, budget: int, items: list[StepItem], seqs: list[Sequence]
    ) -> int:
        chunk = seq.prompt_ids[seq.computed : seq.computed + budget]
        done = seq.computed + len(chunk) == len(seq.prompt_ids)
        items.append(StepItem(seq.seq_id, seq.slot, chunk, seq.computed, done))
        seqs.append(seq)
        return len(chunk)

    def complete(
        self, plan: StepPlan, sampled: list[int | None], completed: Collection[int] = ()
    ) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
        """Record a step's sampled tokens (one per item with wants_logits, in order).

        Returns the (seq_id, token) pairs produced and the (seq_id, reason) of
        sequences that finished; finished ones are removed. A None token (its
        row could not be sampled) finishes that sequence alone with "error";
        ``completed``: sequences whose grammar can take no further token, which
        finish with "stop" after this token.
        """
        produced: list[tuple[int, int]] = []
        finished: list[tuple[int, str]] = []
        # All cache lengths first: a removal below may move a later item's sequence.
        bs = self.kv.block_size
        for item, seq in zip(plan.items, plan.sequences, strict=True):
            seq.computed = item.start + len(item.token_ids)
            if seq.computed // bs > self.kv.indexed_blocks(seq.slot):
                self.kv.computed(seq.slot, seq.computed, seq.tokens())
        tokens = iter(sampled)
        for item, seq in zip(plan.items, plan.sequences, strict=True):
            if not item.wants_logits:
                continue
            token = next(tokens)
            if token is None:
                finished.append((seq.seq_id, "error"))
                self.remove(seq, retain=False)
                continue
            seq.output_ids.append(token)
            produced.append((seq.seq_id, token))
            reason = "stop" if seq.seq_id in completed else self._finish_reason(seq, token)
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
