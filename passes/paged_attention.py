"""PagedAttentionPass: the model's dense attention becomes attention over the paged KV cache.

Before (one layer of a captured model; the token dimension is flat):
    q, k, v = ...                                  # [T, H, D], [T, KVH, D], [T, KVH, D]
    o = compiled_serve.causal_attention(q, k, v, scale)
After:
    o = compiled_serve.paged_attention(q, k, v, layer_idx, scale)

`paged_attention` writes k/v into the layer's cache blocks through the step's slot mapping and
attends over each sequence's whole cached context through its block table; both come from the
forward context. Layers are numbered in graph order, which is execution order.
"""

from __future__ import annotations

import torch
import torch.fx

import compiled_serve.kernels.causal_attention  # noqa: F401  (registers the op)
import compiled_serve.kernels.paged_attention  # noqa: F401
from compiled_serve.passes.base import GraphPass


class PagedAttentionPass(GraphPass):
    name = "paged-attention"
    required = True

    def apply(self, gm: torch.fx.GraphModule) -> int:
        dense = torch.ops.compiled_serve.causal_attention.default
        paged = torch.ops.compiled_serve.paged_attention.default
        layer_idx = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (dense, torch.ops.compiled_serve.causal_attention):
                continue
            q, k, v, scale = node.args
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(paged, (q, k, v, layer_idx, scale))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            layer_idx += 1
        self.num_layers = layer_idx
        return layer_idx
