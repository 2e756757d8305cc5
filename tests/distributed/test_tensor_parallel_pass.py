"""TensorParallelPass: op counts and shard shapes per rank, loud failures, and parity of 2 gloo
ranks with transformers and with our own TP=1 step (prefill and a decode through the KV cache).

Tolerance (fp32): logits within 1e-4 of transformers' (the same bound the TP=1 parity tests use)
and within 2e-5 of TP=1's (only the summation order of the row-parallel reductions differs).
"""

from __future__ import annotations

import pytest
import torch
import tp_testing
from tp_testing import hf_and_ours, hf_logits, prompts, rewritten_graph, run_ranks, two_step_logits

from compiled_serve.errors import CompilationError
from compiled_serve.models.tp_layout import ShardingError, head_split, qkv_row_ranges
from compiled_serve.passes.base import count_ops
from compiled_serve.passes.paged_attention import PagedAttentionPass
from compiled_serve.passes.tensor_parallel import TensorParallelPass

ALL_REDUCE, WAIT, GATHER = ("_c10d_functional::all_reduce", "_c10d_functional::wait_tensor",
                            "_c10d_functional::all_gather_into_tensor")


def _rewritten(kind: str, rank: int, world_size: int, **overrides):
    _, ours = hf_and_ours(kind, **overrides)
    tp = TensorParallelPass(rank, world_size, group_name="0")
    return rewritten_graph(ours, [PagedAttentionPass(), tp]), tp, ours


