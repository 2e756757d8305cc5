"""Request generation: PERF.md's order (lengths and prompt per request, then the output lengths)."""

from __future__ import annotations

import random

from compiled_serve.bench.workloads import VLLM_H200, WORKLOADS, Workload, draw_requests, modified_workload


def test_draws_follow_perf_md_order() -> None:
    workload = Workload("T", "throughput", "m", 3, (2, 6), (1, 9))
    requests = draw_requests(workload, vocab_size=50)
    rng = random.Random(0)
    first_len = rng.randint(2, 6)
    assert len(requests.prompts[0]) == first_len
    assert requests.prompts[0] == [rng.randint(0, 49) for _ in range(first_len)]
    second_len = rng.randint(2, 6)
    assert len(requests.prompts[1]) == second_len
    assert all(0 <= t < 50 for p in requests.prompts for t in p)
    assert requests == draw_requests(workload, vocab_size=50)  # deterministic


def test_perf_md_token_totals() -> None:
    # PERF.md's floor table: W1 138,985 and W2 68,892 output tokens.
    assert sum(draw_requests(WORKLOADS["W1"], 151936).output_lens) == 138_985
    assert sum(draw_requests(WORKLOADS["W2"], 128256).output_lens) == 68_892
    w3 = draw_requests(WORKLOADS["W3"], 128256)
    assert w3.prompt_lens == [1024] and w3.output_lens == [256]


def test_modified_workload() -> None:
    w1 = WORKLOADS["W1"]
    assert modified_workload(w1) == w1 and not modified_workload(w1).modified
    small = modified_workload(w1, scale=0.01, num_requests=4)
    assert small.prompt_len == (1, 10) and small.output_len == (1, 10) and small.num_requests == 4
    assert small.modified
    capped = modified_workload(WORKLOADS["W3"], max_prompt_len=40, max_output_len=12)
    assert capped.prompt_len == (40, 40) and capped.output_len == (12, 12) and capped.modified
    assert modified_workload(w1, model="qwen3-0.6b") == w1  # the same model is no change


def test_vllm_figures() -> None:
    assert {k: v.value for k, v in VLLM_H200.items()} == {"W1": 13_750.0, "W2": 7_402.0, "W3": 201.2}
    assert all(v.source == "PERF.md, vLLM 0.21.0, H200, 2026-12-02" for v in VLLM_H200.values())
