"""Dead-code elimination that keeps side effects fx cannot see.

`Graph.eliminate_dead_code` trusts op schemas and never keeps a method call. Here a node also
stays when it mutates (an in-place method such as `x.add_(y)`, an op with a mutable schema such
as `paged_attention`, which writes its `kv_cache` argument) or is a compiled_serve op not known
pure: a plug-in's op that forgets to declare its writes still runs.
"""

from __future__ import annotations

import torch
import torch.fx

#: compiled_serve ops without side effects; any other op in the namespace is kept.
PURE_OPS = frozenset({
    "compiled_serve::rms_norm", "compiled_serve::fused_add_rms_norm", "compiled_serve::silu_and_mul",
    "compiled_serve::rotary_embedding", "compiled_serve::causal_attention",
})


def eliminate_dead_code(graph: torch.fx.Graph) -> bool:
    """Erase nodes nobody reads that have no side effects; whether anything changed."""
    return graph.eliminate_dead_code(is_impure_node=has_side_effects)


def mutates(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def has_side_effects(node: torch.fx.Node) -> bool:
    """What dead-code elimination must keep even when nothing reads its result."""
    if node.is_impure() or mutates(node):
        return True
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = target._schema.name if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
        return name.startswith("compiled_serve::") and name not in PURE_OPS
    return False
