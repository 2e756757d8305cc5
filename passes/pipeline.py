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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx

from compiled_serve.passes.base import GraphPass, count_ops
from compiled_serve.passes.paged_attention import PagedAttentionPass

logger = logging.getLogger("compiled_serve.passes")


def default_passes() -> list[GraphPass]:
    return [PagedAttentionPass()]


@dataclass
class CompileReport:
    """What each backend invocation did: one entry per captured graph."""

    graphs: list[dict] = field(default_factory=list)

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)


def make_backend(passes: Sequence[GraphPass], mode: str, report: CompileReport) -> Callable:
    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        start = time.perf_counter()
        entry: dict = {"ops_before": count_ops(gm), "matches": {}}
        for p in passes:
            entry["matches"][p.name] = p(gm)
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
    model: torch.nn.Module, mode: str = "inductor", passes: Sequence[GraphPass] | None = None
) -> tuple[Callable, CompileReport]:
    report = CompileReport()
    backend = make_backend(list(passes) if passes is not None else default_passes(), mode, report)
    compiled = torch.compile(model.forward, backend=backend, dynamic=True, fullgraph=True)
    return compiled, report
