"""PagedAttentionPass: dense attention becomes one op that writes the KV cache and attends over it.

Before (one layer of a captured model; the token dimension is flat):
    q, k, v = ...                                  # [T, H, D], [T, KVH, D], [T, KVH, D]
    o = compiled_serve.causal_attention(q, k, v, scale)
After:
    o = compiled_serve.paged_attention(q, k, v, layer_idx, scale)   # KV write fused in

The KV-cache write is fused in: there is no separate write node. `paged_attention` scatters this
step's k/v into layer `layer_idx`'s cache blocks through the step's slot mapping, then attends
over each sequence's whole cached context through its block table; cache and metadata come from
the forward context (on CUDA: `paged_attention_with_kv_write_triton`, write then attend on one
stream). The op writes the cache although its schema declares no mutation, so dead-code
elimination keeps it (`dead_code.py`). Layers are numbered in graph order, which is execution
order. A "fixup" pass: it runs after the rewrites (RotaryPass pairs q and k through either op).
"""

from __future__ import annotations

import torch
import torch.fx

import compiled_serve.kernels.causal_attention  # noqa: F401  (registers the op)
import compiled_serve.kernels.paged_attention  # noqa: F401
from compiled_serve.passes.base import GraphPass


class PagedAttentionPass(GraphPass):
    name = "paged-attention"
    phase = "fixup"
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
