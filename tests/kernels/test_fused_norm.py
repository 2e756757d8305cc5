"""RMSNorm / fused residual-add RMSNorm: references, Triton kernels and the custom ops."""

from __future__ import annotations

import pytest
import torch

from compiled_serve.kernels.fused_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)

EPS = 1e-6


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face Llama's RMSNorm in fp32 (where its extra rounding is a no-op)."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def test_references_match_hugging_face_in_fp32() -> None:
    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 5, 48, generator=gen), torch.randn(2, 5, 48, generator=gen)
    w = torch.randn(48, generator=gen)
    torch.testing.assert_close(rms_norm_reference(x, w, EPS), _hf_rms_norm(x, w, EPS))
    normed, new_residual = fused_add_rms_norm_reference(x, r, w, EPS)
    torch.testing.assert_close(new_residual, x + r)
    torch.testing.assert_close(normed, _hf_rms_norm(x + r, w, EPS))


def test_custom_ops_pass_opcheck() -> None:
    gen = torch.Generator().manual_seed(1)
    x, r, w = (
        torch.randn(3, 32, generator=gen),
        torch.randn(3, 32, generator=gen),
        torch.randn(32, generator=gen),
    )
    torch.library.opcheck(rms_norm, (x, w, EPS))
    torch.library.opcheck(fused_add_rms_norm, (x, r, w, EPS))
    normed, new_residual = fused_add_rms_norm(x, r, w, EPS)
    assert normed.data_ptr() not in (x.data_ptr(), r.data_ptr())
    assert new_residual.data_ptr() not in (x.data_ptr(), r.data_ptr())


@pytest.mark.parametrize("hidden", [64, 200])
def test_triton_norms_match_reference(hidden: int, triton_device: str, rel_err) -> None:
    from compiled_serve.kernels.triton_norm import fused_add_rms_norm_triton, rms_norm_triton

    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=gen).to(triton_device)
    r = torch.randn(7, hidden, generator=gen).to(triton_device)
    w = torch.randn(hidden, generator=gen).to(triton_device)
    assert rel_err(rms_norm_triton(x, w, EPS), rms_norm_reference(x, w, EPS)) < 1e-5
    normed, new_residual = fused_add_rms_norm_triton(x, r, w, EPS)
    ref_normed, ref_residual = fused_add_rms_norm_reference(x, r, w, EPS)
    assert torch.equal(new_residual, ref_residual)
    assert rel_err(normed, ref_normed) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_ops_on_cuda(dtype: torch.dtype, cuda_device: str, rel_err) -> None:
    x = torch.randn(3, 257, 4096, device=cuda_device, dtype=dtype)
    r = torch.randn(3, 257, 4096, device=cuda_device, dtype=dtype)
    w = torch.randn(4096, device=cuda_device, dtype=dtype)
    assert rel_err(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS)) < 1e-2
    normed, new_residual = fused_add_rms_norm(x, r, w, EPS)
    ref_normed, ref_residual = fused_add_rms_norm_reference(x, r, w, EPS)
    assert torch.equal(new_residual, ref_residual)
    assert rel_err(normed, ref_normed) < 1e-2
