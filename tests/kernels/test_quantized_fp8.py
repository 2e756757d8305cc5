"""fp8 weights (--quantization fp8): the quantize step on the CPU against the e4m3 format's own
bounds, the pass on the CPU reference, and torch._scaled_mm against that reference on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compiled_serve.kernels.quantized_linear import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_linear_reference,
    fp8_weight_linear,
    quantize_fp8_rowwise,
    row_amax,
)
from compiled_serve.models.quantized import quantize_float, quantize_linear_layers
from compiled_serve.passes.base import count_ops
from compiled_serve.passes.quantized_linear import QuantizedLinearPass

# e4m3 keeps 3 mantissa bits: a normal value rounds to within 2^-4 of itself; below the smallest
# normal (2^-6) the spacing is 2^-9, in units of the row's scale.
REL, SUB = 2.0 ** -4, 2.0 ** -9


def test_each_rows_maximum_maps_to_the_largest_e4m3_value_and_rounding_stays_in_bounds() -> None:
    torch.manual_seed(0)
    t = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows over six decades
    codes, scales = quantize_fp8_rowwise(t)
    assert codes.dtype == FP8_DTYPE and scales.shape == (64, 1) and scales.dtype == torch.float32
    assert torch.equal(codes.float().abs().amax(dim=1), torch.full((64,), FP8_MAX))
    back = codes.float() * scales
    assert bool(((back - t).abs() <= t.abs() * REL + scales * SUB).all())


@pytest.mark.parametrize("width", [576, 4096, 14336, 14337])
def test_the_chunked_row_maximum_is_the_row_maximum_eager_and_compiled(width: int) -> None:
    """row_amax splits wide rows (14336: the down projection's input) into chunks; the maximum of
    the chunks' maxima must be the row's, bit for bit, including under Inductor with a dynamic row count."""
    torch.manual_seed(width)
    compiled = torch.compile(row_amax, dynamic=True)
    for rows in (1, 3, 16):
        t = torch.randn(rows, width, dtype=torch.bfloat16)
        t[rows - 1, width - 1] = -40.0  # the maximum in the last chunk, negative
        want = t.abs().amax(dim=-1, keepdim=True)
        assert torch.equal(row_amax(t), want)
        assert torch.equal(compiled(t), want)
        assert row_amax(t)[rows - 1].item() == 40.0


def test_values_on_the_e4m3_grid_come_back_exactly() -> None:
    grid = torch.tensor([448.0, -448.0, 1.0, -0.5, 0.125, 2.0 ** -9, 0.0, 240.0, 3.5])
    codes, scales = quantize_fp8_rowwise(grid[None])
    assert float(scales) == 1.0 and torch.equal(codes.float()[0], grid)


def test_the_unscaled_fp8_product_is_the_float_product_rounded_once_to_bf16() -> None:
    torch.manual_seed(4)
    a, _ = quantize_fp8_rowwise(torch.randn(5, 64))
    b, _ = quantize_fp8_rowwise(torch.randn(24, 64))
    got = torch.ops.compiled_serve.fp8_mm(a, b)
    exact = a.double() @ b.double().t()  # e4m3 values times e4m3 values: exact in float64
    assert got.dtype == torch.bfloat16 and got.shape == (5, 24)
    assert torch.equal(got, exact.float().to(torch.bfloat16))


def test_the_fp8_layout_dequantizes_to_the_weight_within_e4m3_rounding() -> None:
    torch.manual_seed(1)
    w = torch.randn(128, 64)
    qw = quantize_float(w, "fp8")
    assert qw.tensors["weight"].dtype == FP8_DTYPE and qw.tensors["scales"].shape == (128,)
    scale = qw.tensors["scales"][:, None]
    assert bool(((qw.dequantize() - w).abs() <= w.abs() * REL + scale * SUB).all())


def test_the_fp8_linear_is_its_reference_up_to_one_bf16_rounding_of_the_product() -> None:
    torch.manual_seed(5)
    x, w = torch.randn(9, 128), torch.randn(48, 128)
    qw = quantize_float(w, "fp8")
    got = fp8_weight_linear(x, qw.tensors["weight"], qw.tensors["scales"])
    want = fp8_linear_reference(x, qw.tensors["weight"], qw.tensors["scales"])
    assert got.dtype == x.dtype
    assert bool(((got - want).abs() <= want.abs() * 2.0 ** -8 + 1e-6).all())


class TwoLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(64, 128, bias=False)
        self.down = torch.nn.Linear(128, 64, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


def test_the_pass_rewrites_each_linear_to_the_fp8_op_and_matches_its_reference() -> None:
    torch.manual_seed(2)
    model = TwoLinears().eval()
    with torch.no_grad():
        float_out = model(x := torch.randn(8, 64))
    weights = quantize_linear_layers(model, "fp8")
    counts: dict[str, dict[str, int]] = {}

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        counts["before"] = count_ops(gm)
        assert QuantizedLinearPass()(gm) == 2
        counts["after"] = count_ops(gm)
        return gm.forward

    with torch.inference_mode():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    assert counts["before"].get("linear", 0) == 2 and counts["after"].get("linear", 0) == 0
    assert counts["after"]["fp8_weight_linear"] == 2
    up, down = weights["up.weight"].tensors, weights["down.weight"].tensors
    # What the pass inserts, called eagerly (checked against the reference below, one layer at a time:
    # chained, a bf16 rounding of the first output can move the second's e4m3 codes by a step).
    hidden = F.silu(fp8_weight_linear(x, up["weight"], up["scales"]))
    ref = fp8_weight_linear(hidden, down["weight"], down["scales"]) + model.down.bias
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    # And what fp8 costs against the float layers: e4m3 rounding of both operands, well under 10%.
    assert float((out - float_out).abs().max()) <= 0.1 * float(float_out.abs().max())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="torch._scaled_mm with rowwise scales needs an sm89+ CUDA device")
def test_scaled_mm_matches_the_reference_on_cuda() -> None:
    torch.manual_seed(3)
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    qw = quantize_float(w, "fp8")
    got = fp8_weight_linear(x, qw.tensors["weight"], qw.tensors["scales"])
    want = fp8_linear_reference(x.float(), qw.tensors["weight"], qw.tensors["scales"])
    assert got.dtype == torch.bfloat16
    # bf16 output: 2^-8 relative, and fp32 vs tensor-core accumulation order.
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
