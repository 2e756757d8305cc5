"""The weight-only quantized linear ops against their pure-torch references and fp32 matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compiled_serve.kernels.quantized_linear import (
    blockwise_int8_linear,
    int4_linear_reference,
    int8_linear_reference,
    pack_int4_cpu,
    unpack_int4_cpu,
)
from compiled_serve.models.quantized import quantize_float

# Shapes of the embedded model's linears (qkv, o, gate_up, down) and a batch of each step kind.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("n,k", [(64, 64), (960, 576), (576, 1536)])
def test_int4_packing_is_torchs_layout(n: int, k: int) -> None:
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = pack_int4_cpu(codes)
    assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(codes, 1))
    assert torch.equal(unpack_int4_cpu(packed), codes.to(torch.uint8))


def test_int4_packing_refuses_a_partial_row_tile() -> None:
    with pytest.raises(ValueError, match="multiple|N %"):
        pack_int4_cpu(torch.zeros(96, 64, dtype=torch.uint8))


@pytest.mark.parametrize("tokens", [1, 2, 16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_op_matches_reference(n: int, k: int, tokens: int) -> None:
    torch.manual_seed(0)
    qw = quantize_float(torch.randn(n, k), "int4", torch.float32)
    x = torch.randn(tokens, k)
    t = qw.tensors
    out = torch.ops.compiled_serve.int4_weight_linear(x, t["packed"], t["scales_zeros"], qw.group_size)
    ref = int4_linear_reference(x, t["packed"], t["scales_zeros"], qw.group_size)
    assert rel_err(out, ref) < 1e-5  # float32 scales: float32 arithmetic, summation order only


@pytest.mark.parametrize("layout", ["int4", "int8"])
def test_bf16_kernels_match_the_fp32_dequantized_matmul(layout: str) -> None:
    # The fast path: bf16 activations and scales. Tolerance: bf16 has 8 mantissa bits (rel 2^-9
    # per rounding); over a K = 576 dot product the errors average out to well below 1%.
    torch.manual_seed(1)
    qw = quantize_float(torch.randn(960, 576), layout, torch.bfloat16)
    x = torch.randn(4, 576)
    op = {"int4": torch.ops.compiled_serve.int4_weight_linear, "int8": torch.ops.compiled_serve.int8_weight_linear}
    extra = (qw.group_size,) if layout == "int4" else ()
    out = op[layout](x, *qw.tensors.values(), *extra)
    assert out.dtype == torch.float32 and out.shape == (4, 960)
    assert rel_err(out, F.linear(x, qw.dequantize())) < 1e-2


@pytest.mark.parametrize("tokens", [1, 2, 16])
def test_int8_op_matches_reference(tokens: int) -> None:
    torch.manual_seed(2)
    qw = quantize_float(torch.randn(576, 1536), "int8", torch.float32)
    x = torch.randn(tokens, 1536)
    out = torch.ops.compiled_serve.int8_weight_linear(x, qw.tensors["weight"], qw.tensors["scales"])
    assert rel_err(out, int8_linear_reference(x, qw.tensors["weight"], qw.tensors["scales"])) < 1e-5


def test_blockwise_int8_is_its_dequantized_matmul() -> None:
    torch.manual_seed(3)
    qw = quantize_float(torch.randn(576, 576), "q8b")
    x = torch.randn(3, 576)
    out = blockwise_int8_linear(x, qw.tensors["codes"], qw.tensors["scales"])
    assert rel_err(out, F.linear(x, qw.dequantize())) < 1e-6


@pytest.mark.parametrize("layout,tolerance", [("int4", 0.1), ("int8", 0.01), ("q8b", 0.01), ("bf16", 0.005)])
def test_quantized_weight_is_close_to_the_float_weight(layout: str, tolerance: float) -> None:
    # Round-to-nearest on Gaussian weights: int4 (16 levels per group of 32) ~5% rms error,
    # int8 ~0.5%, bf16 ~0.2%. A layout whose dequantize() drifted (scale or zero off) fails.
    torch.manual_seed(4)
    w = torch.randn(576, 576)
    assert rel_err(quantize_float(w, layout).dequantize(), w) < tolerance


def test_fake_impls_give_shapes_under_compile() -> None:
    qw = quantize_float(torch.randn(576, 576), "int4")

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.compiled_serve.int4_weight_linear(x, qw.tensors["packed"], qw.tensors["scales_zeros"], 32)

    x = torch.randn(5, 576)
    out = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)(x)
    assert out.shape == (5, 576) and torch.allclose(out, f(x))
