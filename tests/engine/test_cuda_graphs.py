"""The static decode path: padded buckets, static buffers, CUDA-graph replay.

On CPU the same static-buffer path runs without graphs (`capture=False`): that checks padding and
buffer handling against the dynamic step. The `gpu` tests capture real graphs and compare a replay
with the dynamic step on the same inputs, and check that padding rows never touch the KV cache.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tiny_engine import tiny_engine

from compiled_serve.engine.cuda_graphs import DecodeGraphs, pad_decode_inputs
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.kernels.forward_context import AttentionMetadata, forward_context
from compiled_serve.sampling_params import SamplingParams

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_pad_decode_inputs_layout() -> None:
    ids64, meta32, tables = pad_decode_inputs([5, 6], [3, 9], [17, 40], [4, 10], [[1], [2, 0, 3]], 4, 8)
    assert ids64.tolist() == [[5, 6, 0, 0], [3, 9, 0, 0], [17, 40, -1, -1]]  # padding: slot -1
    assert meta32[:8].tolist() == [4, 10, 0, 0, 0, 0, 0, 0]  # seq_lens, padding 0
    assert meta32[8:].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 2]  # query ranges, padding empty
    assert tables.tolist() == [[1, 0, 0], [2, 0, 3], [0, 0, 0], [0, 0, 0]]


def _engine(tmp_path: Path, device: str, **config) -> LLMEngine:
    return tiny_engine(tmp_path, device=device, cuda_graph_buckets=(1, 2, 4, 8), **config)


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_static_decode_path_generates_the_same_tokens(tmp_path: Path, device: str) -> None:
    engine = _engine(tmp_path, device)
    rng = random.Random(1)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(3, 30))] for _ in range(7)]
    if engine.runner.decode_graphs is None:  # CPU: the static path without capture
        engine.runner.capture_decode_graphs(engine.decode_buckets, engine.max_model_len, capture=False)
    warm = engine.compile_report.num_graphs
    with_static = _generate(engine, prompts)
    assert engine.runner.num_graph_steps > 0
    assert engine.compile_report.num_graphs == warm == 1  # the static buffers' views never recompile
    graphs, engine.runner.decode_graphs = engine.runner.decode_graphs, None
    runner = engine.runner
    steps = runner.num_graph_steps - runner.num_mixed_graph_steps
    dynamic = _generate(engine, prompts)
    assert runner.num_graph_steps - runner.num_mixed_graph_steps == steps  # no decode graph ran
    assert with_static == dynamic
    assert graphs is not None and graphs.use_graphs == (device == "cuda")


def test_mixed_step_graphs_generate_the_same_tokens(tmp_path: Path) -> None:
    """Prefill chunks beside decodes, padded to token buckets with empty sequences, give the
    dynamic path's tokens (the static buffers without capture; on CUDA the replay is compared
    step by step in the next test, since its attention launches differ in rounding)."""
    engine = _engine(tmp_path, "cpu", max_num_batched_tokens=48)
    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(3, 70))] for _ in range(9)]
    if engine.runner.mixed_graphs is None:
        engine.runner.mixed_graphs = DecodeGraphs(
            engine.runner.step_fn, engine.runner.kv_caches, (16, 32, 48), 16, engine.max_model_len,
            engine.device, capture=False, query_len=None, seq_capacity=engine.config.max_num_seqs)
    with_graphs = _generate(engine, prompts)
    assert engine.runner.num_mixed_graph_steps > 0
    engine.runner.mixed_graphs = None
    steps = engine.runner.num_mixed_graph_steps
    dynamic = _generate(engine, prompts)
    assert engine.runner.num_mixed_graph_steps == steps
    assert with_graphs == dynamic


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_graph_replay_matches_the_dynamic_step(tmp_path: Path, device: str) -> None:
    """One mixed step (a decode, a 5-token chunk, a 12-token chunk) replayed from a token-bucket
    graph equals the dynamic step, and its padding (tokens and sequences) writes no cache slot."""
    engine = _engine(tmp_path, device)
    runner = engine.runner
    graphs = DecodeGraphs(runner.step_fn, runner.kv_caches, (32,), 16, engine.max_model_len, engine.device,
                          capture=device == "cuda", query_len=None, seq_capacity=8)
    graphs.capture_all()
    gen = torch.Generator(device="cpu").manual_seed(1)
    for cache in runner.kv_caches:
        cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.device, cache.dtype))
    bs, dev = engine.config.block_size, engine.device
    lens, qlens = [9, 21, 12], [1, 5, 12]  # context after the step, new tokens
    tables = [[3], [10, 11], [20]]
    qsl = [0, 1, 6, 18]
    positions = [p for n, q in zip(lens, qlens) for p in range(n - q, n)]
    slots = [t[p // bs] * bs + p % bs for t, n, q in zip(tables, lens, qlens) for p in range(n - q, n)]
    ids = [(7 * i + 3) % 256 for i in range(len(positions))]
    width = 16
    padded = [t + [0] * (width - len(t)) for t in tables]
    n_tok, pad = len(ids), 32 - len(ids)
    i64 = torch.int64
    meta32 = torch.tensor(lens + [0] * 5 + qsl + [n_tok] * 5, dtype=torch.int32, device=dev)
    before = [c.clone() for c in runner.kv_caches]
    with torch.inference_mode():
        hidden = graphs.replay(
            32, torch.tensor(ids + [0] * pad, dtype=i64, device=dev),
            torch.tensor(positions + [0] * pad, dtype=i64, device=dev),
            torch.tensor(slots + [-1] * pad, dtype=i64, device=dev), meta32,
            torch.tensor(padded, dtype=torch.int32, device=dev))[:n_tok].clone()
    for b, a in zip(before, runner.kv_caches):
        flat_b, flat_a = b.view(2, -1, *b.shape[-2:]), a.view(2, -1, *a.shape[-2:])
        changed = (flat_b != flat_a).any(dim=(0, 2, 3)).nonzero().flatten().tolist()
        assert sorted(changed) == sorted(slots)
    for cache, b in zip(runner.kv_caches, before):
        cache.copy_(b)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev), block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev), max_query_len=12, max_seq_len=21,
        kv_caches=runner.kv_caches, seq_lens_host=lens, query_start_loc_host=qsl)
    with torch.inference_mode(), forward_context(meta):
        expected = runner.step_fn(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev))
    torch.testing.assert_close(hidden, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_replay_matches_dynamic_step_and_padding_never_touches_the_cache(tmp_path: Path, device: str) -> None:
    engine = _engine(tmp_path, device)
    runner = engine.runner
    graphs = runner.decode_graphs or DecodeGraphs(
        runner.step_fn, runner.kv_caches, (1, 2, 4, 8), 8, engine.max_model_len, engine.device, capture=False)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for cache in runner.kv_caches:
        cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.device, cache.dtype))
    # Three sequences (bucket 4: one padding row) with 5, 20 and 33 tokens of context.
    ids, lens = [7, 100, 201], [5, 20, 33]
    tables = [[3], [10, 11], [20, 21, 22]]
    bs = engine.config.block_size
    slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]
    positions = [n - 1 for n in lens]
    before = [c.clone() for c in runner.kv_caches]
    with torch.inference_mode():
        hidden = graphs.run(ids, positions, slots, lens, tables).clone()  # [3, hidden]
    after = [c.clone() for c in runner.kv_caches]
    for b, a in zip(before, after):
        flat_b, flat_a = b.view(2, -1, *b.shape[-2:]), a.view(2, -1, *a.shape[-2:])
        changed = (flat_b != flat_a).any(dim=(0, 2, 3)).nonzero().flatten().tolist()
        assert sorted(changed) == sorted(slots)  # the padding row (slot -1) wrote nothing
    for cache, b in zip(runner.kv_caches, before):
        cache.copy_(b)
    dev = engine.device
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=dev),
        max_query_len=1, max_seq_len=max(lens), kv_caches=runner.kv_caches, seq_lens_host=lens,
        query_start_loc_host=[0, 1, 2, 3])
    with torch.inference_mode(), forward_context(meta):
        expected = runner.step_fn(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev))
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    for cache, a in zip(runner.kv_caches, after):
        torch.testing.assert_close(cache, a)


@pytest.mark.gpu
def test_enforce_eager_turns_graphs_off(tmp_path: Path) -> None:
    torch._dynamo.reset()  # earlier engines in this process count towards dynamo's recompile limit
    engine = _engine(tmp_path, "cuda", enforce_eager=True)
    assert engine.runner.decode_graphs is None
    assert engine.startup_report()["cuda_graphs"] == "off (enforce_eager)"
    on = _engine(tmp_path, "cuda")
    assert on.runner.decode_graphs is not None and sorted(on.runner.decode_graphs.graphs) == [2, 4, 8]
