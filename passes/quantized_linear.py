"""QuantizedLinearPass: each `linear` on a quantized weight becomes that layout's op.

A quantized model keeps plain `nn.Linear` layers whose weight is a memory-less placeholder
carrying a `QuantizedWeight` (models/quantized.py). Dynamo lifts the placeholder into the graph
as an input; the pass reads the real tensor behind it (passes/graph_inputs.py), stores
the quantized tensors on the graph module as buffers, and rewrites the call:

Before (a layer as dynamo captures it):
    out = linear(x, w_placeholder, bias)                     # [T, N]
After, by layout:
    int4: out = int4_linear(x, packed, scales_zeros, 32) + bias   (torch's int4 kernel, called
          from the compiled graph directly; the casts around it are torch ops)
    int8: out = int8_linear(x, weight_int8, scales) + bias        (torch's int8 kernel, the same way)
    q8b:  out = blockwise_int8_linear(x, codes, scales) + bias   (torch ops; Inductor fuses)
    bf16: out = bf16_weight_linear(x, weight_bf16) + bias        (torch ops)
    fp8:  out = fp8_weight_linear(x, weight_e4m3, scales) + bias   (torch ops around the
          opaque compiled_serve.fp8_mm GEMM; CUDA)

Required: a graph whose placeholders carry quantized weights must have every use of them
rewritten, or compilation fails (the placeholder reads as zeros). A graph without quantized
weights is left alone (0 matches), so the pass can sit in any pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F

from compiled_serve.errors import CompilationError
from compiled_serve.kernels.quantized_linear import (
    bf16_weight_linear,
    blockwise_int8_linear,
    fp8_weight_linear,
    int4_linear,
    int8_linear,
)
from compiled_serve.models.quantized import QuantizedWeight, quantized_weight_of
from compiled_serve.passes.base import GraphPass
from compiled_serve.passes.dead_code import eliminate_dead_code
from compiled_serve.passes.graph_inputs import graph_input_value

_LINEAR_TARGETS = (torch._C._nn.linear, F.linear)

# layout -> (graph target, names of its weight tensors in call order)
_OPS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "int4": (int4_linear, ("packed", "scales_zeros")),
    "int8": (int8_linear, ("weight", "scales")),
    "q8b": (blockwise_int8_linear, ("codes", "scales")),
    "bf16": (bf16_weight_linear, ("weight",)),
    "fp8": (fp8_weight_linear, ("weight", "scales")),
}


def placeholder_quantized_weight(node: object) -> QuantizedWeight | None:
    """The QuantizedWeight behind a graph input, or None."""
    value = graph_input_value(node)
    return quantized_weight_of(value) if value is not None else None


def linear_operands(node: torch.fx.Node) -> tuple[object, object, object] | None:
    """(x, weight, bias) of a `linear` call, or None."""
    if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    return (node.kwargs.get("input", args[0]), node.kwargs.get("weight", args[1]),
            node.kwargs.get("bias", args[2]))


class QuantizedLinearPass(GraphPass):
    name = "quantized-linear"
    phase = "rewrite"
    devices: tuple[str, ...] = ("cpu", "cuda")  # int4/int8/q8b on the CPU, fp8 on CUDA
    uuid_modules = ("compiled_serve.kernels.quantized_linear", "compiled_serve.models.quantized")

    def apply(self, gm: torch.fx.GraphModule) -> int:
        graph = gm.graph
        buffers: dict[int, list[torch.fx.Node]] = {}  # id(QuantizedWeight) -> its get_attr nodes
        matches = 0
        for node in list(graph.nodes):
            operands = linear_operands(node)
            qweight = placeholder_quantized_weight(operands[1]) if operands else None
            if operands is None or qweight is None:
                continue
            x, weight, bias = operands
            fn, names = _OPS[qweight.layout]
            with graph.inserting_before(node):
                if id(qweight) not in buffers:
                    buffers[id(qweight)] = [self._buffer(gm, qweight.tensors[n], f"{weight.name}_{n}") for n in names]
                args = (x, *buffers[id(qweight)])
                if qweight.layout == "int4":
                    args = (*args, qweight.group_size)
                new = graph.call_function(fn, args)
                if bias is not None:
                    new = graph.call_function(torch.add, (new, bias))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            matches += 1
        eliminate_dead_code(graph)
        left = [n.name for n in graph.nodes if n.users and placeholder_quantized_weight(n) is not None]
        if left:
            raise CompilationError(
                f"{self.name}: quantized weights used by something other than linear: {left[:5]}; "
                "their placeholders hold no values")
        return matches

    @staticmethod
    def _buffer(gm: torch.fx.GraphModule, tensor: torch.Tensor, name: str) -> torch.fx.Node:
        gm.register_buffer(name, tensor, persistent=False)
        # AOT autograd maps every attribute of a dynamo graph to a source (for its input
        # dedup guards); a constant source names the new one.
        sources = getattr(gm, "_param_name_to_source", None)
        if sources is not None:
            from torch._dynamo.source import ConstantSource

            sources[name] = ConstantSource(f"quantized_{name}")
        return gm.graph.get_attr(name)

    def __call__(self, gm: torch.fx.GraphModule) -> int:
        """Fails when the graph has quantized weights and none was rewritten (base: `required`)."""
        has_quantized = any(placeholder_quantized_weight(n) is not None for n in gm.graph.nodes)
        matches = super().__call__(gm)
        if has_quantized and matches == 0:
            raise CompilationError(f"{self.name}: the graph has quantized weights but no linear on them")
        return matches
