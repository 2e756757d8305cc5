"""The Inductor options the backend sets (passes/pipeline.py RUNTIME_ASSERTS_OFF): the generated
step has no per-call size/stride asserts, and a plain torch.compile of the same function does."""

from __future__ import annotations

import torch
from torch._inductor.utils import run_and_get_code

from compiled_serve.passes.pipeline import CompileReport, make_backend


def _step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.mm(x, w) + 1.0)  # mm is an extern kernel: Inductor asserts its output


def test_the_backends_step_carries_no_size_asserts_where_inductors_default_does() -> None:
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    torch._dynamo.reset()
    backend = make_backend([], "inductor", CompileReport())
    out, ours = run_and_get_code(torch.compile(_step, backend=backend, dynamic=True), x, w)
    torch._dynamo.reset()
    ref, default = run_and_get_code(torch.compile(_step, dynamic=True), x, w)
    assert torch.allclose(out, ref) and torch.allclose(out, _step(x, w))
    assert "assert_size_stride(" in "".join(default)
    assert "assert_size_stride(" not in "".join(ours)
