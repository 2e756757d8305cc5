"""Every model captures as one dynamo graph with a dynamic token dim, exposing one
`compiled_serve.causal_attention` node per layer (what PagedAttentionPass rewrites)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import ours_from_hf, tiny_hf_model


class CountingBackend:
    """A torch.compile backend that records each captured graph and runs it as is."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs.append(gm)
        return gm.forward

    def attention_nodes(self, gm: torch.fx.GraphModule) -> int:
        # dynamo records the overload packet; AOT-level graphs would show `.default`.
        op = torch.ops.compiled_serve.causal_attention
        return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in (op, op.default))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_forward_captures_fullgraph_with_one_attention_per_layer(kind: str) -> None:
    torch._dynamo.reset()
    module = ours_from_hf(tiny_hf_model(kind, num_hidden_layers=3))
    backend = CountingBackend()
    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for num_tokens in (7, 13, 2):
            ids = torch.randint(0, 256, (num_tokens,))
            positions = torch.arange(num_tokens)
            assert torch.allclose(compiled(ids, positions), module(ids, positions), atol=1e-5)
    assert len(backend.graphs) == 1, "the token dim must be dynamic: one graph for every length"
    assert backend.attention_nodes(backend.graphs[0]) == 3
    graph = backend.graphs[0].graph
    # No host syncs: no .item() (dynamo would add one per float module attribute under
    # dynamic=True), and the attention scale is a literal.
    assert not [n for n in graph.nodes if n.op == "call_method" and n.target == "item"]
    op = torch.ops.compiled_serve.causal_attention
    scales = {n.args[3] for n in graph.nodes if n.target in (op, op.default)}
    assert scales == {16**-0.5}
    # Graph inputs: the two int64 tensors, the symbolic token count, parameters and the RoPE
    # buffer; nothing else.
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    assert not [p for p in placeholders if p.endswith(("_eps", "_scaling"))], placeholders
