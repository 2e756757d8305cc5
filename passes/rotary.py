"""RotaryPass: RoPE on q and k (cos/sin tables + rotate_half) becomes one custom op per layer.

Before (LlamaAttention as dynamo captures it; the tables are computed once for all layers):
    freqs = positions[:, None].float() * inv_freq[None, :]          # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]             # [T, 1, D]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    x1, x2 = q.chunk(2, dim=-1)                                     # q: [T, H, D]
    q_rot = q * cos + torch.cat((-x2, x1), dim=-1) * sin
    ... the same for k: [T, KVH, D] ...
    o = compiled_serve.causal_attention(q_rot, k_rot, v, scale)
After:
    cos_sin_cache = RotaryPass.rope_cos_sin_cache(freqs, dtype)      # [T, D]: cos | sin (once)
    rows = RotaryPass.token_rows(freqs)                              # [T]: 0..T-1 (once)
    rot = compiled_serve.rotary_embedding(rows, q, k, cos_sin_cache, True)
    o = compiled_serve.causal_attention(rot[0], rot[1], v, scale)

Why a per-step table: a pass sees a graph, not the config, so the model's own `freqs` (positions
times inv_freq, Llama 3.1 scaling included) is the only truth about its frequencies; the table
holds exactly the cos/sin values the model would have computed, rounded as it rounds them, one
row per token, and the op gathers row i for token i. q and k are paired through the attention op
that reads them (its first two arguments, before or after PagedAttentionPass). A rotation whose
partner is not rotated with the same table, or only part of whose head dim rotates, is left as is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

import compiled_serve.kernels.rotary  # noqa: F401  (registers the op)
from compiled_serve.passes.base import GraphPass, op_name
from compiled_serve.passes.dead_code import eliminate_dead_code
from compiled_serve.passes.matching import (
    binary_operands,
    copy_meta,
    dims,
    halves,
    is_halving,
    kind,
    last_dim,
    order,
    same_dtype_device,
    strip_casts,
    tensor_meta,
    value,
)

_ATTENTION = ("compiled_serve::causal_attention", "compiled_serve::paged_attention")


class Rotation:
    """`out = x * cos + rotate_half(x) * sin`, with cos/sin = cast(cos/sin(cat(freqs, freqs)))."""

    def __init__(self, x: torch.fx.Node, freqs: torch.fx.Node, dtype: torch.dtype, out: torch.fx.Node):
        self.x, self.freqs, self.dtype, self.out = x, freqs, dtype, out


def _rotate_half_of(node: object) -> torch.fx.Node | None:
    """x for `torch.cat((-x2, x1), -1)` with `x1, x2 = x.chunk(2, -1)`."""
    if kind(node) != "cat":
        return None
    assert isinstance(node, torch.fx.Node)
    parts = node.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or kind(parts[0]) != "neg":
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    x2, x1 = parts[0].args[0], parts[1]
    h1, h2 = halves(x1), halves(x2)
    if h1 is None or h2 is None or h1[1] is not h2[1] or (x1.args[1], x2.args[1]) != (0, 1):
        return None
    x, split = h1
    return x if is_halving(split) and last_dim(dim, node) else None


def _table_freqs(node: object, trig: str) -> torch.fx.Node | None:
    """freqs for `cast(trig(cat((freqs, freqs), -1)[:, None, :]))`."""
    node = strip_casts(node)
    if kind(node) != trig:
        return None
    emb = node.args[0]
    while kind(emb) in ("getitem", "unsqueeze", "view", "reshape") and kind(emb.args[0]) != "chunk":
        emb = emb.args[0]
    if kind(emb) != "cat":
        return None
    parts = emb.args[0]
    dim = emb.args[1] if len(emb.args) > 1 else emb.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or parts[0] is not parts[1]:
        return None
    return parts[0] if last_dim(dim, emb) else None


def match_rotation(add: torch.fx.Node) -> Rotation | None:
    if kind(add) != "add":
        return None
    for plain, rotated in (binary_operands(add), binary_operands(add)[::-1]):
        if kind(plain) != "mul" or kind(rotated) != "mul":
            continue
        a, b = binary_operands(rotated)
        half, sin = (a, b) if kind(a) == "cat" else (b, a)
        x = _rotate_half_of(half)
        if x is None:
            continue
        p, q = binary_operands(plain)
        cos = q if p is x else p if q is x else None
        freqs = _table_freqs(cos, "cos")
        if freqs is None or _table_freqs(sin, "sin") is not freqs:
            continue
        xt, ct, ft = tensor_meta(x), tensor_meta(cos), tensor_meta(freqs)
        if xt is None or ct is None or ft is None or xt.dim() != 3:
            continue
        # cos: [T, 1, D] broadcast over heads; freqs: [T, D/2]; the whole head dim rotates.
        if dims(ct.shape) != (dims(xt.shape)[0], 1, dims(xt.shape)[2]) or ft.dim() != 2:
            continue
        if dims(ft.shape) != (dims(xt.shape)[0], xt.shape[2] // 2) or not same_dtype_device(add, x):
            continue
        return Rotation(x, freqs, ct.dtype, add)
    return None


class RotaryPass(GraphPass):
    name = "rotary"
    phase = "rewrite"
    # Opt-in (`--pass NAME`): measured on the H100, Inductor fuses the same ops as fast under CUDA
    # graphs, and the custom op costs host time on graph-less steps (docs/perf-notes.md).
    devices: tuple[str, ...] = ()
    uuid_modules = ("compiled_serve.passes.matching", "compiled_serve.passes.dead_code")

    @staticmethod
    def rope_cos_sin_cache(freqs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # freqs: [T, D/2] -> [T, D]: cos | sin, rounded to the dtype the model rounds them to
        return torch.cat((freqs.cos().to(dtype), freqs.sin().to(dtype)), dim=-1)

    @staticmethod
    def token_rows(freqs: torch.Tensor) -> torch.Tensor:
        # [T]: row i of the per-step table belongs to token i
        return torch.arange(freqs.shape[0], device=freqs.device)

    def apply(self, gm: torch.fx.GraphModule) -> int:
        graph = gm.graph
        rotations = {r.out: r for r in map(match_rotation, graph.nodes) if r is not None}
        tables: dict[tuple[torch.fx.Node, torch.dtype], tuple[torch.fx.Node, torch.fx.Node]] = {}
        matches = 0
        for attention in list(graph.nodes):
            if attention.op != "call_function" or op_name(attention.target) not in _ATTENTION:
                continue
            q, k = rotations.get(attention.args[0]), rotations.get(attention.args[1])
            if q is None or k is None or q.freqs is not k.freqs or q.dtype != k.dtype:
                continue
            rows_table = tables.get((q.freqs, q.dtype))
            if rows_table is None:
                with graph.inserting_after(q.freqs):
                    table = graph.call_function(self.rope_cos_sin_cache, (q.freqs, q.dtype))
                with graph.inserting_after(table):
                    rows = graph.call_function(self.token_rows, (q.freqs,))
                rows_table = tables[(q.freqs, q.dtype)] = (rows, table)
            if self._rewrite(graph, q, k, *rows_table):
                matches += 1
        eliminate_dead_code(graph)
        return matches

    @staticmethod
    def _rewrite(graph: torch.fx.Graph, q: Rotation, k: Rotation, rows: torch.fx.Node,
                 table: torch.fx.Node) -> bool:
        # Place the op after its last input; every reader of q_rot/k_rot must come later.
        pos = order(graph)
        anchor = max((q.x, k.x, table, rows), key=pos.__getitem__)
        readers = [u for r in (q, k) for u in r.out.users]
        if any(pos[u] <= pos[anchor] for u in readers):
            return False
        with graph.inserting_after(anchor):
            rot = graph.call_function(torch.ops.compiled_serve.rotary_embedding.default,
                                      (rows, q.x, k.x, table, True))
        rot.meta["example_value"] = (value(q.out), value(k.out))
        with graph.inserting_after(rot):
            q_rot = graph.call_function(operator.getitem, (rot, 0))
        with graph.inserting_after(q_rot):
            k_rot = graph.call_function(operator.getitem, (rot, 1))
        for new, old in ((q_rot, q.out), (k_rot, k.out)):
            copy_meta(new, old)
            old.replace_all_uses_with(new)
        return True

