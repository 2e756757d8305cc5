"""SiluMulPass: SiLU(gate) * up over the packed gate|up projection becomes one custom op.

Before (LlamaMLP as dynamo captures it):
    gate_up = linear(x, gate_up_weight)              # [T, 2 * inter]
    chunk = gate_up.chunk(2, dim=-1)                 # or gate_up.split([inter, inter], -1)
    gate, up = chunk[0], chunk[1]                    # [T, inter] each
    out = F.silu(gate) * up                          # [T, inter]  (either operand order)
After:
    out = compiled_serve.silu_and_mul(gate_up)       # [T, inter]

Only the packed form is taken: gate and up must be the first and second half of one tensor's
last dim, since that is what the op reads. Two separate projections are left alone.
"""

from __future__ import annotations

import torch
import torch.fx

import compiled_serve.kernels.activation  # noqa: F401  (registers the op)
from compiled_serve.passes.base import GraphPass
from compiled_serve.passes.dead_code import eliminate_dead_code
from compiled_serve.passes.matching import (
    arg,
    copy_meta,
    halves,
    is_halving,
    kind,
    other_operand,
    same_dtype_device,
)


def match_silu_mul(silu: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(gate_up, out) for `out = silu(gate_up half 0) * (gate_up half 1)`, or None."""
    if kind(silu) != "silu" or arg(silu, 1, "inplace", False):
        return None
    gate = silu.args[0]
    found = halves(gate)
    if found is None or gate.args[1] != 0:
        return None
    gate_up, split = found
    if not is_halving(split):
        return None
    for out in silu.users:
        up = other_operand(out, silu) if kind(out) == "mul" else None
        if kind(up) == "getitem" and up.args[0] is split and up.args[1] == 1 and same_dtype_device(out, gate_up):
            return gate_up, out
    return None


class SiluMulPass(GraphPass):
    name = "silu-mul"
    phase = "rewrite"
    # Opt-in (`--pass NAME`): measured on the H100, Inductor fuses the same ops as fast under CUDA
    # graphs, and the custom op costs host time on graph-less steps (docs/perf-notes.md).
    devices: tuple[str, ...] = ()
    uuid_modules = ("compiled_serve.passes.matching", "compiled_serve.passes.dead_code")

    def apply(self, gm: torch.fx.GraphModule) -> int:
        matches = 0
        for node in list(gm.graph.nodes):
            found = match_silu_mul(node)
            if found is None:
                continue
            gate_up, out = found
            with gm.graph.inserting_before(out):
                new = gm.graph.call_function(torch.ops.compiled_serve.silu_and_mul.default, (gate_up,))
            copy_meta(new, out)
            out.replace_all_uses_with(new)
            matches += 1
        eliminate_dead_code(gm.graph)
        return matches
