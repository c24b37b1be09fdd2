"""The KV cache manager's bookkeeping (workers/kv_cache.py), without torch.

A small simulated cache stands in for the runner's tensors: each slot is a
list of the tokens whose keys/values it holds, and the manager's ops are
applied to it exactly as the runner applies them. Every test checks that
the manager's records match that simulated content, so a wrong copy, swap or
length would show.
"""

from __future__ import annotations

import random

import pytest

from chatserver.workers.kv_cache import (
    KVCacheManager,
    SlotClear,
    SlotCopy,
    SlotSwap,
    block_hashes,
)

BS = 4


class SimulatedCache:
    """What the runner's tensors would hold: per slot, the token at each position."""

    def __init__(self, slots: int, capacity: int) -> None:
        self.rows = [[None] * capacity for _ in range(slots)]

    def apply(self, ops) -> None:
        for op in ops:
            if isinstance(op, SlotCopy):
                self.rows[op.dst][: op.length] = self.rows[op.src][: op.length]
            elif isinstance(op, SlotSwap):
                a, b = self.rows[op.a][: op.length], self.rows[op.b][: op.length]
                self.rows[op.a][: op.length], self.rows[op.b][: op.length] = b, a
            elif isinstance(op, SlotClear):
                self.rows[op.slot][: op.length] = [None] * op.length

    def compute(self, slot: int, start: int, tokens: list[int]) -> None:
        self.rows[slot][start : start + len(tokens)] = tokens


def check(kv: KVCacheManager, cache: SimulatedCache) -> None:
    """Every slot's record says what the simulated cache holds."""
    for index, slot in enumerate(kv.slots):
        assert cache.rows[index][: slot.length] == slot.tokens[: slot.length], index


def run(kv, cache, seq_id, prompt, reply):
    """Admit, prefill after the reused prefix, decode `reply`; return (slot, cached)."""
    cache.apply(kv.take_ops())
    reuse = kv.admit(seq_id, prompt)
    cache.apply(kv.take_ops())
    assert cache.rows[reuse.slot][: reuse.cached_tokens] == prompt[: reuse.cached_tokens]
    cache.compute(reuse.slot, reuse.cached_tokens, prompt[reuse.cached_tokens :])
    tokens = list(prompt)
    kv.computed(reuse.slot, len(tokens), tokens)
    for token in reply[:-1]:  # the last sampled token is never fed back
        cache.compute(reuse.slot, len(tokens), [token])
        tokens.append(token)
        kv.computed(reuse.slot, len(tokens), list(tokens))
    return reuse


def test_hash_chain_covers_full_blocks_and_depends_on_the_prefix():
    assert len(block_hashes(list(range(10)), 4)) == 2
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[1] != b[1]  # the same second block after another first block
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == a


def test_next_turn_reuses_the_retained_conversation_in_place():
    kv, cache = KVCacheManager(4, 64, BS), SimulatedCache(4, 64)
    prompt = list(range(100, 110))
    reuse = run(kv, cache, 1, prompt, [7, 8, 9])
    assert reuse.cached_tokens == 0
    kv.release(reuse.slot, prompt + [7, 8])
    cache.apply(kv.take_ops())
    # Turn 2 re-sends turn 1 and its reply, then a new message.
    turn2 = prompt + [7, 8, 9] + list(range(200, 206))
    reuse2 = run(kv, cache, 2, turn2, [1])
    assert reuse2.slot == 0 and reuse2.cached_tokens == 12  # 3 whole blocks of the 12 held
    assert kv.take_ops() == []  # in place: nothing copied
    assert kv.stats.queries == len(prompt) + len(turn2) and kv.stats.hits == 12
    check(kv, cache)


def test_the_last_prompt_token_is_always_computed():
    kv, cache = KVCacheManager(2, 64, BS), SimulatedCache(2, 64)
    prompt = list(range(8))
    reuse = run(kv, cache, 1, prompt, [5])
    kv.release(reuse.slot, prompt)
    again = kv.admit(2, prompt)  # the same prompt: its logits must be computed again
    assert again.cached_tokens == 4


def test_running_sequences_stay_in_slots_zero_to_n_and_contents_survive_releases():
    rng = random.Random(7)
    kv, cache = KVCacheManager(6, 256, BS), SimulatedCache(6, 256)
    system = [1, 2, 3, 4, 5, 6, 7, 8]
    live: dict[int, list[int]] = {}
    slots: dict[int, int] = {}
    for seq_id in range(1, 60):
        if kv.can_admit and (not live or rng.random() < 0.6):
            prompt = system + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            reuse = run(kv, cache, seq_id, prompt, [])
            live[seq_id] = prompt
            slots[seq_id] = reuse.slot
            if seq_id > 1:
                assert reuse.cached_tokens >= 8  # the shared system prompt
        else:
            leaving = rng.choice(sorted(live))
            slot = slots.pop(leaving)
            moved_from = kv.release(slot, live.pop(leaving), retain=rng.random() > 0.1)
            for other, s in slots.items():
                if s == moved_from:
                    slots[other] = slot
            cache.apply(kv.take_ops())
        assert sorted(slots.values()) == list(range(kv.running))
        for seq, prompt in live.items():
            assert cache.rows[slots[seq]][: len(prompt)] == prompt
        check(kv, cache)
    assert len(kv.slots) <= kv.num_slots


def test_least_recently_used_prefix_is_evicted_when_the_budget_is_full():
    kv, cache = KVCacheManager(3, 64, BS), SimulatedCache(3, 64)
    convs = {n: [n] * 8 for n in (1, 2, 3, 4)}
    for n in (1, 2, 3):
        reuse = run(kv, cache, n, convs[n], [])
        kv.release(reuse.slot, convs[n])
        cache.apply(kv.take_ops())
    # Three slots hold three conversations; a fourth evicts the oldest (1).
    reuse = run(kv, cache, 4, convs[4], [])
    kv.release(reuse.slot, convs[4])
    cache.apply(kv.take_ops())
    held = {tuple(s.tokens) for s in kv.slots}
    assert tuple(convs[1]) not in held and tuple(convs[2]) in held
    assert run(kv, cache, 5, convs[2] + [9], []).cached_tokens == 8
    assert run(kv, cache, 6, convs[1] + [9], []).cached_tokens == 0
    check(kv, cache)


def test_an_error_slot_is_cleared_and_never_matched():
    kv, cache = KVCacheManager(2, 64, BS), SimulatedCache(2, 64)
    prompt = list(range(12))
    reuse = run(kv, cache, 1, prompt, [])
    kv.release(reuse.slot, prompt, retain=False)
    ops = kv.take_ops()
    assert ops == [SlotClear(0, 64)]  # the whole slot, not only its valid rows
    assert kv.admit(2, prompt + [1]).cached_tokens == 0


def test_admission_stops_at_the_slot_budget():
    kv = KVCacheManager(2, 64, BS)
    kv.admit(1, [1, 2])
    kv.admit(2, [3, 4])
    assert not kv.can_admit
    with pytest.raises(RuntimeError):
        kv.admit(3, [5, 6])


def test_prefix_cache_off_reuses_nothing():
    kv, cache = KVCacheManager(2, 64, BS, prefix_cache=False), SimulatedCache(2, 64)
    prompt = list(range(12))
    reuse = run(kv, cache, 1, prompt, [])
    kv.release(reuse.slot, prompt)
    assert kv.admit(2, prompt + [5]).cached_tokens == 0
