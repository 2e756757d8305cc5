"""Capture a model with dynamo, run the pass list on its graph, compile the result.

`compile_model` returns a callable with the model's `forward(input_ids, positions)` signature.
Dynamo hands our backend the captured fx graph (parameters lifted to inputs); the backend runs
every pass in order, then either compiles with Inductor or runs the rewritten graph as is
("graph" mode, for fast tests). The token dimension is dynamic, so a new batch size does not
recompile. Dynamo would specialise a token count of 1 into a graph of its own; the engine never
passes one (a one-token step is padded to MIN_STEP_TOKENS, compiled_serve/engine/buckets.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx

from compiled_serve.kernels.paged_attention import kv_caches_for_step
from compiled_serve.passes.base import GraphPass, count_ops
from compiled_serve.passes.direct_call import DirectCall, bind_graph_inputs
from compiled_serve.passes.graph_inputs import attach_example_inputs, detach_example_inputs
from compiled_serve.passes.layer_regions import compile_by_layer, regional_compile_enabled
from compiled_serve.passes.manager import PassManager
from compiled_serve.passes.registry import default_pass_manager

logger = logging.getLogger("compiled_serve.passes")


#: Inductor's generated wrapper checks, by default, the size and stride of every extern kernel's
#: output at each call: on the CPU's single-stream step that was ~600 `assert_size_stride` calls,
#: ~0.3 ms of an ~8 ms step (docs/perf-notes.md). They guard Inductor's own codegen, which the
#: parity tests exercise; the step paid them every time. (Alignment checks stay: Triton kernels
#: are specialized on aligned inputs.)
RUNTIME_ASSERTS_OFF = {"size_asserts": False}


def as_pass_manager(passes: PassManager | Sequence[GraphPass] | None) -> PassManager:
    """A pass manager as given; a pass list wrapped in one; None: the default pipeline (registry.py)."""
    if passes is None:
        return default_pass_manager()
    return passes if isinstance(passes, PassManager) else PassManager(passes)


def pipeline_uuids(passes: PassManager | Sequence[GraphPass] | None = None) -> list[tuple[str, str]]:
    """(name, uuid) per pass, in run order, then the Inductor options the backend sets
    (`RUNTIME_ASSERTS_OFF`): what a build key records about the pipeline, so that changing
    either compiles anew instead of serving a build made the other way."""
    options = hashlib.sha256(json.dumps(RUNTIME_ASSERTS_OFF, sort_keys=True).encode()).hexdigest()
    return [*as_pass_manager(passes).uuids(), ("inductor-options", options)]


@dataclass
class CompileReport:
    """What each backend invocation did: one entry per captured graph."""

    graphs: list[dict] = field(default_factory=list)
    # Per graph: its compiled callable with the call's arguments bound to its inputs, or None
    # (direct_call.py; only for a backend told the traced function's argument names).
    direct_calls: list[DirectCall | None] = field(default_factory=list)

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)

    def direct_call(self) -> DirectCall | None:
        """The one compiled graph, callable without dynamo's frame; None unless there is exactly
        one graph and it could be bound."""
        return self.direct_calls[0] if len(self.direct_calls) == 1 and self.num_graphs == 1 else None


def make_backend(passes: PassManager | Sequence[GraphPass], mode: str, report: CompileReport,
                 arg_names: Sequence[str] | None = None) -> Callable:
    """`arg_names`: the traced function's arguments, to bind each graph for a direct call
    (`report.direct_calls`)."""
    from torch._dynamo.aot_compile_types import SerializableCallable

    SerializableCallable.register(GraphCallable)  # what aot_compile accepts from a backend
    manager = as_pass_manager(passes)

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        start = time.perf_counter()
        entry: dict = {"ops_before": count_ops(gm), "matches": {}}
        binding = bind_graph_inputs(gm, example_inputs, arg_names) if arg_names is not None else None
        attach_example_inputs(gm, example_inputs)  # the real inputs, also under an AOT compile
        try:
            entry["matches"] = manager(gm).matches
        finally:
            detach_example_inputs(gm)
        entry["ops_after"] = count_ops(gm)
        if mode == "inductor":
            from torch._inductor import config as inductor_config
            from torch._inductor.compile_fx import compile_fx

            regional = None
            with inductor_config.patch(RUNTIME_ASSERTS_OFF):
                if regional_compile_enabled(example_inputs) and not _WHOLE_GRAPH.get():
                    regional = compile_by_layer(gm, example_inputs, compile_fx)
                if regional is not None:
                    compiled, entry["regions"] = regional
                else:
                    compiled = compile_fx(gm, example_inputs)
        else:
            compiled = GraphCallable(gm)
        entry["seconds"] = time.perf_counter() - start
        report.graphs.append(entry)
        report.direct_calls.append(binding.call(compiled) if binding is not None else None)
        logger.info("compiled %s %d (%s) in %.2fs", manager.label, len(report.graphs) - 1, mode, entry["seconds"])
        return compiled

    return backend


_WHOLE_GRAPH: contextvars.ContextVar[bool] = contextvars.ContextVar("whole_graph_compile", default=False)


@contextlib.contextmanager
def whole_graph_compile() -> Iterator[None]:
    """Backends called inside compile the graph as one Inductor graph, never by layer region: a
    caller that serialises what the backend returns (`aot_compile`, build/precompiled.py) needs
    one compiled graph. Compiling is lazy: the first call of a compiled function must run inside."""
    token = _WHOLE_GRAPH.set(True)
    try:
        yield
    finally:
        _WHOLE_GRAPH.reset(token)


class GraphCallable:
    """The rewritten graph run as is ("graph" mode), in a form an AOT compile can serialise
    (torch's SerializableCallable protocol: the GraphModule pickles as its generated code)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm

    def __call__(self, *args):
        return self.gm.forward(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: GraphCallable) -> bytes:
        import pickle

        return pickle.dumps(fn.gm)

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> GraphCallable:
        import pickle

        return cls(pickle.loads(data))


def compile_model(
    model: torch.nn.Module, mode: str = "inductor", passes: PassManager | Sequence[GraphPass] | None = None
) -> tuple[Callable, CompileReport]:
    """`passes`: a pass manager or a pass list; None = the default pipeline."""
    report = CompileReport()
    backend = make_backend(as_pass_manager(passes), mode, report, arg_names=STEP_ARGS)
    compiled = torch.compile(step_entry_point(model), backend=backend, dynamic=True, fullgraph=True)
    return compiled, report


STEP_ARGS = ("input_ids", "positions")  # step_entry_point's signature


def step_entry_point(model: torch.nn.Module) -> Callable:
    """`model.forward` behind a function with a code object of its own.

    Dynamo keeps compiled graphs, and its recompile budget, per code object. Every model of one
    architecture shares `forward`'s code, so each engine in a process would add its graphs to the
    same cache until `fullgraph=True` hits the recompile limit. A fresh code object per compile
    gives each engine its own cache.

    It also names the step's KV caches (`compiled_serve::step_kv_caches`): read from the forward
    context at call time, they are inputs of the captured graph, so the paged-attention ops can
    take them as arguments and declare their writes. The caller's signature stays
    `(input_ids, positions)`; compile and call it inside `forward_context`.
    """

    def step(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # The forward context's KV caches become graph inputs (PagedAttentionPass wires them).
        torch.ops.compiled_serve.step_kv_caches(kv_caches_for_step())
        return model.forward(input_ids, positions)

    return types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__,
                              step.__closure__)
