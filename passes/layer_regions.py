"""Regional compilation: Inductor compiles one decoder layer and reuses it for every layer like it.

Inductor's time grows with the graph: the Llama-8B shape's one 32-layer graph took 37 s of a 47 s
cold compile on the H200 (docs/perf-notes.md), though its 32 layers are the same code over
different weights. After the passes ran on the whole graph, `compile_by_layer` splits it at layer
boundaries (each node's `nn_module_stack` names its layer), gives each piece a structural key
(its ops, its wiring, its inputs' dtypes and shapes with symbols renamed in order of appearance),
compiles one piece per key with Inductor and calls that compiled piece for every layer with the
same key. The pieces run in order from a small fx graph: under CUDA graphs they replay as one
graph, on the CPU they cost one Python call per layer.

    pre (embedding, rotary tables) -> layer 0 -> ... -> layer L-1 -> post (what follows, if anything)

Layer 0 compiles on its own (its input norm has no residual to add), and so does the last layer
(it returns the final norm's output and no residual); layers 1..L-2 share one compile: four
Inductor compiles for any depth.

What makes two layers differ keeps them apart: different ops (a model that alternates attention
kinds compiles one piece per kind), graph constants (a quantized model's packed weights are
`get_attr` constants of the graph: every layer is its own piece), different input shapes. A graph
whose nodes cannot be ordered into pre, layers and post (a node of layer i feeding layer j < i) is
compiled whole, as before.

Only CUDA graphs are split by default (`COMPILED_SERVE_REGIONAL_COMPILE` unset or "auto"): there
the pieces replay inside one CUDA graph, while on the CPU each piece is a Python call and an
Inductor graph entry per layer, which made the embedded model's single-stream step 29 ms instead
of 21 (2-core CPU, docs/perf-notes.md). "1" splits on every device (the CPU tests of the split),
"0" on none.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

logger = logging.getLogger("compiled_serve.passes")

_LAYER = re.compile(r"\.layers\.(\d+)(?:\.|$)")


def regional_compile_enabled(example_inputs: Sequence[Any] = ()) -> bool:
    """Whether a graph with these inputs is compiled by region (module doc: CUDA only by default)."""
    setting = os.environ.get("COMPILED_SERVE_REGIONAL_COMPILE", "auto")
    if setting in ("auto", ""):
        return any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs)
    return setting != "0"


def _layer_of(node: torch.fx.Node) -> int | None | str:
    """The layer index a node belongs to, "other" for another module's node, None without a stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    match = _LAYER.search(path)
    return int(match.group(1)) if match else "other"


def layer_partitions(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int] | None:
    """Partition per node: 0 before the layers, i + 1 for layer i, L + 1 after them (often empty: the
    fused add-RMSNorm pass folds the final norm into the last layer's residual add); None when the
    graph has fewer than two layers or its nodes do not fall in that order."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    layers = sorted({k for n in nodes if isinstance(k := _layer_of(n), int)})
    if len(layers) < 2 or layers != list(range(len(layers))):
        return None
    post = len(layers) + 1
    part: dict[torch.fx.Node, int] = {}
    for n in nodes:
        inputs = [part[a] for a in n.all_input_nodes if a in part]
        after = max(inputs, default=0)
        kind = _layer_of(n)
        if n.target is operator.getitem and n.args[0] in part:  # stays with the op whose results it picks
            p = part[n.args[0]]
        elif isinstance(kind, int):
            p = kind + 1
        elif kind == "other":  # a module outside the layers: the embedding before, the final norm after
            p = post if after >= 1 else 0
        else:  # no module (asserts on sizes, ops a pass inserted): with its latest input
            p = after
        if p < after:
            return None
        part[n] = p
    return part


def structural_key(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """Equal for two pieces that one compiled function serves: the same ops in the same wiring
    over inputs of the same kinds, symbols renamed in order of first appearance."""
    symbols: dict[str, str] = {}

    def canon(expr: Any) -> str:
        text = str(expr)
        for name in sorted(re.findall(r"\b[su]\d+\b", text), key=text.index):
            symbols.setdefault(name, f"z{len(symbols)}")
        return re.sub(r"\b[su]\d+\b", lambda m: symbols[m.group(0)], text)

    def describe(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return (f"T({value.dtype},{value.device.type},{[canon(s) for s in value.shape]},"
                    f"{[canon(s) for s in value.stride()]},{canon(value.storage_offset())})")
        if isinstance(value, torch.SymInt):
            return f"S({canon(value)})"
        if isinstance(value, (tuple, list)):
            return type(value).__name__ + "(" + ",".join(describe(v) for v in value) + ")"
        return f"V({value!r})"

    index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def arg(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            return type(a).__name__ + "(" + ",".join(str(arg(x)) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}:{arg(v)}" for k, v in a.items()) + "}"
        return repr(a)

    parts = [describe(v) for v in example_inputs]
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        target = n.target if n.op in ("call_method", "get_attr", "call_module") else _qualified(n.target)
        parts.append(f"{n.op}:{target}:{arg(n.args)}:{arg(n.kwargs)}")
    return "\n".join(parts)


def _return_a_tuple(piece: torch.fx.GraphModule) -> bool:
    """Make a piece that returns one value return a 1-tuple; True if it did."""
    output = piece.graph.output_node()
    if isinstance(output.args[0], (tuple, list)):
        return False
    output.args = ((output.args[0],),)
    piece.recompile()
    return True


def _first(fn: Callable) -> Callable:
    def first(*args: Any) -> Any:
        return fn(*args)[0]

    return first


def _fake_inputs(example_inputs: Sequence[Any], fake_mode: Any) -> list:
    """The graph's inputs as dynamo traced them: the backend is handed the real tensors, whose
    fakes (symbolic sizes included) the tracing context's fake mode keeps."""
    if fake_mode is None:
        return list(example_inputs)
    return [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]


