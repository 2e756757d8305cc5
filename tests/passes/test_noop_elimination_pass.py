"""NoOpEliminationPass: removes exactly the no-ops (and keeps side effects through DCE)."""

from __future__ import annotations

import torch
from pass_testing import LAYERS, assert_same_outputs, capture, op_count

import compiled_serve.kernels.paged_attention  # noqa: F401
from compiled_serve.passes.dead_code import eliminate_dead_code
from compiled_serve.passes.noop_elimination import NoOpEliminationPass


def test_fp32_llama_loses_its_identity_casts_and_keeps_its_outputs() -> None:
    gm, example = capture("llama")
    reference, _ = capture("llama")
    norms = 2 * LAYERS + 1
    assert op_count(gm, "Tensor.float") == norms + 1 and op_count(gm, "Tensor.to") == norms + 2
    # Each norm's `.float()` and `.to(float32)`, and the cos/sin `.to(float32)`.
    assert NoOpEliminationPass()(gm) == 2 * norms + 2
    assert op_count(gm, "Tensor.to") == 0
    assert op_count(gm, "Tensor.float") == 1  # positions: int64 -> float32 is a real cast
    assert_same_outputs(reference, gm, example)


class Mixed(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = input_ids.float()[:, None].expand(-1, 4).contiguous()  # [T, 4]; expand -> a real copy
        a = (x.view(-1, 4) * 1 + 0).reshape(x.shape[0], 4).contiguous()  # all no-ops
        b = x.view(-1, 2, 2).to(torch.float16).float()  # real: new shape, real round trip
        c = positions * 1.0  # int64 * 1.0 promotes to float: real
        d = x * 1
        d.add_(1)  # mutated in place: `x * 1` is a needed copy
        return a + b.flatten(1) + c[:, None] + d


def test_synthetic_no_ops_go_and_real_ops_stay() -> None:
    gm, example = capture("mixed", Mixed())
    reference, _ = capture("mixed", Mixed())
    assert NoOpEliminationPass()(gm) == 5  # view, * 1, + 0, reshape, second contiguous
    assert op_count(gm, "Tensor.reshape") == 0 and op_count(gm, "Tensor.contiguous") == 1
    assert op_count(gm, "Tensor.to") == 1 and op_count(gm, "Tensor.add_") == 1
    ids, pos = torch.arange(6), torch.arange(6) + 3
    torch.testing.assert_close(gm(*_inputs(gm, example, ids, pos)), reference(*_inputs(reference, example, ids, pos)))


def _inputs(gm, example, ids, pos):
    from pass_testing import graph_inputs

    return graph_inputs(gm, example, ids, pos)


def test_dead_code_keeps_the_cache_write_but_drops_pure_ops() -> None:
    graph = torch.fx.Graph()
    q, k, v, cache = (graph.placeholder(n) for n in ("q", "k", "v", "cache"))
    graph.call_function(torch.ops.compiled_serve.paged_attention.default, (q, k, v, cache, 1.0))  # unread
    graph.call_function(torch.ops.compiled_serve.causal_attention.default, (q, k, v, 1.0))  # unread
    graph.call_method("add_", (q, 1))  # unread, in place
    graph.output(q)
    eliminate_dead_code(graph)
    kept = [str(n.target) for n in graph.nodes if n.op in ("call_function", "call_method")]
    assert kept == ["compiled_serve.paged_attention.default", "add_"]
