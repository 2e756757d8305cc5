"""Greedy output does not depend on how a request is batched, chunked, preempted or cached.

The reference is each request run alone on an engine with prefix caching off and a budget large
enough that nothing is chunked. Every other configuration must give the same tokens.
"""

from __future__ import annotations

import os
import random

import pytest
from real_model import PROMPTS, reconfigure

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.sampling_params import SamplingParams

pytestmark = pytest.mark.heavy
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    device = os.environ.get("COMPILED_SERVE_TEST_DEVICE", "cpu")
    mode = os.environ.get("COMPILED_SERVE_TEST_COMPILE_MODE", "graph")
    # quantization="none": the fp32 path, whose kernels give the same bits at any batch size; the
    # int4 CPU kernel (auto, on the embedded Q4_1 GGUF) makes no such promise.
    return LLMEngine(EngineConfig(compile_mode=mode, max_num_seqs=64, cpu_kv_cache_gib=0.25, device=device,
                                  dtype="float32", num_kv_blocks=2048 if device == "cuda" else None,
                                  quantization="none"))


def drain(engine: LLMEngine) -> dict[str, list[int]]:
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    return outs


def batch_prompts() -> list[str]:
    rng = random.Random(0)
    return [PROMPTS[i % len(PROMPTS)] + " " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"])
                                                      for _ in range(rng.randrange(0, 40))) for i in range(32)]


@pytest.fixture(scope="module")
def alone(engine) -> dict[str, list[int]]:
    reconfigure(engine, enable_prefix_caching=False, max_num_batched_tokens=4096)
    ref = {}
    for i, prompt in enumerate(batch_prompts()):
        engine.add_request(str(i), prompt, GREEDY)
        ref.update(drain(engine))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return ref


def test_batch_of_32_with_chunked_prefill(engine, alone):
    reconfigure(engine, enable_prefix_caching=False, max_num_batched_tokens=48)  # prompts span chunks
    for i, prompt in enumerate(batch_prompts()):
        engine.add_request(str(i), prompt, GREEDY)
    chunked = 0
    schedule = engine.scheduler.schedule

    def recording_schedule():
        nonlocal chunked
        out = schedule()
        chunked += sum(1 for s in out.scheduled if not s.completes_prompt)
        return out

    engine.scheduler.schedule = recording_schedule
    try:
        got = drain(engine)
    finally:
        del engine.scheduler.schedule
    assert got == alone
    assert chunked > 0, "no prompt was chunked"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_forced_preemption_by_a_tiny_pool(engine, alone):
    # 24 blocks x 16 tokens = 384 tokens for 32 requests of ~20-70 tokens: preemption is certain.
    reconfigure(engine, num_blocks=24, enable_prefix_caching=False, max_num_batched_tokens=256)
    before = engine.scheduler.num_preemptions
    for i, prompt in enumerate(batch_prompts()):
        engine.add_request(str(i), prompt, GREEDY)
    got = drain(engine)
    assert engine.scheduler.num_preemptions > before
    assert got == alone
    assert engine.block_manager.num_free_blocks == 24


def test_prefix_cache_hit(engine, alone):
    reconfigure(engine, enable_prefix_caching=True)
    prompts = batch_prompts()
    engine.add_request("warm", prompts[2], GREEDY)
    drain(engine)
    engine.add_request("2", prompts[2], GREEDY)
    hit = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                hit = o
    assert hit.num_cached_tokens > 0
    assert hit.outputs[0].token_ids == alone["2"]


def test_prefix_cache_computes_only_the_suffix(engine):
    reconfigure(engine, enable_prefix_caching=True, max_num_batched_tokens=2048)
    rng = random.Random(1)
    vocab = engine.model_config.vocab_size
    prefix = [rng.randrange(100, vocab) for _ in range(512)]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engine.add_request("a", prefix + [rng.randrange(100, vocab) for _ in range(37)], one)
    drain(engine)
    suffix = [rng.randrange(100, vocab) for _ in range(23)]
    before = engine.get_stats().computed_tokens_total
    engine.add_request("b", prefix + suffix, one)
    drain(engine)
    assert engine.get_stats().computed_tokens_total - before == len(suffix)


def test_accounting_after_finish_abort_and_preempt(engine):
    reconfigure(engine, num_blocks=20, enable_prefix_caching=True, max_num_batched_tokens=128)
    rng = random.Random(2)
    for i in range(24):
        params = SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randrange(1, 30), n=rng.choice([1, 2]))
        engine.add_request(f"r{i}", batch_prompts()[i], params)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps % 3 == 0:
            engine.abort_request(f"r{rng.randrange(24)}")
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == 20
    assert all(r == 0 for r in engine.block_manager.pool.ref_counts)


def test_seeded_sample_same_alone_and_in_batch(engine):
    reconfigure(engine)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    engine.add_request("s", PROMPTS[2], seeded)
    solo = drain(engine)["s"]
    for i in range(6):
        engine.add_request(f"o{i}", PROMPTS[i], SamplingParams(temperature=1.0, max_tokens=12))
    engine.add_request("s", PROMPTS[2], seeded)
    assert drain(engine)["s"] == solo
