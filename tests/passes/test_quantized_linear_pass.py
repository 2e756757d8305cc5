"""QuantizedLinearPass: op counts before and after, and parity with the unrewritten graph."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compiled_serve.models.quantized import quantize_linear_layers
from compiled_serve.passes.base import count_ops
from compiled_serve.passes.quantized_linear import QuantizedLinearPass


class TwoLayerMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(128, 256, bias=True)
        self.down = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x))) + x


def capture(module: nn.Module, x: torch.Tensor, rewrite: bool) -> tuple[torch.Tensor, dict, dict]:
    """Output, op counts before and after the pass (the graph run as rewritten, no Inductor)."""
    counts: dict[str, dict] = {}

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        counts["before"] = count_ops(gm)
        if rewrite:
            QuantizedLinearPass()(gm)
        counts["after"] = count_ops(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(module, backend=backend, dynamic=True, fullgraph=True)(x)
    return out, counts["before"], counts["after"]


@pytest.mark.parametrize("layout,op", [("int4", "int4_linear"),
                                       ("int8", "int8_linear"),
                                       ("q8b", "blockwise_int8_linear"), ("bf16", "bf16_weight_linear")])
def test_every_linear_is_rewritten_and_matches_the_dequantized_graph(layout: str, op: str) -> None:
    torch.manual_seed(0)
    model = TwoLayerMLP().eval()
    quantized = copy.deepcopy(model)
    weights = quantize_linear_layers(quantized, layout)
    # The reference: the same graph unrewritten, on the dequantized weights (what the op multiplies by).
    with torch.no_grad():
        for name, qw in weights.items():
            model.get_submodule(name.rpartition(".")[0]).weight.copy_(qw.dequantize())
    x = torch.randn(3, 128)
    ref, ref_before, ref_after = capture(model, x, rewrite=False)
    out, before, after = capture(quantized, x, rewrite=True)
    assert before == ref_before and before["linear"] == 2
    assert after.get("linear", 0) == 0 and after[op] == 2
    assert after["add"] == before["add"] + 1  # the bias of `up`, added after the op
    tolerance = 1e-5 if layout in ("q8b",) else 2e-2  # int4/int8/bf16 run the bf16 kernels
    assert float((out - ref).norm() / ref.norm()) < tolerance


def test_a_graph_without_quantized_weights_is_left_alone() -> None:
    model = TwoLayerMLP().eval()
    x = torch.randn(2, 128)
    out, before, after = capture(model, x, rewrite=True)
    assert before == after
    assert torch.allclose(out, model(x))


class ReadsItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.proj.weight.sum()


def test_a_quantized_weight_read_outside_linear_fails_loudly() -> None:
    model = ReadsItsWeight().eval()
    quantize_linear_layers(model, "int8")
    # dynamo wraps the backend's CompilationError; its message is kept.
    with pytest.raises(Exception, match="other than linear"):
        capture(model, torch.randn(2, 64), rewrite=True)


def test_placeholder_weights_own_no_memory() -> None:
    model = TwoLayerMLP()
    quantize_linear_layers(model, "int4")
    for p in (model.up.weight, model.down.weight):
        assert p.stride() == (0, 0) and p.untyped_storage().nbytes() == 4


@pytest.mark.heavy
@pytest.mark.parametrize("layout", ["int4", "q8b"])
def test_the_rewritten_graph_compiles_with_inductor(layout: str) -> None:
    # The quantized tensors become graph attributes; Inductor (C++ on the CPU) must accept them.
    from torch._inductor.compile_fx import compile_fx

    torch.manual_seed(5)
    model = TwoLayerMLP().eval()
    weights = quantize_linear_layers(model, layout)

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        assert QuantizedLinearPass()(gm) == 2
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    x = torch.randn(3, 128)
    with torch.inference_mode():
        out = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)(x)
    up, down = (weights[f"{n}.weight"].dequantize() for n in ("up", "down"))
    ref = F.linear(F.silu(F.linear(x, up, model.up.bias)), down) + x
    assert float((out - ref).norm() / ref.norm()) < (1e-5 if layout == "q8b" else 2e-2)
