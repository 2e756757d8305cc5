"""W4's measurement helpers, and (heavy) a tiny end-to-end run against a real `compiled-serve serve`."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from compiled_serve.bench.defaults import ARRIVAL_SEED
from compiled_serve.bench.serve import arrival_offsets, percentile


def test_nearest_rank_percentile() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([5.0], 99) == 5.0


def test_poisson_arrivals() -> None:
    rng = random.Random(ARRIVAL_SEED)
    gaps = [rng.expovariate(4.0) for _ in range(4)]
    assert arrival_offsets(5, 4.0) == pytest.approx([0.0, *[sum(gaps[:i + 1]) for i in range(4)]])
    many = arrival_offsets(20_000, 8.0)
    assert statistics.mean(b - a for a, b in zip(many, many[1:])) == pytest.approx(1 / 8.0, rel=0.03)


@pytest.mark.heavy
def test_serve_end_to_end(tmp_path: Path, bench_runner) -> None:
    record = bench_runner(tmp_path, "serve", "--num-requests", "4", "--max-prompt-len", "16", "--max-output-len", "6",
                       "--rates", "200", "50")
    assert record["headline"] is None and record["result"]["startup_s"] > 0
    rows = record["result"]["rates"]
    assert [row["rate_req_s"] for row in rows] == [50.0, 200.0]  # lightest first
    cost, ceilings = record["model_cost"], record["ceilings"]
    for row in rows:
        assert row["num_requests"] == 4 and row["out_tok_s"] == pytest.approx(4 * 6 / row["wall_s"])
        for metric in ("ttft", "tpot", "itl", "e2e"):
            assert 0 < row[f"{metric}_p50_ms"] <= row[f"{metric}_p99_ms"]
        assert row["ttft_p50_ms"] < row["e2e_p50_ms"]
        assert row["prefill_floor_ms"] == pytest.approx(1e3 * 2 * cost["params"] * 16 / (ceilings["matmul_tflop_s"] * 1e12))