@pytest.mark.parametrize("kind,overrides,kv_per_rank", [
    ("llama", {}, 1),
    ("llama", {"num_key_value_heads": 1}, 1),  # fewer KV heads than ranks: replicated
    ("qwen2", {}, 1),  # q/k/v bias sharded with the weights
])
def test_op_counts_and_shard_shapes_per_rank(kind, overrides, kv_per_rank):
    for rank in (0, 1):
        g, tp, model = _rewritten(kind, rank, 2, **overrides)
        cfg = model.config
        matches = sum(1 for _ in tp.shard_shapes)  # one per sharded weight or bias
        ops = count_ops(g)
        # Two all-reduces per layer (o_proj, down_proj) and one for the embedding; no gather here.
        assert ops[ALL_REDUCE] == 2 * cfg.num_layers + 1 == ops[WAIT]
        assert ops.get(GATHER, 0) == 0
        assert matches == 1 + 4 * cfg.num_layers + (cfg.num_layers if kind == "qwen2" else 0)
        d, h, i = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
        shapes = {name.split("_modules_")[-1] if "layers" not in name else name.split("layers_modules_0_modules_")[-1]:
                  shape for name, shape in tp.shard_shapes.items() if "layers_modules_1_" not in name}
        assert shapes["self_attn_modules_qkv_proj_parameters_weight_"] == ((cfg.num_heads // 2 + 2 * kv_per_rank) * d, h)
        assert shapes["self_attn_modules_o_proj_parameters_weight_"] == (h, cfg.num_heads // 2 * d)
        assert shapes["mlp_modules_gate_up_proj_parameters_weight_"] == (i, h)
        assert shapes["mlp_modules_down_proj_parameters_weight_"] == (h, i // 2)
        assert shapes["embed_tokens_parameters_weight_"] == (cfg.vocab_size // 2, h)
        if kind == "qwen2":
            assert shapes["self_attn_modules_qkv_proj_parameters_bias_"] == ((cfg.num_heads // 2 + 2 * kv_per_rank) * d,)
        # The head views now carry the rank's head counts.
        views = [n.args[1:] for n in g.graph.nodes if n.op == "call_method" and n.target == "view"
                 and len(n.args) == 4 and n.args[3] == d]
        assert (-1, cfg.num_heads // 2, d) in views and (-1, kv_per_rank, d) in views
        assert (-1, cfg.num_heads, d) not in views


def test_shard_rows_follow_the_kv_head_each_rank_reads():
    # H=4, KVH=1 over 2 ranks: both keep the one kv head; q heads 0-1 and 2-3.
    assert qkv_row_ranges(4, 1, 16, 0, 2) == [(0, 32), (64, 16), (80, 16)]
    assert qkv_row_ranges(4, 1, 16, 1, 2) == [(32, 32), (64, 16), (80, 16)]
    # H=8, KVH=2 over 4 ranks: ranks 0-1 read kv head 0, ranks 2-3 kv head 1.
    assert [head_split(8, 2, r, 4).kv_head_start for r in range(4)] == [0, 0, 1, 1]
    assert head_split(8, 4, 3, 2).num_kv_heads == 2


def test_smollm2_heads_do_not_split_in_two_but_do_in_three():
    with pytest.raises(ShardingError, match=r"num_heads \(9\) is not divisible by tensor_parallel_size 2"):
        head_split(9, 3, 0, 2)
    s = head_split(9, 3, 2, 3)
    assert (s.num_heads, s.num_kv_heads, s.head_start, s.kv_head_start) == (3, 1, 6, 2)


def test_indivisible_graph_fails_loudly():
    with pytest.raises(ShardingError, match=r"num_heads \(4\) is not divisible by tensor_parallel_size 3"):
        _rewritten("llama", 0, 3, vocab_size=240)  # 4 heads, 2 kv heads
    with pytest.raises(ShardingError, match=r"num_kv_heads \(3\) < tensor_parallel_size 4"):
        _rewritten("llama", 0, 4, vocab_size=240, hidden_size=96, num_attention_heads=12, num_key_value_heads=3, head_dim=8)
    with pytest.raises(CompilationError, match="not a TP setup"):
        TensorParallelPass(0, 1)


def test_memoryless_weight_without_a_shard_is_refused():
    _, ours = hf_and_ours("llama")
    qkv = ours.model.layers[0].self_attn.qkv_proj
    qkv.weight = torch.nn.Parameter(torch.zeros(()).expand(qkv.weight.shape), requires_grad=False)
    with pytest.raises(CompilationError, match="holds no values"):
        rewritten_graph(ours, [PagedAttentionPass(), TensorParallelPass(0, 2, group_name="0")])


PARITY_CASES = [
    ("llama", {}, False),
    ("llama", {"num_key_value_heads": 1}, False),  # KV heads replicated on both ranks
    ("qwen3", {}, False),  # per-head q/k norms
    ("qwen2", {"tie_word_embeddings": True}, False),  # q/k/v bias; logits from the vocab-parallel embedding
    ("qwen3", {}, True),  # after every built-in pass, the opt-in fusions too (silu_and_mul, fused norms, rotary)
]


@pytest.fixture(scope="module")
def two_rank_results():
    return run_ranks(tp_testing.rank_two_steps, 2, PARITY_CASES)


@pytest.mark.parametrize("case", range(len(PARITY_CASES)), ids=[f"{k}-{o}-{'fused' if f else 'plain'}" for k, o, f in PARITY_CASES])
def test_two_gloo_ranks_match_transformers_and_tp1(two_rank_results, case):
    kind, overrides, fusions = PARITY_CASES[case]
    hf, ours = hf_and_ours(kind, **overrides)
    seqs = prompts()
    tp1 = two_step_logits(ours, seqs, fusions=fusions)
    ref = hf_logits(hf, seqs)
    decoded = [s + [t] for s, t in zip(seqs, tp1["next_ids"].tolist())]
    ref_decode = torch.stack([x[-1] for x in hf_logits(hf, decoded)])
    for result in two_rank_results:
        r = {k.split(".", 1)[1]: v for k, v in result.items() if k.startswith(f"{case}.")}
        torch.testing.assert_close(r["prefill"], torch.cat(ref), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r["decode"], ref_decode, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r["prefill"], tp1["prefill"], rtol=0, atol=2e-5)
        torch.testing.assert_close(r["decode"], tp1["decode"], rtol=0, atol=2e-5)
        assert r["next_ids"].tolist() == tp1["next_ids"].tolist()
    # Each rank's cache holds only its KV heads.
    kv = head_split(ours.config.num_heads, ours.config.num_kv_heads, 0, 2).num_kv_heads
    assert two_rank_results[0][f"{case}.kv_cache0"].shape[3] == kv


def test_fused_silu_mul_is_still_a_gate_up_projection():
    from compiled_serve.passes.silu_mul import SiluMulPass

    _, ours = hf_and_ours("llama")
    tp = TensorParallelPass(0, 2, group_name="0")
    g = rewritten_graph(ours, [SiluMulPass(), PagedAttentionPass(), tp])
    assert count_ops(g)["compiled_serve::silu_and_mul"] == ours.config.num_layers
    assert sorted(set(tp.roles.values())) == ["gate_up", "qkv", "row", "vocab"]
    assert count_ops(g)[ALL_REDUCE] == 2 * ours.config.num_layers + 1


def _logits_graph(model, rank: int, world_size: int):
    """`compute_logits` captured as the engine captures it (tp_pipeline.compile_logits), then
    TensorParallelPass alone: the graph is rewritten, never run (no process group needed)."""
    class _Captured(Exception):
        pass

    graphs = []

    def grab(gm, inputs):
        tp = TensorParallelPass(rank, world_size, group_name="0")
        tp(gm)
        graphs.append((gm, tp))
        raise _Captured

    torch._dynamo.reset()
    compute = type(model).compute_logits
    try:
        with torch.no_grad():
            torch.compile(lambda h: compute(model, h), backend=grab, fullgraph=True, dynamic=True)(
                torch.randn(5, model.config.hidden_size))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        if not isinstance(e.inner_exception, _Captured):
            raise e.inner_exception from e
    assert len(graphs) == 1
    return graphs[0]


@pytest.mark.parametrize("kind,overrides,weight", [
    ("llama", {}, "lm_head"),
    ("qwen2", {"tie_word_embeddings": True}, "embed_tokens"),  # the tied embedding is the lm_head
])
def test_logits_graph_gets_exactly_one_vocab_gather(kind, overrides, weight):
    for rank in (0, 1):
        _, ours = hf_and_ours(kind, **overrides)
        g, tp = _logits_graph(ours, rank, 2)
        ops = count_ops(g)
        # One all-gather of the vocabulary shards (and its wait); no all-reduce in the logits graph.
        assert ops[GATHER] == 1 == ops[WAIT]
        assert ops.get(ALL_REDUCE, 0) == 0
        gather = next(n for n in g.graph.nodes if n.op == "call_function"
                      and str(n.target).startswith("_c10d_functional.all_gather_into_tensor"))
        assert gather.args[1] == 2 and gather.args[2] == "0"  # over both ranks of the group
        cfg = ours.config
        (name, role), = tp.roles.items()
        assert weight in name and role == "gathered"
        assert tp.shard_shapes[name] == (cfg.vocab_size // 2, cfg.hidden_size)
        # The gathered [2 * n, V/2] is laid back out to [n, V] before the float cast reaches the output.
        layout = [n.target for n in g.graph.nodes if n.op == "call_method"]
        assert layout[layout.index("view"):layout.index("reshape") + 1] == ["view", "permute", "reshape"]
