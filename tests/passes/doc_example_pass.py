"""The example pass that docs/passes.md shows verbatim (tests/passes/test_doc_example_pass.py checks)."""

# --- begin doc example ---
from __future__ import annotations

import operator

import torch.fx

from compiled_serve.passes.base import GraphPass
from compiled_serve.passes.matching import kind


class DoubleToAddPass(GraphPass):
    """`x * 2` becomes `x + x`: the same value, an add instead of a multiply."""

    name = "double-to-add"
    phase = "rewrite"  # "cleanup" | "rewrite" | "fixup"

    def apply(self, gm: torch.fx.GraphModule) -> int:
        matches = 0
        for node in list(gm.graph.nodes):
            if kind(node) != "mul" or node.args[1] != 2 or not isinstance(node.args[0], torch.fx.Node):
                continue
            x = node.args[0]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(operator.add, (x, x))
            new.meta.update(node.meta)  # keeps the fake value later passes read shapes from
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            matches += 1
        return matches  # logged by the base class; the manager records it in the report
# --- end doc example ---
