"""A compiled step called without dynamo's frame: the call's arguments bound to the graph inputs.

Every call of a `torch.compile`d function goes through dynamo's frame evaluation: the cache
lookup (guards, even under `skip_guard_eval_unsafe`), then the transformed bytecode that gathers
the graph's inputs (on the embedded model's quantized step 247 of them: 182 parameters, 30 KV
caches, 32 sizes, the two step tensors and a buffer) before it calls the compiled graph. On the
2-core CPU's single-stream step that was ~0.5 ms of ~6.9 (docs/perf-notes.md, session 10).

Dynamo hands the backend each graph input's source (`node.meta["grapharg"].source`). Once the
engine's step has its one compiled graph, every input but the step's own arguments comes from
objects fixed for the engine's life (its parameters and buffers, its KV caches and their
sizes), which is the same assumption `skip_guard_eval_unsafe` makes. `GraphInputBinding` keeps
those values and where the arguments and their sizes go; `DirectCall` fills a copy of that list
per call and calls the compiled graph. A graph with any other kind of input (a stride, a size of
something not kept, an input without a source, as under an AOT compile) gets no binding, and the
engine keeps dynamo's path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx


@dataclass(frozen=True)
class GraphInputBinding:
    """Where each of a graph's inputs comes from on a direct call."""

    template: tuple[Any, ...]  # the fixed inputs' values; None where a call fills it in
    arg_slots: tuple[tuple[int, int], ...]  # (input position, argument index)
    size_slots: tuple[tuple[int, int, int], ...]  # (input position, argument index, dim)

    def call(self, compiled: Callable) -> DirectCall:
        return DirectCall(compiled, self)


class DirectCall:
    """`compiled(*graph_inputs)` for a call's arguments, returning what the traced function did."""

    def __init__(self, compiled: Callable, binding: GraphInputBinding):
        self.compiled = compiled
        self.template = list(binding.template)
        self.arg_slots = binding.arg_slots
        self.size_slots = binding.size_slots

    def __call__(self, *args: torch.Tensor) -> Any:
        inputs = self.template.copy()
        for slot, index in self.arg_slots:
            inputs[slot] = args[index]
        for slot, index, dim in self.size_slots:
            inputs[slot] = args[index].shape[dim]
        return self.compiled(*inputs)[0]


def bind_graph_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                      arg_names: Sequence[str]) -> GraphInputBinding | None:
    """The binding of dynamo's graph `gm` (before any pass) to a function of `arg_names`, or None
    where an input is of a kind a direct call cannot fill (module docstring)."""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if len(placeholders) != len(example_inputs) or not isinstance(outputs, (tuple, list)) or len(outputs) != 1:
        return None  # the traced function returns the graph's one output (the step's hidden states)
    sources = []
    for node in placeholders:
        grapharg = node.meta.get("grapharg")
        if grapharg is None or grapharg.source is None:
            return None
        sources.append(grapharg.source)
    by_source = {source.name: value for source, value in zip(sources, example_inputs)}
    template: list[Any] = []
    arg_slots: list[tuple[int, int]] = []
    size_slots: list[tuple[int, int, int]] = []
    for slot, (source, value) in enumerate(zip(sources, example_inputs)):
        if isinstance(source, LocalSource):
            if source.local_name not in arg_names:
                return None
            arg_slots.append((slot, list(arg_names).index(source.local_name)))
            template.append(None)
        elif isinstance(source, TensorPropertySource):
            if source.prop is not TensorProperty.SIZE or source.idx is None:
                return None
            base = source.base
            if isinstance(base, LocalSource):
                if base.local_name not in arg_names:
                    return None
                size_slots.append((slot, list(arg_names).index(base.local_name), source.idx))
                template.append(None)
            else:  # the size of a kept tensor (a KV cache's block count): fixed with it
                tensor = by_source.get(base.name)
                if not isinstance(tensor, torch.Tensor):
                    return None
                template.append(int(tensor.shape[source.idx]))
        elif isinstance(value, torch.Tensor):
            template.append(value)
        else:
            return None  # a Python number or a symbolic value from elsewhere
    return GraphInputBinding(tuple(template), tuple(arg_slots), tuple(size_slots))
