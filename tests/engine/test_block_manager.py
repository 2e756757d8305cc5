"""Block pool and prefix-cache accounting, against hand-computed expectations."""

from __future__ import annotations

import random

from compiled_serve.engine.block_manager import BlockManager
from compiled_serve.engine.sequence import Sequence
from compiled_serve.sampling_params import SamplingParams


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, 0, tokens, SamplingParams(max_tokens=8), 8)


def test_allocate_grow_free_returns_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_ids) == 3  # ceil(10 / 4)
    seq.num_computed_tokens = 10
    for t in range(6):  # decode 6 tokens: 16 total -> 4 blocks
        seq.append_token(100 + t)
        assert bm.allocate_slots(seq, 1)
        seq.num_computed_tokens += 1
    assert len(seq.block_ids) == 4
    bm.free(seq)
    assert bm.num_free_blocks == 10


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not bm.allocate_slots(seq, 12)
    assert seq.block_ids == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(13)), "a")
    assert bm.allocate_slots(a, 13)
    a.num_computed_tokens = 13
    # b shares the first 3 full blocks (12 tokens) and differs after.
    b = make_seq(list(range(12)) + [99, 98], "b")
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_ids[:3]
    # An identical prompt of exactly 12 tokens may reuse only 2 blocks: 1 token must be computed.
    c = make_seq(list(range(12)), "c")
    assert bm.find_cached_prefix(c) == a.block_ids[:2]
    assert bm.allocate_slots(b, 2, hits)
    assert b.block_ids[:3] == a.block_ids[:3]
    assert [bm.pool.ref_counts[i] for i in a.block_ids[:3]] == [2, 2, 2]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_freed_blocks_stay_cached_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(9)), "a")
    assert bm.allocate_slots(a, 9)
    bm.free(a)
    b = make_seq(list(range(8)) + [7, 7], "b")
    assert len(bm.find_cached_prefix(b)) == 2  # revived from the free list
    # Filling the pool with unrelated blocks evicts them.
    c = make_seq([50] * 16, "c")
    assert bm.allocate_slots(c, 16)
    assert bm.find_cached_prefix(b) == []
    bm.free(c)
    assert bm.num_free_blocks == 4


def test_random_mix_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: list[Sequence] = []
    for step in range(400):
        if live and rng.random() < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
            continue
        prefix = [1, 2, 3, 4, 5, 6, 7, 8] if rng.random() < 0.5 else []
        seq = make_seq(prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 20))], f"s{step}")
        hits = bm.find_cached_prefix(seq)
        if bm.allocate_slots(seq, seq.num_tokens - len(hits) * 4, hits):
            seq.num_computed_tokens = seq.num_tokens
            live.append(seq)
        used = sum(len(s.block_ids) for s in live)
        assert bm.num_free_blocks >= 64 - used
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == 64
    assert all(r == 0 for r in bm.pool.ref_counts)
