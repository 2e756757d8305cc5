"""Triton rotary embedding (CUDA implementation of `compiled_serve::rotary_embedding`).

One program rotates one token: it gathers cos/sin for the token's position once and applies
them to all query and key heads, writing fresh q/k. `rot_dim = cos_sin_cache.shape[-1]` may be
smaller than head_dim (partial rotary); the remaining dims are copied through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    out_ptr,
    x_ptr,
    tok,
    cos,  # [HALF_P] fp32
    sin,  # [HALF_P] fp32
    num_heads,
    stride_x_tok,
    stride_x_head,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    HEADS_P: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS_P: tl.constexpr,
):
    h = tl.arange(0, HEADS_P)
    i = tl.arange(0, HALF_P)
    mask = (h < num_heads)[:, None] & (i < ROT_DIM // 2)[None, :]  # [HEADS_P, HALF_P]
    if IS_NEOX:  # halves: (x[:rot/2], x[rot/2:rot])
        d1 = i
        d2 = i + ROT_DIM // 2
    else:  # interleaved pairs: (x[0::2], x[1::2])
        d1 = 2 * i
        d2 = 2 * i + 1
    x_row = x_ptr + tok * stride_x_tok + h[:, None] * stride_x_head
    o_row = out_ptr + tok * (num_heads * HEAD_DIM) + h[:, None] * HEAD_DIM
    x1 = tl.load(x_row + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + d2[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(o_row + d1[None, :], o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + d2[None, :], o2.to(out_ptr.dtype.element_ty), mask=mask)
    if ROT_DIM < HEAD_DIM:
        p = ROT_DIM + tl.arange(0, PASS_P)
        pmask = (h < num_heads)[:, None] & (p < HEAD_DIM)[None, :]
        tl.store(o_row + p[None, :], tl.load(x_row + p[None, :], mask=pmask), mask=pmask)


@triton.jit
def _rotary_kernel(
    q_out_ptr,  # [num_tokens, num_heads, head_dim]
    k_out_ptr,  # [num_tokens, num_kv_heads, head_dim]
    q_ptr,
    k_ptr,
    positions_ptr,  # [num_tokens] int
    cos_sin_ptr,  # [max_pos, rot_dim]: cos | sin
    num_heads,
    num_kv_heads,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cs,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    Q_HEADS_P: tl.constexpr,
    K_HEADS_P: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS_P: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    i = tl.arange(0, HALF_P)
    imask = i < ROT_DIM // 2
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i, mask=imask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + ROT_DIM // 2 + i, mask=imask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_out_ptr, q_ptr, tok, cos, sin, num_heads, stride_q_tok, stride_q_head,
        HEAD_DIM, ROT_DIM, IS_NEOX, Q_HEADS_P, HALF_P, PASS_P,
    )  # fmt: skip
    _rotate_heads(
        k_out_ptr, k_ptr, tok, cos, sin, num_kv_heads, stride_k_tok, stride_k_head,
        HEAD_DIM, ROT_DIM, IS_NEOX, K_HEADS_P, HALF_P, PASS_P,
    )  # fmt: skip


def rotary_embedding_triton(
    positions: torch.Tensor,  # [num_tokens] int
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim]: cos | sin
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k), fresh contiguous tensors in q/k's dtypes (fp32 math)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rot_dim = cos_sin_cache.shape[-1]
    if rot_dim % 2 != 0 or rot_dim > head_dim or k.shape[2] != head_dim:
        raise ValueError(
            f"cos_sin_cache {tuple(cos_sin_cache.shape)} does not fit q {tuple(q.shape)} / k {tuple(k.shape)}"
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    _rotary_kernel[(num_tokens,)](
        q_out,
        k_out,
        q,
        k,
        positions,
        cos_sin_cache,
        num_heads,
        num_kv_heads,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        HEAD_DIM=head_dim,
        ROT_DIM=rot_dim,
        IS_NEOX=is_neox,
        Q_HEADS_P=triton.next_power_of_2(num_heads),
        K_HEADS_P=triton.next_power_of_2(num_kv_heads),
        HALF_P=triton.next_power_of_2(rot_dim // 2),
        PASS_P=triton.next_power_of_2(max(1, head_dim - rot_dim)),
        num_warps=4,
    )
    return q_out, k_out
