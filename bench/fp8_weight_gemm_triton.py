"""An experiment for bench/fp8_gemm_bench.py (not used by the engine): a weight-only FP8 linear
for decode batches, out[M, N] = x[M, K] @ (w[N, K] e4m3 * scales[N]).T with x in bf16.

Decode linears are bound by reading the weights, so e4m3 weights (one byte) should take about
half the time of bf16 ones. Each program owns BLOCK_N output channels and one of SPLIT_K slices
of K; it loads its e4m3 weight tiles, converts them to bf16 in registers and multiplies with the
x tile (`tl.dot` when BLOCK_M >= 16, else a broadcast multiply and a row sum: the GEMV form).
The per-channel scale is applied once at the end. SPLIT_K > 1 writes fp32 partials that
`_reduce_kernel` adds in a fixed order (no atomics: the result does not depend on timing).
Reference: `reference_fp8_weight_linear`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _fp8_weight_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PARTIALS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_per = K // SPLIT_K
    k_lo = pid_k * k_per
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for _ in range(0, k_per, BLOCK_K):
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0).to(tl.bfloat16)
        if USE_DOT:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            acc += tl.dot(x, tl.trans(w))
        else:
            x = tl.load(x_ptrs).to(tl.float32)  # BLOCK_M == 1
            acc += tl.sum(w.to(tl.float32) * x, axis=1)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if USE_DOT:
        out_mask = m_ok[:, None] & n_ok[None, :]
        if PARTIALS:
            tl.store(out_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], acc, mask=out_mask)
        else:
            s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
            tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                     (acc * s[None, :]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        if PARTIALS:
            tl.store(out_ptr + (pid_k * M + pid_m).to(tl.int64) * N + offs_n, acc, mask=n_ok)
        else:
            s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
            tl.store(out_ptr + pid_m.to(tl.int64) * stride_om + offs_n, (acc * s).to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["M"])
def _reduce_kernel(part_ptr, s_ptr, out_ptr, M, N, stride_om, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + row).to(tl.int64) * N + offs, mask=ok, other=0.0)
    scale = tl.load(s_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)


def fp8_weight_linear_triton(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, *, block_m: int = 16,
                             block_n: int = 64, block_k: int = 128, split_k: int = 1, num_warps: int = 4,
                             num_stages: int = 4, out: torch.Tensor | None = None) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    assert k % (split_k * block_k) == 0, (k, split_k, block_k)
    use_dot = block_m >= 16
    if not use_dot:
        assert block_m == 1
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    target = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32) if split_k > 1 else out
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    _fp8_weight_kernel[grid](x, w, scales, target, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                             SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                             USE_DOT=use_dot, PARTIALS=split_k > 1, num_warps=num_warps, num_stages=num_stages)
    if split_k > 1:
        _reduce_kernel[(triton.cdiv(n, 1024), m)](target, scales, out, m, n, out.stride(0), SPLIT_K=split_k, BLOCK=1024)
    return out


def reference_fp8_weight_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (x.float() @ (w.float() * scales.float()[:, None]).t()).to(x.dtype)
