"""FusedAddRMSNormPass: RMSNorm (and the residual add before it) becomes one custom op.

Before (a Llama decoder as dynamo captures it; `.float()`/`.to()` are gone in fp32 after no-op
elimination, and the matcher takes them either way):
    h = hidden + attn_out                            # [T, hidden], the residual stream
    x = h.float()
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-05)   # [T, 1]
    normed = weight * (x * r).to(torch.bfloat16)     # weight: [hidden]
    ... normed ...; ... h ...                        # h also feeds the next residual add
After:
    fused = compiled_serve.fused_add_rms_norm(attn_out, hidden, weight, 1e-05)
    normed, h = fused[0], fused[1]

An RMSNorm whose input is not a same-shape tensor add (the first layer's input norm, Qwen3's
per-head q/k norms on [T, heads, head_dim]) becomes `compiled_serve.rms_norm(x, weight, eps)`.
Matches = fused + plain sites. The result must keep the input's dtype (the model casts back
before the weight multiply); a norm that promotes is left alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

import compiled_serve.kernels.fused_norm  # noqa: F401  (registers the ops)
from compiled_serve.passes.base import GraphPass
from compiled_serve.passes.dead_code import eliminate_dead_code
from compiled_serve.passes.matching import (
    arg,
    binary_operands,
    copy_meta,
    dims,
    kind,
    last_dim,
    other_operand,
    same_dtype_device,
    same_shape,
    strip_casts,
    tensor_meta,
    value,
)


class RMSNormSite:
    """One matched norm: `out = weight * cast(x * rsqrt(mean(x ** 2, -1) + eps))`, x = cast(h)."""

    def __init__(self, h: torch.fx.Node, weight: torch.fx.Node, eps: float, out: torch.fx.Node):
        self.h, self.weight, self.eps, self.out = h, weight, eps, out


def match_rms_norm(rsqrt: torch.fx.Node) -> RMSNormSite | None:
    """The norm around an `rsqrt` node, or None."""
    if kind(rsqrt) != "rsqrt":
        return None
    add = rsqrt.args[0]
    if kind(add) != "add":
        return None
    a, b = binary_operands(add)
    mean, eps = (a, b) if kind(a) == "mean" else (b, a)
    if kind(mean) != "mean" or not isinstance(eps, float):
        return None
    dim = arg(mean, 1, "dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if not arg(mean, 2, "keepdim", False) or kind(mean.args[0]) != "pow":
        return None
    pow_ = mean.args[0]
    x = pow_.args[0]
    if arg(pow_, 1, "exponent") != 2 or not last_dim(dim, x):
        return None
    scaled = next((u for u in rsqrt.users if kind(u) == "mul" and other_operand(u, rsqrt) is x), None)
    if scaled is None or len(scaled.users) != 1:
        return None
    tail = next(iter(scaled.users))
    if kind(tail) == "to" and len(tail.users) == 1:
        cast, tail = tail, next(iter(tail.users))
    else:
        cast = scaled
    weight = other_operand(tail, cast) if kind(tail) == "mul" else None
    h = strip_casts(x)
    w = tensor_meta(weight)
    xt = tensor_meta(x)
    if w is None or xt is None or dims(w.shape) != dims(xt.shape[-1:]):
        return None
    if not (same_shape(tail, h) and same_dtype_device(tail, h)):
        return None
    return RMSNormSite(h, weight, eps, tail)


class FusedAddRMSNormPass(GraphPass):
    name = "fused-add-rms-norm"
    phase = "rewrite"
    # Opt-in (`--pass NAME`): measured on the H100, Inductor fuses the same ops as fast under CUDA
    # graphs, and the custom op costs host time on graph-less steps (docs/perf-notes.md).
    devices: tuple[str, ...] = ()
    uuid_modules = ("compiled_serve.passes.matching", "compiled_serve.passes.dead_code")

    def apply(self, gm: torch.fx.GraphModule) -> int:
        self.fused = self.plain = 0
        for node in list(gm.graph.nodes):
            site = match_rms_norm(node)
            if site is None:
                continue
            if self._residual_add(site.h) is not None:
                self._fuse(gm.graph, site)
                self.fused += 1
            else:
                with gm.graph.inserting_before(site.out):
                    new = gm.graph.call_function(
                        torch.ops.compiled_serve.rms_norm.default, (site.h, site.weight, site.eps))
                copy_meta(new, site.out)
                site.out.replace_all_uses_with(new)
                self.plain += 1
        eliminate_dead_code(gm.graph)
        return self.fused + self.plain

    @staticmethod
    def _residual_add(h: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
        """(x, residual) when h = residual + x, both tensors of h's shape and dtype (no broadcast)."""
        if kind(h) != "add" or "alpha" in h.kwargs:
            return None
        residual, x = binary_operands(h)
        for t in (residual, x):
            if not isinstance(t, torch.fx.Node) or not (same_shape(t, h) and same_dtype_device(t, h)):
                return None
        return x, residual

    def _fuse(self, graph: torch.fx.Graph, site: RMSNormSite) -> None:
        pair = self._residual_add(site.h)
        assert pair is not None
        x, residual = pair
        # Right after h: every reader of h (and of the norm, which comes later) sees the new nodes.
        with graph.inserting_after(site.h):
            fused = graph.call_function(
                torch.ops.compiled_serve.fused_add_rms_norm.default, (x, residual, site.weight, site.eps))
        with graph.inserting_after(fused):
            normed = graph.call_function(operator.getitem, (fused, 0))
        with graph.inserting_after(normed):
            new_residual = graph.call_function(operator.getitem, (fused, 1))
        copy_meta(normed, site.out)
        copy_meta(new_residual, site.h)
        copy_meta(fused, site.h)
        for key in ("val", "example_value"):
            if key in fused.meta:
                fused.meta[key] = (value(site.out), value(site.h))
        site.out.replace_all_uses_with(normed)
        site.h.replace_all_uses_with(new_residual)

