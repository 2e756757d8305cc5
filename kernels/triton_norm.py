"""Triton RMSNorm kernels (CUDA implementations of the ops in kernels/fused_norm.py).

One program normalises one row held whole in registers (hidden sizes up to ~16k), with fp32
math: read x (and the residual), write the new residual, reduce sum(x^2), write the normed row.
The fused variant reads x and residual once and writes two rows, where the unfused pair (add,
then norm) would re-read the sum from device memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_rows, hidden]
    residual_out_ptr,  # [num_rows, hidden], written only when HAS_RESIDUAL
    x_ptr,  # [num_rows, hidden]
    residual_ptr,  # [num_rows, hidden], read only when HAS_RESIDUAL
    weight_ptr,  # [hidden]
    hidden,
    eps,
    stride_x,
    stride_r,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # issued before the reduction
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden + cols, summed, mask=mask)
        # Normalise exactly the stored (rounded) residual, as the unfused add-then-norm would.
        x = summed.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    tl.store(out_ptr + row * hidden + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden}")
    x2 = x.reshape(-1, hidden)  # [num_rows, hidden]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = None
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows = x2.shape[0]
    if num_rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        out,
        residual_out if residual_out is not None else out,
        x2,
        r2,
        weight,
        hidden,
        eps,
        x2.stride(0),
        r2.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out, residual_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden], weight: [hidden] -> [..., hidden] in x.dtype (fp32 math)."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual), both fresh [..., hidden] tensors."""
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    out, residual_out = _launch(x, residual, weight, eps)
    assert residual_out is not None
    return out, residual_out
