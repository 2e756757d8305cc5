"""Tensor parallelism in the compile pipeline: the pass lists and the sharded logits graph.

The step graph gets `TensorParallelPass` after every other pass (it changes shapes that it does
not re-propagate). `compute_logits` runs outside the step graph, so under TP it is captured on
its own and gets the pass alone: lm_head (or the tied embedding) becomes vocab-parallel with one
all-gather, and every rank returns the full logits [n, vocab].
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from compiled_serve.passes.manager import PassManager
from compiled_serve.passes.pipeline import CompileReport, make_backend
from compiled_serve.passes.tensor_parallel import TensorParallelPass


def with_tensor_parallel(manager: PassManager, rank: int, world_size: int) -> PassManager:
    """`manager`'s passes plus TensorParallelPass, last (same dump dir)."""
    return PassManager([*manager.passes, TensorParallelPass(rank, world_size)], dump_dir=manager.dump_dir)


def compile_logits(model: torch.nn.Module, rank: int, world_size: int, mode: str = "graph") -> tuple[Callable, CompileReport]:
    """`model.compute_logits` captured and sharded for one rank: hidden [n, h] -> logits [n, V] float32."""

    compute = type(model).compute_logits  # the class's: an engine may shadow the instance's (tp_engine.py)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        return compute(model, hidden)

    # A code object of its own, as step_entry_point does: dynamo's graph cache is per code object.
    fresh = types.FunctionType(logits.__code__.replace(), logits.__globals__, logits.__name__,
                               logits.__defaults__, logits.__closure__)
    report = CompileReport()
    backend = make_backend(PassManager([TensorParallelPass(rank, world_size)]), mode, report)
    return torch.compile(fresh, backend=backend, dynamic=True, fullgraph=True), report
