"""passes/direct_call.py: a compiled graph called with the call's arguments bound to its inputs
gives what dynamo's call of the same compiled function gives (outputs and in-place writes), for
token counts other than the traced one; graphs a direct call cannot fill get no binding."""

from __future__ import annotations

import torch

from compiled_serve.passes.pipeline import CompileReport, make_backend

ARGS = ("input_ids", "positions")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("scale", torch.tensor([0.5]))
        self.cache = torch.zeros(64, 8)  # written in place, as the KV caches are

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(input_ids)) * self.scale + positions[:, None].float()
        self.cache.index_copy_(0, positions, h)
        return h * input_ids.shape[0]


def _compiled(model: torch.nn.Module, mode: str = "graph"):
    report = CompileReport()
    backend = make_backend([], mode, report, arg_names=ARGS)

    def step(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model(input_ids, positions)

    return torch.compile(step, backend=backend, dynamic=True, fullgraph=True), report


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n) % 32, torch.arange(n) * 2


@torch.inference_mode()
def test_a_direct_call_gives_dynamos_outputs_and_writes() -> None:
    torch.manual_seed(0)
    model = Tiny()
    compiled, report = _compiled(model)
    compiled(*_inputs(5))
    direct = report.direct_call()
    assert direct is not None
    for n in (3, 7, 12):
        model.cache.zero_()
        expected = compiled(*_inputs(n))
        expected_cache = model.cache.clone()
        model.cache.zero_()
        got = direct(*_inputs(n))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(model.cache, expected_cache, rtol=0, atol=0)
        torch.testing.assert_close(got, model(*_inputs(n)), rtol=0, atol=0)  # eager: the reference
    assert report.num_graphs == 1  # the direct calls traced nothing


@torch.inference_mode()
def test_a_direct_call_through_inductor() -> None:
    torch.manual_seed(0)
    model = Tiny()
    compiled, report = _compiled(model, "inductor")
    compiled(*_inputs(4))
    direct = report.direct_call()
    assert direct is not None
    torch.testing.assert_close(direct(*_inputs(9)), model(*_inputs(9)), rtol=1e-5, atol=1e-5)


def test_no_binding_for_a_graph_of_two_outputs_or_without_argument_names() -> None:
    model = Tiny()
    report = CompileReport()
    backend = make_backend([], "graph", report, arg_names=ARGS)
    two = torch.compile(lambda input_ids, positions: (model(input_ids, positions), input_ids + 1),
                        backend=backend, dynamic=True, fullgraph=True)
    two(*_inputs(4))
    assert report.num_graphs == 1 and report.direct_call() is None

    unnamed = CompileReport()
    compiled = torch.compile(lambda input_ids, positions: model(input_ids, positions),
                             backend=make_backend([], "graph", unnamed), dynamic=True, fullgraph=True)
    compiled(*_inputs(4))
    assert unnamed.num_graphs == 1 and unnamed.direct_call() is None


def test_no_direct_call_once_a_second_graph_was_compiled() -> None:
    model = Tiny()
    compiled, report = _compiled(model)
    compiled(*_inputs(4))
    compiled(torch.arange(4, dtype=torch.int32), torch.arange(4))  # another dtype: another graph
    assert report.num_graphs == 2 and report.direct_call() is None
