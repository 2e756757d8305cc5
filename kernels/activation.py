"""SiLU-and-multiply as the custom op `compiled_serve::silu_and_mul`, with its torch reference.

The activation-fusion pass rewrites `silu(gate) * up` over a packed gate|up projection into this
op. Math is fp32 with one rounding at the end. CUDA runs the Triton kernel
(kernels/triton_activation.py, imported lazily); every other device runs the reference.
"""

from __future__ import annotations

import torch


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    # x: [..., 2 * inter] -> [..., inter]
    inter = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :inter]) * xf[..., inter:]).to(x.dtype)


@torch.library.custom_op("compiled_serve::silu_and_mul", mutates_args=())
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * inter] (gate | up) -> silu(gate) * up: [..., inter]."""
    return silu_and_mul_reference(x).contiguous()


@silu_and_mul.register_kernel("cuda")
def _(x: torch.Tensor) -> torch.Tensor:
    from compiled_serve.kernels.triton_activation import silu_and_mul_triton

    return silu_and_mul_triton(x)


@silu_and_mul.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
