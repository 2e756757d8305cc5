"""Capture a model with dynamo, run the pass list on its graph, compile the result.

`compile_model` returns a callable with the model's `forward(input_ids, positions)` signature.
Dynamo hands our backend the captured fx graph (parameters lifted to inputs); the backend runs
every pass in order, then either compiles with Inductor or runs the rewritten graph as is
("graph" mode, for fast tests). The token dimension is dynamic, so a new batch size does not
recompile (dynamo specializes a size of 1 once, which is the decode-of-one case).
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx

from compiled_serve.passes.base import GraphPass, count_ops
from compiled_serve.passes.paged_attention import PagedAttentionPass

logger = logging.getLogger("compiled_serve.passes")


def default_passes() -> list[GraphPass]:
    return [PagedAttentionPass()]


def default_pipeline() -> Callable[[torch.fx.GraphModule], dict[str, int]]:
    """What the backend runs on each captured graph: `gm -> {pass name: matches}`.

    Seam: once `passes/manager.py` provides `default_pass_manager()` (callable on a graph module,
    with `uuids()`), this is where it plugs in; until then the plain pass list is run in order.
    """
    manager = _pass_manager()
    if manager is not None:
        return _as_pipeline(manager)
    return _as_pipeline(default_passes())


def pipeline_uuids(pipeline: object | None = None) -> list[tuple[str, str]]:
    """(name, uuid) per pass, in order: what a build key records about the pass pipeline."""
    if pipeline is None:
        manager = _pass_manager()
        pipeline = manager if manager is not None else default_passes()
    uuids = getattr(pipeline, "uuids", None)
    if callable(uuids):
        return [(str(name), str(uuid)) for name, uuid in uuids()]
    return [(p.name, p.uuid()) for p in pipeline]  # type: ignore[attr-defined]


def _pass_manager() -> object | None:
    try:
        from compiled_serve.passes.manager import default_pass_manager  # type: ignore[import-not-found]
    except ImportError:
        return None
    return default_pass_manager()


def _as_pipeline(passes: object) -> Callable[[torch.fx.GraphModule], dict[str, int]]:
    if isinstance(passes, (list, tuple)):
        pass_list: list[GraphPass] = list(passes)
        return lambda gm: {p.name: p(gm) for p in pass_list}

    def run_manager(gm: torch.fx.GraphModule) -> dict[str, int]:
        result = passes(gm)  # type: ignore[operator]
        matches = getattr(result, "matches", result)  # a PassReport, or a plain {name: matches}
        return dict(matches) if isinstance(matches, Mapping) else {"passes": int(matches or 0)}

    return run_manager


@dataclass
class CompileReport:
    """What each backend invocation did: one entry per captured graph."""

    graphs: list[dict] = field(default_factory=list)

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)


def make_backend(passes: Sequence[GraphPass] | Callable, mode: str, report: CompileReport) -> Callable:
    pipeline = _as_pipeline(passes)

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        start = time.perf_counter()
        entry: dict = {"ops_before": count_ops(gm), "matches": {}}
        entry["matches"] = pipeline(gm)
        entry["ops_after"] = count_ops(gm)
        if mode == "inductor":
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, example_inputs)
        else:
            compiled = gm.forward
        entry["seconds"] = time.perf_counter() - start
        report.graphs.append(entry)
        logger.info("compiled graph %d in %.2fs: %s", len(report.graphs), entry["seconds"], entry["matches"])
        return compiled

    return backend


def compile_model(
    model: torch.nn.Module, mode: str = "inductor", passes: Sequence[GraphPass] | Callable | None = None
) -> tuple[Callable, CompileReport]:
    """`passes`: a pass list or a pass manager; None = the default pipeline."""
    report = CompileReport()
    backend = make_backend(passes if passes is not None else default_pipeline(), mode, report)
    compiled = torch.compile(_own_entry_point(model), backend=backend, dynamic=True, fullgraph=True)
    return compiled, report


def _own_entry_point(model: torch.nn.Module) -> Callable:
    """`model.forward` behind a function with a code object of its own.

    Dynamo keeps compiled graphs, and its recompile budget, per code object. Every model of one
    architecture shares `forward`'s code, so each engine in a process would add its graphs to the
    same cache until `fullgraph=True` hits the recompile limit. A fresh code object per compile
    gives each engine its own cache.
    """

    def step(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model.forward(input_ids, positions)

    return types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__,
                              step.__closure__)
