"""BatchScheduler: pure bookkeeping, tested without torch or processes."""

from chatserver.protocol.worker import SamplingParams
from chatserver.workers.kv_cache import KVCacheManager, SlotCopy, SlotSwap
from chatserver.workers.scheduler import BatchScheduler, Sequence

EOS = 2


def seq(seq_id: int, prompt_len: int = 4, max_tokens: int = 8) -> Sequence:
    return Sequence(
        seq_id, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens, stop_token_ids=(EOS,))
    )


def run_step(s: BatchScheduler, token: int = 7):
    plan = s.schedule()
    sampled = [token for it in plan.items if it.wants_logits]
    return plan, s.complete(plan, sampled)


def test_admits_up_to_max_batch_and_decodes_one_token_each():
    s = BatchScheduler(max_batch=2, prefill_chunk=100, max_context=100)
    for i in range(3):
        s.add(seq(i))
    plan, (produced, finished) = run_step(s)
    assert [it.seq_id for it in plan.items] == [0, 1]
    assert [it.slot for it in plan.items] == [0, 1]
    assert produced == [(0, 7), (1, 7)] and finished == []
    plan, _ = run_step(s)
    assert [(it.seq_id, it.token_ids, it.start) for it in plan.items] == [(0, [7], 4), (1, [7], 4)]
    assert len(s.waiting) == 1


def test_prefill_budget_splits_long_prompt_without_stalling_decoders():
    s = BatchScheduler(max_batch=4, prefill_chunk=5, max_context=100)
    s.add(seq(0, prompt_len=3))
    run_step(s)  # seq 0 prefilled, first token out
    s.add(seq(1, prompt_len=12))
    plan, (produced, _) = run_step(s)
    # seq 0 decodes, seq 1 gets the whole remaining budget of 5 prompt tokens
    assert [(it.seq_id, len(it.token_ids), it.wants_logits) for it in plan.items] == [
        (0, 1, True),
        (1, 5, False),
    ]
    assert produced == [(0, 7)]
    plan, _ = run_step(s)
    assert [(it.seq_id, it.start, len(it.token_ids)) for it in plan.items] == [(0, 4, 1), (1, 5, 5)]
    plan, (produced, _) = run_step(s)
    assert [(it.seq_id, it.start, len(it.token_ids), it.wants_logits) for it in plan.items][1] == (
        1,
        10,
        2,
        True,
    )
    assert (1, 7) in produced


def test_finish_reasons_stop_token_and_length():
    s = BatchScheduler(max_batch=4, prefill_chunk=100, max_context=100)
    s.add(seq(0, max_tokens=2))
    s.add(seq(1, max_tokens=5))
    _, (_, finished) = run_step(s, token=EOS)
    assert finished == [(0, "stop"), (1, "stop")]
    assert not s.has_work
    s.add(seq(2, max_tokens=2))
    run_step(s)
    _, (_, finished) = run_step(s)
    assert finished == [(2, "length")]


def test_context_limit_finishes_with_length():
    s = BatchScheduler(max_batch=1, prefill_chunk=100, max_context=6)
    s.add(seq(0, prompt_len=4, max_tokens=100))
    reasons = []
    while s.has_work:
        reasons += run_step(s)[1][1]
    assert reasons == [(0, "length")]


def test_removal_compacts_slots_with_a_swap_that_keeps_the_leaver_cached():
    s = BatchScheduler(max_batch=4, prefill_chunk=100, max_context=100)
    seqs = [seq(i) for i in range(3)]
    for q in seqs:
        s.add(q)
    run_step(s)
    s.remove(seqs[0])  # e.g. cancelled
    # 4 prompt positions each (the new token is not cached yet): seq 2 takes slot 0,
    # seq 0's tokens stay cached in slot 2.
    assert s.take_ops() == [SlotSwap(a=0, b=2, length=4)]
    assert [q.seq_id for q in s.running] == [2, 1]
    assert [q.slot for q in s.running] == [0, 1]
    plan, _ = run_step(s)
    assert {(it.seq_id, it.slot) for it in plan.items} == {(2, 0), (1, 1)}


def test_cancel_waiting_sequence():
    s = BatchScheduler(max_batch=1, prefill_chunk=100, max_context=100)
    s.add(seq(0))
    s.add(seq(1))
    run_step(s)
    waiting = s.find(1)
    assert waiting is not None and waiting.slot == -1
    s.remove(waiting)
    assert s.find(1) is None and s.load == 1 and s.take_ops() == []


