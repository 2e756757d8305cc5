"""Scheduler behaviour: token budget, chunked prefill, FCFS, max_num_seqs, preemption, abort."""

from __future__ import annotations

from compiled_serve.engine.block_manager import BlockManager
from compiled_serve.engine.scheduler import Scheduler
from compiled_serve.engine.sequence import Sequence, SequenceStatus
from compiled_serve.sampling_params import SamplingParams


def make(rid: str, n: int) -> Sequence:
    base = 1000 * (ord(rid[0]) - ord("a") + 1)  # distinct prompts: no prefix-cache sharing
    return Sequence(rid, 0, list(range(base, base + n)), SamplingParams(max_tokens=100), 100)


def run_step(sched: Scheduler) -> dict[str, int]:
    """Schedules one step and plays the model: computed tokens advance, completing rows sample."""
    out = sched.schedule()
    got = {}
    for s in out.scheduled:
        got[s.seq.request_id] = s.num_new_tokens
        done = s.completes_prompt
        s.seq.num_computed_tokens += s.num_new_tokens
        if done:
            s.seq.append_token(7)
    return got


def test_long_prompt_is_chunked_and_mixed_with_decodes():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a = make("a", 3)
    sched.add(a)
    assert run_step(sched) == {"a": 3}
    sched.add(make("b", 25))
    # a decodes one token, b takes the rest of the budget: 9, then 9, then 7.
    assert run_step(sched) == {"a": 1, "b": 9}
    assert run_step(sched) == {"a": 1, "b": 9}
    assert run_step(sched) == {"a": 1, "b": 7}
    assert run_step(sched) == {"a": 1, "b": 1}


def test_fcfs_and_max_num_seqs():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for rid in "abc":
        sched.add(make(rid, 2))
    assert list(run_step(sched)) == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_preemption_recomputes_and_frees():
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = make("a", 8), make("b", 8)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 + 2 blocks (+1 token each)
    assert bm.num_free_blocks == 2
    for _ in range(8):
        run_step(sched)
    # The pool (24 tokens) cannot hold both at 13+ tokens: b (admitted last) was preempted.
    assert sched.num_preemptions >= 1
    assert b.status in (SequenceStatus.WAITING, SequenceStatus.RUNNING)
    assert a.status is SequenceStatus.RUNNING
    sched.finish(a, SequenceStatus.FINISHED_STOPPED)
    sched.finish(b, SequenceStatus.FINISHED_ABORTED)
    assert bm.num_free_blocks == 6


def test_abort_waiting_and_running():
    bm = BlockManager(10, 4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    a, b = make("a", 5), make("b", 5)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    sched.finish(b, SequenceStatus.FINISHED_ABORTED)  # waiting
    sched.finish(a, SequenceStatus.FINISHED_ABORTED)  # running
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == 10


def test_prompt_chunk_stops_at_a_graph_bucket_instead_of_just_overshooting_it():
    """A 64-token prompt beside one decode would make a 65-token step, padded to the 128-token
    graph; the chunk stops at 63 tokens (a 64-token step), and its last token goes with the next
    step's decode, where the prompt's first sampled token comes from."""
    buckets = (16, 32, 64, 128)
    sched = Scheduler(BlockManager(200, 4), max_num_seqs=8, max_num_batched_tokens=256, graph_token_buckets=buckets)
    sched.add(make("a", 3))
    assert run_step(sched) == {"a": 3}
    sched.add(make("b", 64))
    sched.add(make("c", 5))
    # b is trimmed to the bucket; c is not admitted into this step (it would overshoot again).
    assert run_step(sched) == {"a": 1, "b": 63}
    assert not sched.waiting[0].output_token_ids and sched.waiting[0].request_id == "c"
    assert run_step(sched) == {"a": 1, "b": 1, "c": 5}
    assert sched.running[1].output_token_ids == [7]  # b sampled on its completing chunk

    # A large overshoot (> 1/8 of the bucket below) pads instead; so does a step above the
    # largest bucket (no graph there), and a scheduler without buckets never trims.
    for graph_buckets, prompt, expected in [(buckets, 80, 80), ((16, 32, 64), 70, 70), ((), 64, 64)]:
        sched = Scheduler(BlockManager(200, 4), max_num_seqs=8, max_num_batched_tokens=256,
                          graph_token_buckets=graph_buckets)
        sched.add(make("a", 3))
        run_step(sched)
        sched.add(make("b", prompt))
        assert run_step(sched) == {"a": 1, "b": expected}
