"""PagedAttentionPass: op counts before/after, numerical parity with eager, loud failure."""

from __future__ import annotations

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


def capture(model: torch.nn.Module) -> torch.fx.GraphModule:
    graphs = []

    def grab(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model.forward, backend=grab, fullgraph=True)(torch.arange(5), torch.arange(5))
    return graphs[0]


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
    layer_ids = [n.args[3] for n in gm.graph.nodes if n.op == "call_function"
                 and n.target is torch.ops.compiled_serve.paged_attention.default]
    assert layer_ids == list(range(LAYERS))


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