def test_finish_mid_step_moves_a_later_sequence_with_its_new_length():
    s = BatchScheduler(max_batch=4, prefill_chunk=100, max_context=100)
    a, b = seq(0, max_tokens=1), seq(1, max_tokens=10)
    s.add(a)
    s.add(b)
    run_step(s)  # a finishes on its first token; b (slot 1) moves to slot 0
    assert s.take_ops() == [SlotSwap(a=0, b=1, length=4)]
    assert b.slot == 0


def test_a_prompt_starts_after_its_cached_prefix():
    s = BatchScheduler(
        max_batch=4, prefill_chunk=100, max_context=100, kv_cache=KVCacheManager(4, 100, 4)
    )
    first = Sequence(0, list(range(10, 22)), SamplingParams(max_tokens=1))
    s.add(first)
    run_step(s)  # 12 prompt tokens cached, then it finishes
    again = Sequence(1, list(range(10, 22)) + [5, 6], SamplingParams(max_tokens=1))
    s.add(again)
    plan = s.schedule()
    assert plan.admitted == [again] and again.cached == 12
    assert [(it.token_ids, it.start) for it in plan.items] == [([5, 6], 12)]
    shared = Sequence(2, list(range(10, 18)) + [9, 9, 9], SamplingParams(max_tokens=1))
    s.add(shared)
    plan = s.schedule()  # the running sequence's first 8 tokens are copied
    assert s.take_ops() == [SlotCopy(src=0, dst=1, length=8)] and shared.cached == 8


def test_unsampleable_row_fails_its_sequence_alone():
    """A None token (non-finite logits, a sampling error) ends that sequence with "error";
    the others in the step keep their tokens and their slots."""
    s = BatchScheduler(max_batch=4, prefill_chunk=100, max_context=100)
    for i in range(3):
        s.add(seq(i, max_tokens=8))
    plan = s.schedule()
    produced, finished = s.complete(plan, [7, None, 7])
    assert finished == [(1, "error")]
    assert produced == [(0, 7), (2, 7)]
    assert sorted(q.seq_id for q in s.running) == [0, 2]
    _, (produced, _) = run_step(s)
    assert sorted(seq_id for seq_id, _ in produced) == [0, 2]


def test_plan_names_sequences_scheduled_for_the_first_time_and_cache_use():
    """What the worker reports for request_queue_time_seconds and kv_cache_usage_ratio."""
    s = BatchScheduler(max_batch=2, prefill_chunk=6, max_context=100)
    for i in range(3):
        s.add(seq(i, prompt_len=4))
    plan, _ = run_step(s)  # seq 0 whole, seq 1 its first 2 prompt tokens
    assert [q.seq_id for q in plan.admitted] == [0, 1]
    assert s.cached_tokens == 4 + 2
    plan, _ = run_step(s)  # seq 0 decodes, seq 1 finishes its prompt; seq 2 waits (max_batch)
    assert plan.admitted == []
    assert s.cached_tokens == 5 + 4
    s.remove(s.running[0])
    plan, _ = run_step(s)
    assert [q.seq_id for q in plan.admitted] == [2]
    assert s.cached_tokens == 5 + 4


def test_identical_prompts_sent_together_are_prefilled_once():
    """The n choices of one request: the first computes the prompt, the rest copy it."""
    s = BatchScheduler(max_batch=4, prefill_chunk=256, max_context=400)
    prompt = list(range(100, 300))
    for i in range(3):
        s.add(Sequence(i, list(prompt), SamplingParams(max_tokens=4)))
    s.add(Sequence(9, list(range(500, 520)), SamplingParams(max_tokens=4)))
    plan, _ = run_step(s)
    # The siblings wait; an unrelated prompt behind them is admitted meanwhile.
    assert [it.seq_id for it in plan.items] == [0, 9]
    plan, _ = run_step(s)
    # Slot 0's rows reach both siblings (the second copies them from the first).
    assert [(op.dst, op.length) for op in s.take_ops()] == [(2, 192), (3, 192)]
    assert [(it.seq_id, it.start, len(it.token_ids)) for it in plan.items[2:]] == [
        (1, 192, 8),
        (2, 192, 8),
    ]
