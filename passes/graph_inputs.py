"""The real tensor behind a graph input: what a pass reads to see a parameter's data.

Dynamo lifts parameters and buffers into placeholders. Captured the plain way, each placeholder
carries its source and value as `node.meta["grapharg"]`. Captured for an AOT compile
(`torch.compile(...).aot_compile`, what a build that keeps its precompiled step records), the
placeholders carry only fake example values: no grapharg. So a pass that looked only at the
grapharg found no quantized weight there, rewrote nothing, and the step multiplied by the
memory-less placeholders (zeros): a warm start of a quantized model from the build cache gave
garbage. The backend is handed the real inputs either way, one per placeholder in order;
`attach_example_inputs` puts each on its node for the passes, and `detach_example_inputs`
takes them off again before the graph is compiled or serialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx

EXAMPLE_INPUT = "compiled_serve_example_input"


def attach_example_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):  # never seen; without a 1:1 match, attach nothing
        return
    for node, value in zip(placeholders, example_inputs):
        node.meta[EXAMPLE_INPUT] = value


def detach_example_inputs(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta.pop(EXAMPLE_INPUT, None)


def graph_input_value(node: object) -> Any:
    """The real value (a tensor, a parameter, an int) behind a placeholder, or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    if grapharg is not None:
        return grapharg.example
    return node.meta.get(EXAMPLE_INPUT)
