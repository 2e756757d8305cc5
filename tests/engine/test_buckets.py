"""Batch buckets, and the promise behind them: no batch size recompiles once the engine is warm."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tiny_engine import tiny_engine

from compiled_serve.engine.buckets import (
    default_decode_buckets,
    normalize_buckets,
    parse_buckets,
    pick_bucket,
    resolve_decode_buckets,
)
from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams


def test_default_decode_buckets() -> None:
    assert default_decode_buckets(1) == (2,)  # a lone decode is padded: no one-token graph
    assert default_decode_buckets(3) == (2, 3)
    assert default_decode_buckets(8) == (2, 4, 8)
    assert default_decode_buckets(32) == (2, 4, 8, 16, 24, 32)
    assert default_decode_buckets(30) == (2, 4, 8, 16, 24, 30)
    assert default_decode_buckets(128)[-3:] == (112, 120, 128)


def test_pick_bucket_is_the_smallest_that_fits() -> None:
    buckets = (1, 2, 4, 8, 16)
    assert [pick_bucket(buckets, n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert pick_bucket(buckets, 17) is None


def test_parse_and_normalize() -> None:
    assert parse_buckets("8,1 4,2") == (2, 4, 8)  # 1 is raised to the minimum step of 2
    assert normalize_buckets([4, 64, 1, 4], max_num_seqs=16) == (2, 4)
    assert resolve_decode_buckets(None, 16) == (2, 4, 8, 16)
    assert resolve_decode_buckets((1,), 1) == (2,)
    assert resolve_decode_buckets((2, 4), 16) == (2, 4)
    with pytest.raises(InvalidParameterError):
        parse_buckets("1,two")
    with pytest.raises(InvalidParameterError):
        normalize_buckets([0, 2])
    with pytest.raises(InvalidParameterError):
        normalize_buckets([64], max_num_seqs=16)


def test_no_recompile_across_batch_sizes(tmp_path: Path) -> None:
    """Warm-up compiles one graph, valid for one token and many; nothing after it compiles again."""
    engine = tiny_engine(tmp_path, max_num_batched_tokens=256)
    warm = engine.compile_report.num_graphs
    assert warm == 1
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for batch in (1, 2, 3, 5, 7, 11, 16, 23, 32):
        for i in range(batch):
            engine.add_request(f"{batch}-{i}", [rng.randrange(256) for _ in range(rng.randrange(1, 40))], params)
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.compile_report.num_graphs == warm
