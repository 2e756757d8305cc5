"""Triton KV-cache write through `slot_mapping`, and the write-then-attend pair the pass inserts.

`write_kv_triton` has the semantics of `write_kv_reference`: token i's keys and values land in
flat slot `slot_mapping[i]` (block * block_size + offset) of the layer's cache; rows whose slot is
-1 (bucket padding) are never written. One program copies one token's [num_kv_heads, head_dim]
K and V rows, so a prefill of T tokens is T programs with no host sync.

`paged_attention_with_kv_write_triton` is two launches on one stream (write, then attend): the
attention kernel reads this step's keys back from the cache, which keeps one code path for cached
and new keys. Fusing the write into the attention kernel would save one read of the new K/V
(small next to the context read in decode) at the cost of a second key source per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiled_serve.kernels.triton_paged_attention import paged_attention_triton

FP8_E4M3_MAX: tl.constexpr = tl.constexpr(448.0)  # float8_e4m3fn's largest finite value


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64, -1 = padding row
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_blk,
    stride_c_slot,
    stride_c_head,
    inv_k_scale,  # the cache holds k / k_scale (1.0 unless an FP8 cache is scaled)
    inv_v_scale,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_HEADS_P: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SATURATE: tl.constexpr,  # an FP8 cache: clamp to its largest finite value before the cast
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    h = tl.arange(0, KV_HEADS_P)
    d = tl.arange(0, HEAD_DIM_P)
    # The slot test is broadcast as a vector: the interpreter turns `tensor & scalar_bool` into int32.
    d_ok = (d < HEAD_DIM) & (d * 0 + slot >= 0)  # [HEAD_DIM_P]
    mask = (h < NUM_KV_HEADS)[:, None] & d_ok[None, :]  # [KV_HEADS_P, HEAD_DIM_P]
    cache_offs = (slot // BLOCK_SIZE) * stride_c_blk + (slot % BLOCK_SIZE) * stride_c_slot
    cache_offs = cache_offs + h[:, None] * stride_c_head + d[None, :]
    k = tl.load(k_ptr + tok * stride_k_tok + h[:, None] * stride_k_head + d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_v_tok + h[:, None] * stride_v_head + d[None, :], mask=mask)
    k = k.to(tl.float32) * inv_k_scale
    v = v.to(tl.float32) * inv_v_scale
    if SATURATE:
        k = tl.minimum(tl.maximum(k, -FP8_E4M3_MAX), FP8_E4M3_MAX)
        v = tl.minimum(tl.maximum(v, -FP8_E4M3_MAX), FP8_E4M3_MAX)
    tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] (may be a strided view of a qkv output)
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], written in place
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = padding row (never written)
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter this step's K/V into the paged cache; casts to the cache dtype. No host syncs.

    An FP8 (e4m3) cache stores k / k_scale and v / v_scale, saturated at +-448
    (`write_kv_reference` is the same with torch ops).
    """
    num_tokens = slot_mapping.shape[0]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    if k.shape[1:] != (num_kv_heads, head_dim) or v.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit kv_cache {tuple(kv_cache.shape)}"
        )
    if k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("k, v and kv_cache need a contiguous last (head_dim) dimension")
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        1.0 / k_scale,
        1.0 / v_scale,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        KV_HEADS_P=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        SATURATE=kv_cache.dtype == torch.float8_e4m3fn,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def paged_attention_with_kv_write_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], written in place
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = padding row
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    k_scale: float = 1.0,  # an FP8 cache's scales: the cache holds k / k_scale, v / v_scale
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend over it (two launches, same stream).

    The attention kernel reads the cache as stored; k_scale folds into the softmax scale
    (q . k = k_scale * q . k_stored), and v_scale multiplies the output (softmax @ v is linear in v).
    """
    write_kv_triton(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    o = paged_attention_triton(
        q, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale * k_scale, out=out
    )
    return o if v_scale == 1.0 else o.mul_(v_scale)
