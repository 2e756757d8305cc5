"""PagedAttentionPass: op counts before/after, numerical parity with eager, loud failure."""

from __future__ import annotations

import dataclasses

import pass_testing
import pytest
import torch
from pass_testing import HEAD_DIM as SHARED_HEAD_DIM
from pass_testing import KV_HEADS as SHARED_KV_HEADS
from pass_testing import fresh_cache_metadata

import compiled_serve.kernels.causal_attention  # noqa: F401
from compiled_serve.errors import CompilationError
from compiled_serve.kernels.forward_context import AttentionMetadata, forward_context
from compiled_serve.passes.base import count_ops
from compiled_serve.passes.paged_attention import PagedAttentionPass
from compiled_serve.passes.pipeline import CompileReport, compile_model, make_backend

HEADS, KV_HEADS, HEAD_DIM, LAYERS, HIDDEN = 4, 2, 16, 3, 64
assert (KV_HEADS, HEAD_DIM) == (SHARED_KV_HEADS, SHARED_HEAD_DIM)  # the shared cache helper's layout


class TinyAttnModel(torch.nn.Module):
    """Stacked attention blocks in the shape of a real decoder, attention via the model-facing op."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(100, HIDDEN)
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM) for _ in range(LAYERS))
        self.o = torch.nn.ModuleList(torch.nn.Linear(HEADS * HEAD_DIM, HIDDEN) for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) + positions[:, None].float() * 0.01
        for qkv, o in zip(self.qkv, self.o):
            q, k, v = qkv(h).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
            a = torch.ops.compiled_serve.causal_attention(
                q.view(-1, HEADS, HEAD_DIM), k.view(-1, KV_HEADS, HEAD_DIM), v.view(-1, KV_HEADS, HEAD_DIM),
                HEAD_DIM**-0.5)
            h = h + o(a.reshape(-1, HEADS * HEAD_DIM))
        return h


def capture(model: torch.nn.Module, num_caches: int = LAYERS) -> torch.fx.GraphModule:
    return pass_testing.capture(type(model).__name__, model, num_caches=num_caches)[0]


def meta_for(seq_tokens: list[int]):
    return fresh_cache_metadata(seq_tokens, num_blocks=8, num_layers=LAYERS)


def test_op_counts_before_and_after():
    gm = capture(TinyAttnModel())
    before = count_ops(gm)
    assert before.get("compiled_serve::causal_attention", 0) == LAYERS
    assert PagedAttentionPass()(gm) == LAYERS
    after = count_ops(gm)
    assert after.get("compiled_serve::causal_attention", 0) == 0
    assert after["compiled_serve::paged_attention"] == LAYERS
    # Layer i writes the i-th cache input, in graph (= execution) order; the marker is gone.
    caches = [n.args[3].name for n in gm.graph.nodes if n.op == "call_function"
              and n.target is torch.ops.compiled_serve.paged_attention.default]
    assert caches == [p.name for p in gm.graph.nodes if p.op == "placeholder" and "kv_caches" in p.name]
    assert [int(name.rsplit("_", 2)[-2]) for name in caches] == list(range(LAYERS))
    assert "compiled_serve::step_kv_caches" not in after


def test_rewritten_graph_matches_eager_for_a_batch_of_sequences():
    model = TinyAttnModel().eval()
    step, report = compile_model(model, mode="graph")
    lens = [5, 3, 7]
    ids = [torch.randint(0, 100, (n,)) for n in lens]
    flat_ids = torch.cat(ids)
    flat_pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad(), forward_context(meta_for(lens)):
        paged = step(flat_ids, flat_pos)
    with torch.no_grad():
        eager = torch.cat([model(i, torch.arange(len(i))) for i in ids])  # each sequence alone, dense
    torch.testing.assert_close(paged, eager, rtol=1e-5, atol=1e-5)
    assert report.graphs[0]["matches"]["paged-attention"] == LAYERS


def test_decode_step_reads_the_cache():
    """Prefill 6 tokens, then feed token 7 alone: equals the dense run over all 7."""
    model = TinyAttnModel().eval()
    step, _ = compile_model(model, mode="graph")
    ids = torch.randint(0, 100, (7,))
    meta = meta_for([6])
    with torch.no_grad(), forward_context(meta):
        step(ids[:6], torch.arange(6))
    decode = AttentionMetadata(
        slot_mapping=torch.tensor([6]), block_tables=meta.block_tables, seq_lens=torch.tensor([7], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32), max_query_len=1, max_seq_len=7,
        kv_caches=meta.kv_caches, seq_lens_host=[7], query_start_loc_host=[0, 1])
    with torch.no_grad(), forward_context(decode):
        last = step(ids[6:], torch.tensor([6]))
    with torch.no_grad():
        eager = model(ids, torch.arange(7))[-1:]
    torch.testing.assert_close(last, eager, rtol=1e-5, atol=1e-5)


def test_nothing_to_rewrite_fails_loudly():
    class NoAttention(torch.nn.Module):
        def forward(self, input_ids, positions):
            return input_ids.float() * 2

    gm = capture(NoAttention())
    with pytest.raises(CompilationError, match="nothing to rewrite"):
        PagedAttentionPass()(gm)
    backend = make_backend([PagedAttentionPass()], "graph", CompileReport())
    with pytest.raises(Exception, match="nothing to rewrite"):
        torch._dynamo.reset()
        torch.compile(NoAttention().forward, backend=backend, fullgraph=True)(torch.arange(3), torch.arange(3))


def test_uuid_tracks_source():
    class Changed(PagedAttentionPass):
        name = "paged-attention-v2"

    assert PagedAttentionPass.uuid() != Changed.uuid()
    assert PagedAttentionPass.uuid() == PagedAttentionPass.uuid()


def _one_layer_step(lens: list[int]):
    """(q, k, v, cache, metadata) for a fresh prefill of `lens` into one empty cache."""
    meta = fresh_cache_metadata(lens, num_blocks=8, num_layers=1)
    gen = torch.Generator().manual_seed(sum(lens))
    t = sum(lens)
    q = torch.randn(t, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(t, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    return q, k, v, meta.kv_caches[0], meta


def test_op_declares_its_cache_write_and_passes_opcheck():
    """The schema says `kv_cache` is written (opcheck fails an op that mutates undeclared)."""
    schema = torch.ops.compiled_serve.paged_attention.default._schema
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["kv_cache"]
    q, k, v, cache, meta = _one_layer_step([5, 3])
    with forward_context(meta):
        torch.library.opcheck(torch.ops.compiled_serve.paged_attention.default, (q, k, v, cache, HEAD_DIM**-0.5))


def read_write_read(q, k, v, cache):  # type: ignore[no-untyped-def]
    """The same cache read on both sides of a write whose result goes unread: only a declared
    write keeps the op (pure and unused, it is dead code) and keeps the reads apart (CSE)."""
    before = cache.sum()
    torch.ops.compiled_serve.paged_attention(q, k, v, cache, HEAD_DIM**-0.5)
    return before, cache.sum()


@pytest.mark.heavy
def test_inductor_orders_cache_reads_around_the_write():
    """Under functionalization and Inductor (DCE, CSE, reordering, reinplacing) the read after the
    write sees the new keys, the read before it does not, and the write lands in the caller's cache."""
    q, k, v, cache, meta = _one_layer_step([6])
    torch._dynamo.reset()
    compiled = torch.compile(read_write_read, backend="inductor", fullgraph=True, dynamic=True)
    eager_cache = cache.clone()
    # No cache hits: the compile caches do not key on an op's schema, only on the graph.
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad(), forward_context(meta):
        before, after = compiled(q, k, v, cache)
    with torch.no_grad(), forward_context(dataclasses.replace(meta, kv_caches=[eager_cache], cpu_decode_plan=None)):
        want = read_write_read(q, k, v, eager_cache)
    assert float(before) == 0.0 and float(want[1]) != 0.0
    torch.testing.assert_close(after, want[1])
    assert torch.equal(cache, eager_cache)  # written in place, as eagerly
