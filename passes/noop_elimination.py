"""NoOpEliminationPass: drop ops that return their input unchanged, then dead code.

Before (an fp32 model; RMSNorm's casts are for bf16 and do nothing here):
    x = hidden.float()                    # [T, hidden] f32 -> f32
    y = x.view(-1, 64)                    # [T, 64] -> [T, 64]
    z = (y * 1) + 0
    out = z.to(torch.float32).contiguous()
After:
    out = hidden

Removed: `view`/`reshape` to the same shape and dtype; `contiguous` of a tensor known contiguous;
`to`/`float`/`type_as`/... to the same dtype and device (no `copy=True`, no memory format);
`x * 1`, `1 * x`, `x / 1`, `x + 0`, `0 + x`, `x - 0` where the result has x's shape and dtype
and nobody mutates it in place (`x * 1` is a copy, `x` is not). Shapes and dtypes come from the
fake values dynamo records, compared symbolically. Then dead code goes (`dead_code.py` keeps
what has side effects).
"""

from __future__ import annotations

import torch
import torch.fx

from compiled_serve.passes.base import GraphPass
from compiled_serve.passes.dead_code import eliminate_dead_code, mutates
from compiled_serve.passes.matching import (
    arg,
    binary_operands,
    is_const,
    kind,
    known_contiguous,
    same_dtype_device,
    same_shape,
)


class NoOpEliminationPass(GraphPass):
    name = "noop-elimination"
    phase = "cleanup"
    uuid_modules = ("compiled_serve.passes.matching", "compiled_serve.passes.dead_code")

    def apply(self, gm: torch.fx.GraphModule) -> int:
        removed = 0
        for node in list(gm.graph.nodes):
            source = self.identity_of(node)
            if source is None:
                continue
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            removed += 1
        eliminate_dead_code(gm.graph)
        return removed

    @staticmethod
    def identity_of(node: torch.fx.Node) -> torch.fx.Node | None:
        """The node this one equals, if it is a no-op; else None."""
        op = kind(node)
        if op in ("mul", "div", "add", "sub"):
            return _neutral_operand(node, op)
        if op is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        x = node.args[0]
        if op in ("view", "reshape"):
            return x if same_shape(node, x) and same_dtype_device(node, x) else None
        if op == "contiguous":
            fmt = arg(node, 1, "memory_format", torch.contiguous_format)
            return x if fmt == torch.contiguous_format and known_contiguous(x) else None
        if op == "to":
            if node.kwargs.get("copy") or "memory_format" in node.kwargs:
                return None
            return x if same_dtype_device(node, x) and same_shape(node, x) else None
        return None


def _neutral_operand(node: torch.fx.Node, op: str) -> torch.fx.Node | None:
    """x for `x * 1`, `1 * x`, `x / 1`, `x + 0`, `0 + x`, `x - 0`; else None."""
    if "alpha" in node.kwargs:
        return None
    neutral = 1 if op in ("mul", "div") else 0
    a, b = binary_operands(node)
    if is_const(b, neutral) and _plain_copy(node, a):
        return a
    if op in ("mul", "add") and is_const(a, neutral) and _plain_copy(node, b):
        return b
    return None


def _plain_copy(node: torch.fx.Node, x: object) -> bool:
    """`node` computes a copy of tensor `x` (same shape and dtype) that nobody mutates in place."""
    if not isinstance(x, torch.fx.Node) or not same_shape(node, x) or not same_dtype_device(node, x):
        return False
    return not any(mutates(user) for user in node.users)
