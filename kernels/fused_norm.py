"""RMSNorm and residual-add + RMSNorm as custom ops, with their pure-torch references.

`compiled_serve::rms_norm(x, weight, eps)` and `compiled_serve::fused_add_rms_norm(x, residual,
weight, eps) -> (normed, new_residual)` are what the norm-fusion pass inserts. Math is fp32 with
one rounding at the end; `new_residual` is x + residual in x's dtype, and `normed` is exactly
`rms_norm(new_residual)`, so the fused op equals the unfused pair it replaces. (Hugging Face's
Llama rounds once more, before the weight multiply: at most one ulp apart in bf16.)

CUDA runs the Triton kernels (kernels/triton_norm.py, imported lazily so CPU installs need no
Triton); every other device runs the references. Outputs never alias inputs.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., hidden], weight: [hidden]
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = (x.float() + residual.float()).to(x.dtype)  # [..., hidden]
    return rms_norm_reference(new_residual, weight, eps), new_residual


@torch.library.custom_op("compiled_serve::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden], weight: [hidden] -> [..., hidden]."""
    return rms_norm_reference(x, weight, eps).contiguous()


@rms_norm.register_kernel("cuda")
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from compiled_serve.kernels.triton_norm import rms_norm_triton

    return rms_norm_triton(x, weight, eps)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("compiled_serve::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual), both [..., hidden]: new_residual = x + residual, normed = rms_norm of it."""
    normed, new_residual = fused_add_rms_norm_reference(x, residual, weight, eps)
    return normed.contiguous(), new_residual.contiguous()


@fused_add_rms_norm.register_kernel("cuda")
def _(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from compiled_serve.kernels.triton_norm import fused_add_rms_norm_triton

    return fused_add_rms_norm_triton(x, residual, weight, eps)


@fused_add_rms_norm.register_fake
def _(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)
