"""Many compiled models of one architecture in one process never exhaust dynamo's recompile limit."""

from __future__ import annotations

import torch

from compiled_serve.passes.pipeline import compile_model


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q = self.proj(torch.nn.functional.one_hot(input_ids % 8, 8).float()).view(-1, 2, 4)
        return torch.ops.compiled_serve.causal_attention(q, q, q, 0.5).reshape(-1, 8)


def test_twelve_models_each_compile_their_own_graphs():
    limit = torch._dynamo.config.recompile_limit
    for _ in range(limit + 4):  # one shared cache would fail at `limit`
        step, report = compile_model(Tiny(), mode="graph", passes=[])
        for n in (3, 2):  # a prefill and a (padded, see buckets.py) decode, as an engine's warm-up runs
            step(torch.arange(n), torch.arange(n))
        assert report.num_graphs == 1
