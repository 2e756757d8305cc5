"""The logits tail's own compile: dynamo capture, a small pass pipeline, the fused sampler.

`compile_logits_tail(mode, device)` returns a callable with `logits_tail`'s signature
(kernels/logits_tail.py) and a `CompileReport`. Its pipeline is not the model's:
that one's paged-attention pass is required and finds nothing here. This one is no-op
elimination, then `FusedSamplingPass` (required), so a compiled tail always samples through
`compiled_serve::fused_sample`. Its `uuids()` go into the engine's build key beside the model's,
as "logits-tail/<pass>" (`EnginePasses`).

Sizes are reasoned about size-obliviously, so one graph serves every batch size, one row
included; the penalty groups being given or None make the other graphs (four at most).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compiled_serve.kernels.logits_tail import logits_tail
from compiled_serve.passes.fused_sampling import FusedSamplingPass
from compiled_serve.passes.manager import PassManager
from compiled_serve.passes.noop_elimination import NoOpEliminationPass
from compiled_serve.passes.pipeline import CompileReport, make_backend, pipeline_uuids

TAIL_PREFIX = "logits-tail/"


def logits_tail_pass_manager() -> PassManager:
    """No-op elimination (the `.float()` of float32 logits), then the required fused-sampling pass."""
    return PassManager([NoOpEliminationPass(), FusedSamplingPass()], label="logits-tail graph")


def compile_logits_tail(
    mode: str = "graph", manager: PassManager | None = None
) -> tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], CompileReport]:
    """(compiled tail, report). mode: "inductor", or "graph" to run the rewritten graph as is."""
    report = CompileReport()
    backend = make_backend(manager if manager is not None else logits_tail_pass_manager(), mode, report)
    compiled = torch.compile(_own_entry_point(), backend=backend, dynamic=True, fullgraph=True)

    def tail(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with size_oblivious():  # no graph of its own for one row
            return compiled(*args)

    tail.compiled = compiled  # type: ignore[attr-defined]  (for an AOT compile: compiled_serve.build.precompiled)
    return tail, report


def size_oblivious() -> contextlib.AbstractContextManager:
    """The config the tail is traced under: sizes reasoned about size-obliviously (one row included)."""
    from torch.fx.experimental import _config as fx_config

    return fx_config.patch(backed_size_oblivious=True)


@dataclass(frozen=True)
class EnginePasses:
    """The model's pass pipeline and the tail's, as the one `uuids()` an engine's build key reads."""

    model: object  # a PassManager or pass list (what `pipeline_uuids` takes)
    tail: PassManager

    def uuids(self) -> list[tuple[str, str]]:
        """The model's (name, uuid) pairs, then the tail's with their names under TAIL_PREFIX."""
        return pipeline_uuids(self.model) + [(TAIL_PREFIX + name, uuid) for name, uuid in self.tail.uuids()]


def _own_entry_point() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`logits_tail` behind a fresh code object: dynamo keeps graphs (and its recompile budget)
    per code object, so every engine in a process gets a cache of its own (see pipeline.py)."""
    code = logits_tail.__code__.replace()
    return types.FunctionType(code, logits_tail.__globals__, logits_tail.__name__, logits_tail.__defaults__,
                              logits_tail.__closure__)