def _qualified(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    return f"{module}.{getattr(fn, '__qualname__', None) or getattr(fn, '__name__', None) or fn}"


def compile_by_layer(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                     compile_piece: Callable[[torch.fx.GraphModule, list], Callable]) -> tuple[Callable, dict] | None:
    """The graph split into pre, layers and post, each distinct piece compiled once by
    `compile_piece(gm, example_inputs)`; None where the graph does not split (compile it whole)."""
    from torch.fx.passes.split_module import split_module

    part = layer_partitions(gm)
    if part is None:
        return None
    start = time.perf_counter()
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    calls: list[tuple[str, str, list, bool]] = []  # (piece, key, example inputs, returns one value)

    class Keys(torch.fx.Interpreter):
        """Runs the pieces on fake inputs, in order: each piece's key and example inputs."""

        def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
            piece = getattr(self.module, target)
            single = _return_a_tuple(piece)  # a compiled graph returns a sequence
            calls.append((target, structural_key(piece, args), list(args), single))
            out = piece(*args)
            return out[0] if single else out

        def get_attr(self, target: str, args: tuple, kwargs: dict) -> Any:
            value = super().get_attr(target, args, kwargs)  # a graph constant (packed weights, a TP shard)
            if fake_mode is None or not isinstance(value, torch.Tensor):
                return value
            return fake_mode.from_tensor(value, static_shapes=True)  # no new symbols: nothing would guard them

    from torch._dispatch.python import enable_python_dispatcher

    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(fake_mode)
            stack.enter_context(enable_python_dispatcher())
        Keys(split).run(*_fake_inputs(example_inputs, fake_mode))
    num_layers = len({k for n in part if isinstance(k := _layer_of(n), int)})
    layer_pieces = {f"submod_{i}" for i in range(1, num_layers + 1)}  # split_module's names
    distinct = len({key for target, key, _, _ in calls if target in layer_pieces})
    if num_layers - distinct < 2:  # layers that share little (graph constants): compile whole
        logger.info("regional compile: %d of %d layers distinct; compiling the graph whole", distinct, num_layers)
        return None
    compiled: dict[str, Callable] = {}
    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        for target, key, args, single in calls:
            fn = compiled.get(key)
            if fn is None:
                fn = compiled[key] = compile_piece(getattr(split, target), args)
            delattr(split, target)
            split.__dict__[target] = _first(fn) if single else fn  # the forward calls self.<target>(...)
    stats = {"pieces": len(calls), "layers": num_layers, "compiled": len(compiled),
             "seconds": time.perf_counter() - start}
    logger.info("regional compile: %d pieces (%d layers), %d compiled, in %.2fs", stats["pieces"], num_layers,
                stats["compiled"], stats["seconds"])
    return split, stats
