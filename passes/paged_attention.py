"""PagedAttentionPass: dense attention becomes one op that writes the KV cache and attends over it.

Before (one layer of a captured model; the token dimension is flat; the caches are graph inputs,
named by the entry point's `step_kv_caches` call, see passes/pipeline.py):
    compiled_serve.step_kv_caches([cache_0, ..., cache_{L-1}])   # each [2, blocks, bs, KVH, D]
    q, k, v = ...                                  # [T, H, D], [T, KVH, D], [T, KVH, D]
    o = compiled_serve.causal_attention(q, k, v, scale)
After:
    o = compiled_serve.paged_attention(q, k, v, cache_i, scale)   # writes cache_i, then attends

The KV-cache write is fused in: `paged_attention` scatters this step's k/v into `cache_i`'s blocks
through the step's slot mapping, then attends over each sequence's whole cached context through
its block table (on CUDA: `paged_attention_with_kv_write_triton`, write then attend on one
stream). Its schema declares the write (`kv_cache` is mutated), so functionalization and Inductor
order every later read of that cache after it and keep the op even when its result goes unread.
The metadata comes from the forward context. Layers are numbered in graph order, which is
execution order: attention i gets the i-th cache. The `step_kv_caches` marker is erased. A
"fixup" pass: it runs after the rewrites (RotaryPass pairs q and k through either op).
"""

from __future__ import annotations

import torch
import torch.fx

import compiled_serve.kernels.causal_attention  # noqa: F401  (registers the op)
import compiled_serve.kernels.paged_attention  # noqa: F401
from compiled_serve.errors import CompilationError
from compiled_serve.passes.base import GraphPass, op_name

DENSE_OP = "compiled_serve::causal_attention"
CACHES_OP = "compiled_serve::step_kv_caches"


def _calls(gm: torch.fx.GraphModule, name: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n.target) == name]


class PagedAttentionPass(GraphPass):
    name = "paged-attention"
    phase = "fixup"
    required = True

    def apply(self, gm: torch.fx.GraphModule) -> int:
        dense = _calls(gm, DENSE_OP)
        markers = _calls(gm, CACHES_OP)
        caches = list(markers[0].args[0]) if len(markers) == 1 else []
        if dense and len(caches) != len(dense):
            raise CompilationError(
                f"paged-attention: {len(dense)} attention layer(s) but {len(caches)} KV cache input(s); "
                "compile the step through compile_model and call it inside forward_context(meta) "
                "with one cache per layer"
            )
        for node, cache in zip(dense, caches):
            q, k, v, scale = node.args
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.ops.compiled_serve.paged_attention.default, (q, k, v, cache, scale))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        for marker in markers if dense else []:
            gm.graph.erase_node(marker)
        self.num_layers = len(dense)
        return len(dense)
