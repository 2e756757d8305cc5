"""Unified Triton paged attention: one kernel for prefill chunks, decode rows and mixed batches.

Semantics are exactly `paged_attention_reference` (kernels/paged_attention.py): query token j of a
sequence with `q_len` new tokens and context `ctx` sits at position ctx - q_len + j and attends to
every cached key at a position <= its own. Rows of `q` past `query_start_loc[-1]` (bucket padding)
are written as zeros, so `out` may start uninitialised.

Work split. The grid is (query tiles, kv heads). A program owns BLOCK_Q consecutive query tokens of
one sequence and all GROUP query heads that share one kv head, flattened into BLOCK_M = BLOCK_Q *
GROUP rows, so each K/V tile is loaded once per GQA group and feeds one `tl.dot`. Tile t of
sequence s has the global index `query_start_loc[s] // BLOCK_Q + s + t`; that bound never
overlaps, needs no host-side prefix sum, and `num_tokens // BLOCK_Q + num_seqs + 1` programs cover
every batch (the extra one covers padding rows). Each program binary-searches `query_start_loc`
for its sequence, so the launch needs no host sync and replays under CUDA graphs. Index
`num_seqs` is treated as a virtual sequence holding the padding rows, which are zeroed.

The KV loop walks TILE_N key positions at a time (TILE_N may span several cache blocks: each key's
physical block is gathered from `block_tables`), with an online softmax in fp32 (exp2, scale folded
into log2 units). Only tiles up to the tile's last query position are visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile_idx, BLOCK_Q: tl.constexpr):
    """Largest s in [0, num_seqs] with query_start_loc[s] // BLOCK_Q + s <= tile_idx."""
    # `tile_idx * 0` makes the loop-carried values tensors even when Triton specialises
    # num_seqs == 1 into a constant.
    lo = tile_idx * 0
    hi = tile_idx * 0 + num_seqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_idx:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    scale_log2,  # softmax scale * log2(e)
    num_tokens,
    num_seqs,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_c_blk,
    stride_c_slot,
    stride_c_head,
    stride_bt_seq,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile_idx, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    # The virtual sequence `num_seqs` spans the padding rows [query_start_loc[-1], num_tokens).
    q_end = tl.load(query_start_loc_ptr + seq + 1, mask=seq < num_seqs, other=num_tokens)
    q_len = q_end - q_start
    seq_tile = tile_idx - (q_start // BLOCK_Q + seq)
    if seq_tile * BLOCK_Q >= q_len:
        return

    rows = tl.arange(0, BLOCK_M)
    tok_in_seq = seq_tile * BLOCK_Q + rows // GROUP  # [BLOCK_M]
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M]
    row_valid = (rows < BLOCK_Q * GROUP) & (tok_in_seq < q_len)
    tok = q_start + tok_in_seq
    d = tl.arange(0, HEAD_DIM_P)
    d_valid = d < HEAD_DIM
    io_mask = row_valid[:, None] & d_valid[None, :]  # [BLOCK_M, HEAD_DIM_P]
    o_offs = tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :]

    if seq == num_seqs:
        tl.store(out_ptr + o_offs, tl.zeros([BLOCK_M, HEAD_DIM_P], out_ptr.dtype.element_ty), mask=io_mask)
        return

    q_offs = tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=io_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_P]

    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the sequence's first new token
    q_pos = first_pos + tok_in_seq  # [BLOCK_M]
    # Keys this tile can see: positions below its last query's position + 1.
    num_keys = first_pos + tl.minimum((seq_tile + 1) * BLOCK_Q, q_len)

    # A finite start for the running max keeps fully masked (invalid) rows free of inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    kv_head_off = kv_head * stride_c_head

    for start_n in range(0, num_keys, TILE_N):
        k_pos = start_n + tl.arange(0, TILE_N)  # [TILE_N]
        k_valid = k_pos < num_keys
        phys = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        slot_off = phys * stride_c_blk + (k_pos % BLOCK_SIZE) * stride_c_slot + kv_head_off  # [TILE_N]
        kv_mask = k_valid[:, None] & d_valid[None, :]  # [TILE_N, HEAD_DIM_P]
        kv_offs = slot_off[:, None] + d[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [TILE_N, HEAD_DIM_P]
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [TILE_N, HEAD_DIM_P]

        s = (
            tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
        )  # [BLOCK_M, TILE_N]
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, TILE_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _attention_tiles(group: int, max_query_len: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_Q, TILE_N) for a batch: narrow query tiles for decode, wide for prefill."""
    if max_query_len <= 1:
        block_m = max(16, triton.next_power_of_2(group))
        tile_n = 64
    else:
        block_m = max(64, triton.next_power_of_2(group))
        tile_n = 32
    return block_m, max(1, block_m // group), tile_n


def paged_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    """Causal paged attention of every sequence's new tokens; padding rows come back as zeros.

    `max_query_len` picks the tile shape (decode tiles when it is 1) and must bound every
    sequence's query length from above only loosely: correctness never depends on it.
    `max_seq_len` is accepted for interface parity with the op and is not needed (the key loop
    bound is read from `seq_lens` on the device). No host syncs.
    """
    del max_seq_len
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}: head_dim must match "
            "and num_heads must be a multiple of num_kv_heads"
        )
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and kv_cache need a contiguous last (head_dim) dimension")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    block_m, block_q, tile_n = _attention_tiles(group, max_query_len)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    # Exact fp32 dots for fp32 inputs (tf32 would cost ~1e-3 relative error); bf16/fp16 use tensor cores.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (num_tokens // block_q + num_seqs + 1, num_kv_heads)
    _paged_attention_kernel[grid](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * _LOG2E,
        num_tokens,
        num_seqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        DOT_PRECISION=precision,
        num_warps=4,
        num_stages=2,
    )
    return out
