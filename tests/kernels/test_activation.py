"""SiLU-and-multiply: reference, Triton kernel and the custom op."""

from __future__ import annotations

import pytest
import torch

from compiled_serve.kernels.activation import silu_and_mul, silu_and_mul_reference


def test_reference_and_op() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2 * 24, generator=gen)
    expected = torch.nn.functional.silu(x[:, :24]) * x[:, 24:]
    torch.testing.assert_close(silu_and_mul_reference(x), expected)
    torch.testing.assert_close(silu_and_mul(x), expected)
    torch.library.opcheck(silu_and_mul, (x,))


@pytest.mark.parametrize("inter", [32, 1500])
def test_triton_matches_reference(inter: int, triton_device: str, rel_err) -> None:
    from compiled_serve.kernels.triton_activation import silu_and_mul_triton

    gen = torch.Generator().manual_seed(inter)
    x = torch.randn(3, 2 * inter, generator=gen).to(triton_device)
    out = silu_and_mul_triton(x)
    assert out.shape == (3, inter)
    assert rel_err(out, silu_and_mul_reference(x)) < 1e-5


@pytest.mark.gpu
def test_op_on_cuda(cuda_device: str, rel_err) -> None:
    x = torch.randn(2, 513, 2 * 14336, device=cuda_device, dtype=torch.bfloat16)
    assert rel_err(silu_and_mul(x), silu_and_mul_reference(x)) < 1e-2
