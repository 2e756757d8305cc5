"""An experiment, kept for bench/gemm_bench.py only (not used by the engine): a weight-streaming
Triton GEMM for decode batches. On the H200 it lost to cuBLAS by 1.6-4x at every decode shape
(bench/results/gemm_bench-llama8b-nvidia-h200.json): cuBLAS reaches 2.5-4.1 TB/s there.

A weight-streaming GEMM for decode batches: out[M, N] = x[M, K] @ w[N, K]^T with M small.

At decode sizes (M <= 256 rows against K x N weights of 4096 x 6144 and up) a linear layer is
bound by reading the weights once: every weight byte feeds M multiply-adds. Each program owns
BLOCK_N output columns and one of SPLIT_K equal slices of K, streams its [BLOCK_N, K / SPLIT_K]
weight slab through a software pipeline (num_stages loads in flight) and re-reads the small x
tile from L2. SPLIT_K > 1 keeps all SMs streaming when N / BLOCK_N programs are too few; the
partial sums go to an fp32 [SPLIT_K, M, N] buffer that `_reduce_splits_kernel` adds in a fixed
order, so the result does not depend on timing (no atomics). Reference: `reference_skinny_gemm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M", "split_k"])
def _skinny_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    out_ptr,  # [M, N] (SPLIT_K == 1) or fp32 partials [SPLIT_K, M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    split_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr,  # split_k > 1: fp32 partials for _reduce_splits_kernel
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    n_valid = offs_n < N
    k_per_split = K // split_k  # the wrapper checks K % (split_k * BLOCK_K) == 0
    k_lo = pid_k * k_per_split
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_valid[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=n_valid[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(w))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_mask = m_valid[:, None] & n_valid[None, :]
    if not WRITE_PARTIALS:
        o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        p_ptrs = out_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=out_mask)


@triton.jit(do_not_specialize=["M", "split_k"])
def _reduce_splits_kernel(part_ptr, out_ptr, M, N, stride_om, split_k, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(split_k):
        acc += tl.load(part_ptr + (s * M + row).to(tl.int64) * N + offs, mask=valid, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=valid)


def skinny_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T with the given tiles; both contiguous in K."""
    m, k = x.shape
    n, k_w = w.shape
    if k != k_w:
        raise ValueError(f"skinny_gemm: x has K={k} but the weight has K={k_w}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("skinny_gemm: x and the weight must be contiguous along K")
    if k % (split_k * block_k):
        raise ValueError(f"skinny_gemm: K={k} is not a multiple of split_k*block_k={split_k * block_k}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    if split_k == 1:
        _skinny_gemm_kernel[grid](
            x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), 1,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, WRITE_PARTIALS=False,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        return out
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    _skinny_gemm_kernel[grid](
        x, w, part, m, n, k, x.stride(0), w.stride(0), n, split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, WRITE_PARTIALS=True,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    reduce_block = 1024
    _reduce_splits_kernel[(triton.cdiv(n, reduce_block), m)](
        part, out, m, n, out.stride(0), split_k, BLOCK=reduce_block, num_warps=4
    )
    return out


def reference_skinny_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().t()).to(x.dtype)
