"""The KV cache manager: which slot holds which tokens, what a new prompt can reuse.

Pure bookkeeping, no torch and no I/O, so it is tested without a model. The
runner owns the tensors (`[slots, kv_heads, capacity, head_dim]` per layer);
this module decides what lives where and tells the runner which rows to copy
or swap (`SlotCopy`, `SlotSwap`, `SlotClear`) before the next forward pass.

Why slots and not paged blocks. The obvious design (nano-vllm's, vLLM's) keeps
the cache as a pool of fixed-size blocks with a block table per sequence. On a
CPU without a paged-attention kernel every decode step then has to gather each
sequence's blocks into one tensor per layer before attention.
`python -m load_tests.kv_layout` times one layer's decode attention both ways
with SmolLM2-135M's shapes: on the Intel(R) Xeon(R) Processor (torch
capability AVX512, VNNI avx_vnni), 16 sequences x 1,024 positions took 0.62 ms
over slot views against 1.45 ms with the gather in bf16 (1.02 against 2.47 ms
in float32), x30 layers a step. So running sequences keep a contiguous slot each
(`slots 0..n-1`, read as one view by batched decode), and the block structure
lives in the bookkeeping instead:

* tokens are hashed in blocks of `block_size`, each hash chained to the one
  before it, so equal hashes mean equal prefixes (nano-vllm's hash chain);
* a sequence that leaves keeps its slot's contents (prompt and reply) as a
  *retained* prefix; slots are retained until their space is needed, least
  recently used first;
* a new prompt takes over the slot whose blocks match its longest prefix
  (moved to slot n, the first free one, by a swap that keeps the other slot's
  contents too), or copies the matched rows from a running sequence (a shared
  system prompt), then prefills only what follows.

Invariants: running sequences occupy slots 0..n-1 (batched decode reads one
view); every slot holds a prefix of tokens whose keys and values are valid;
at most `num_slots` slots exist (the memory budget, fixed at start); a slot
that held an error is cleared, never reused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# Prefixes are reused in whole blocks: small enough that little is lost at the
# end of a match (a reply's last tokens), large enough that hashing a 4k-token
# prompt costs a few hundred dict look-ups.
BLOCK_SIZE = 16


def block_hashes(token_ids: list[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """The hash chain of every full block of `token_ids` (the same in every process)."""
    return extend_hashes([], token_ids, len(token_ids), block_size)


def extend_hashes(
    hashes: list[int], token_ids: list[int], length: int, block_size: int = BLOCK_SIZE
) -> list[int]:
    """`hashes` (the chain of `token_ids`' first blocks) continued over its first `length`."""
    chain = list(hashes)
    parent = chain[-1] if chain else 0
    for b in range(len(chain), length // block_size):
        parent = hash((parent, tuple(token_ids[b * block_size : (b + 1) * block_size])))
        chain.append(parent)
    return chain


@dataclass(frozen=True, slots=True)
class SlotCopy:
    """Copy the first `length` positions of slot `src` into slot `dst`."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True, slots=True)
class SlotSwap:
    """Exchange the first `length` positions of slots `a` and `b`."""

    a: int
    b: int
    length: int


@dataclass(frozen=True, slots=True)
class SlotClear:
    """Zero the first `length` positions of `slot` (what a failed sequence left)."""

    slot: int
    length: int


SlotOp = SlotCopy | SlotSwap | SlotClear


@dataclass(slots=True)
class _Slot:
    length: int = 0  # positions 0..length-1 hold valid keys/values
    tokens: list[int] = field(default_factory=list)  # at least the hashed blocks' tokens
    hashes: list[int] = field(default_factory=list)  # chain over the full blocks
    seq_id: int | None = None  # the running sequence; None: retained (or empty)
    last_used: int = 0


@dataclass(slots=True)
class Reuse:
    """Where an admitted sequence runs and how many of its prompt tokens are already cached."""

    slot: int
    cached_tokens: int


@dataclass(slots=True)
class CacheStats:
    """Cumulative prefix-cache figures (token counts) and the slots in use now."""

    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found cached
    slots_running: int = 0
    slots_retained: int = 0
    tokens_retained: int = 0  # positions holding finished sequences' prefixes


class KVCacheManager:
    def __init__(
        self,
        num_slots: int,
        capacity: int,
        block_size: int = BLOCK_SIZE,
        prefix_cache: bool = True,
    ) -> None:
        if num_slots < 1:
            raise ValueError("the KV cache needs at least one slot")
        self.num_slots = num_slots
        self.prefix_cache = prefix_cache
        self.capacity = capacity
        self.block_size = block_size
        self.slots: list[_Slot] = []  # grows to num_slots as slots are first used
        self.running = 0  # slots 0..running-1 hold running sequences
        self.ops: list[SlotOp] = []
        self.stats = CacheStats()
        self._tick = 0
        # block hash -> slots whose tokens contain that block (at its position).
        self._index: dict[int, set[int]] = {}

    # --- queries -------------------------------------------------------------
    @property
    def can_admit(self) -> bool:
        return self.running < self.num_slots

    def take_ops(self) -> list[SlotOp]:
        ops, self.ops = self.ops, []
        return ops

    def snapshot(self) -> CacheStats:
        s = self.stats
        idle = [slot.length for slot in self.slots[self.running :] if slot.length]
        return CacheStats(s.queries, s.hits, self.running, len(idle), sum(idle))

    def longest_match(self, prompt_ids: list[int]) -> tuple[int, int]:
        """(slot, cached tokens) of the slot sharing most whole blocks with the prompt.

        Ties go to slot `running` (no move), then retained slots (a swap keeps
        both), then the most recently used. (-1, 0) when nothing matches.
        """
        if not self.prefix_cache:
            return -1, 0
        candidates: set[int] | None = None
        depth = 0
        for h in block_hashes(prompt_ids, self.block_size):
            holders = self._index.get(h)
            if not holders:
                break
            narrowed = holders if candidates is None else candidates & holders
            if not narrowed:
                break
            candidates, depth = narrowed, depth + 1
        if not candidates:
            return -1, 0

        def preference(slot: int) -> tuple[bool, bool, int]:
            return (slot == self.running, slot >= self.running, self.slots[slot].last_used)

        return max(candidates, key=preference), depth * self.block_size

    # --- admission and release --------------------------------------------
    def admit(self, seq_id: int, prompt_ids: list[int]) -> Reuse:
        """Place a new sequence in slot `running`, reusing the longest cached prefix.

        At least the prompt's last token is left to compute (its logits start
        the reply). Raises RuntimeError when no slot is free (check can_admit).
        """
        if not self.can_admit:
            raise RuntimeError("no free KV cache slot")
        target = self.running
        self._grow(target + 1)
        source, cached = self.longest_match(prompt_ids)
        cached = min(cached, (len(prompt_ids) - 1) // self.block_size * self.block_size)
        if cached <= 0:
            source, cached = -1, 0
        self.stats.queries += len(prompt_ids)
        self.stats.hits += cached
        if source >= self.running and source != target:
            # A retained prefix elsewhere: exchange it with the target's contents.
            self._swap(source, target)
        elif source >= 0 and source != target:
            # A running sequence's prefix (a shared system prompt): copy its rows.
            self._evict_into_place(target)
            self.ops.append(SlotCopy(source, target, cached))
        elif source != target:
            self._evict_into_place(target)
        slot = self.slots[target]
        self._set_tokens(target, prompt_ids[:cached])
        slot.seq_id = seq_id
        slot.last_used = self._touch()
        self.running += 1
        return Reuse(target, cached)

    def computed(self, slot: int, length: int, token_ids: list[int] | None = None) -> None:
        """A running sequence's keys/values now cover `length` positions.

        Pass its tokens (prompt and reply so far, at least `length` of them)
        when a block filled up since the last call, so the block is indexed;
        the positions already indexed are taken to be unchanged.
        """
        s = self.slots[slot]
        s.length = length
        if token_ids is None:
            return
        known = len(s.hashes)
        s.hashes = extend_hashes(s.hashes, token_ids, length, self.block_size)
        for h in s.hashes[known:]:
            self._index.setdefault(h, set()).add(slot)
        s.tokens = token_ids

    def indexed_blocks(self, slot: int) -> int:
        return len(self.slots[slot].hashes)

    def release(self, slot: int, token_ids: Iterable[int], retain: bool = True) -> int:
        """A sequence leaves `slot`; returns the slot its last running neighbour moved from.

        Its valid positions (`token_ids`) stay cached as a retained prefix
        unless `retain` is False (its values may not be finite: the slot is
        cleared). The last running sequence takes the freed slot, so running
        slots stay 0..n-1; the return value is that sequence's old slot (or
        `slot` itself when it was the last).
        """
        if not 0 <= slot < self.running:
            raise ValueError(f"slot {slot} holds no running sequence")
        leaving = self.slots[slot]
        if retain:
            self._set_tokens(slot, list(token_ids))
        else:
            # All of it: a failed step may have written rows past `length`, and
            # batched decode reads (masked) rows past a sequence's end.
            self.ops.append(SlotClear(slot, self.capacity))
            self._set_tokens(slot, [])
        leaving.seq_id = None
        leaving.last_used = self._touch()
        last = self.running - 1
        if slot != last:
            self._swap(slot, last)
        self.running -= 1
        return last

    # --- internals -------------------------------------------------------------
    def _touch(self) -> int:
        self._tick += 1
        return self._tick

    def _grow(self, count: int) -> None:
        while len(self.slots) < count:
            self.slots.append(_Slot())

    def _set_tokens(self, index: int, token_ids: list[int]) -> None:
        slot = self.slots[index]
        old_blocks = len(slot.hashes)
        keep = 0
        full = len(token_ids) // self.block_size
        # Most updates extend the same tokens: rehash only the new blocks.
        while (
            keep < min(old_blocks, full)
            and slot.tokens[keep * self.block_size : (keep + 1) * self.block_size]
            == token_ids[keep * self.block_size : (keep + 1) * self.block_size]
        ):
            keep += 1
        for h in slot.hashes[keep:]:
            self._unindex(h, index)
        slot.hashes = extend_hashes(slot.hashes[:keep], token_ids, len(token_ids), self.block_size)
        for h in slot.hashes[keep:]:
            self._index.setdefault(h, set()).add(index)
        slot.tokens = list(token_ids)
        slot.length = len(token_ids)

    def _unindex(self, h: int, index: int) -> None:
        holders = self._index.get(h)
        if holders is not None:
            holders.discard(index)
            if not holders:
                del self._index[h]

    def _swap(self, a: int, b: int) -> None:
        sa, sb = self.slots[a], self.slots[b]
        for h in sa.hashes:
            self._unindex(h, a)
        for h in sb.hashes:
            self._unindex(h, b)
        self.slots[a], self.slots[b] = sb, sa
        for h in sb.hashes:
            self._index.setdefault(h, set()).add(a)
        for h in sa.hashes:
            self._index.setdefault(h, set()).add(b)
        # Contents follow the records: a holds sb's now, b holds sa's.
        if sa.length and sb.length:
            self.ops.append(SlotSwap(a, b, max(sa.length, sb.length)))
        elif sa.length:
            self.ops.append(SlotCopy(a, b, sa.length))
        elif sb.length:
            self.ops.append(SlotCopy(b, a, sb.length))

    def _evict_into_place(self, target: int) -> None:
        """Free slot `target` for a new sequence, keeping its retained prefix if a worse one can go.

        Its contents move to an empty slot while the budget allows one, else
        over the least recently used retained prefix (or are dropped when
        that is the target's own).
        """
        held = self.slots[target]
        if not held.length:
            return
        retained = range(self.running + 1, len(self.slots))
        empty = next((i for i in retained if not self.slots[i].length), -1)
        if empty < 0 and len(self.slots) < self.num_slots:
            self._grow(len(self.slots) + 1)
            empty = len(self.slots) - 1
        if empty < 0:
            if retained:
                oldest = min(retained, key=lambda i: self.slots[i].last_used)
                if self.slots[oldest].last_used < held.last_used:
                    empty = oldest
                    self._set_tokens(oldest, [])
        if empty >= 0:
            self._swap(target, empty)  # a copy: the empty side holds nothing
        self._set_tokens(target, [])
