"""Unified Triton paged attention: one kernel for prefill chunks, decode rows and mixed batches.

Semantics are exactly `paged_attention_reference` (kernels/paged_attention.py): query token j of a
sequence with `q_len` new tokens and context `ctx` sits at position ctx - q_len + j and attends to
every cached key at a position <= its own. Rows of `q` past `query_start_loc[-1]` (bucket padding)
are written as zeros, so `out` may start uninitialised.

Work split. The grid is (query tiles, kv heads, kv splits). A program owns BLOCK_Q consecutive
query tokens of one sequence and all GROUP query heads that share one kv head, flattened into
BLOCK_M = BLOCK_Q * GROUP rows, so each K/V tile is loaded once per GQA group and feeds one
`tl.dot`. Tile t of sequence s has the global index `query_start_loc[s] // BLOCK_Q + s + t`; that
bound never overlaps, needs no host-side prefix sum, and `num_tokens // BLOCK_Q + num_seqs + 1`
programs cover every batch. Each program binary-searches `query_start_loc` for its sequence, so
launches need no host sync and replay under CUDA graphs. Index `num_seqs` is a virtual sequence
holding the padding rows, which are zeroed.

The KV loop walks TILE_N key positions at a time (TILE_N may span several cache blocks: each key's
physical block is gathered from `block_tables`), with an online softmax in fp32 (exp2, scale folded
into log2 units): first the keys every row of the tile sees, without masks, then the diagonal
tiles with the causal mask. With num_splits > 1 (small decode batches) each program takes one
slice of the keys and writes unnormalised partials that `_merge_splits_kernel` combines.
Tile shapes and split counts: kernels/triton_attention_config.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiled_serve.kernels.triton_attention_config import (
    MAX_SPLITS,
    AttentionTiles,
    choose_num_splits,
    decode_tiles,
    multiprocessors,
    prefill_tiles,
)

_LOG2E = 1.4426950408889634
_NO_LIMIT = 1 << 30


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
def _attend_key_tile(
    acc,  # [BLOCK_M, HEAD_DIM_P] fp32, unnormalised output
    m_i,  # [BLOCK_M] fp32 running max (log2 units)
    l_i,  # [BLOCK_M] fp32 running sum
    q,  # [BLOCK_M, HEAD_DIM_P]
    q_pos,  # [BLOCK_M] position of each row's query token
    k_cache_ptr,
    v_cache_ptr,
    bt_row,  # this sequence's block-table row
    start_n,
    key_hi,
    kv_head_off,
    d,
    d_valid,
    scale_log2,
    stride_c_blk,
    stride_c_slot,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of the tile is in range and visible to every row
):
    """One online-softmax step over keys [start_n, start_n + TILE_N)."""
    k_pos = start_n + tl.arange(0, TILE_N)  # [TILE_N]
    k_valid = k_pos < key_hi
    if MASKED:
        phys = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        kv_mask = k_valid[:, None] & d_valid[None, :]  # [TILE_N, HEAD_DIM_P]
    else:
        phys = tl.load(bt_row + k_pos // BLOCK_SIZE).to(tl.int64)
        kv_mask = d_valid[None, :]  # [1, HEAD_DIM_P]
    slot_off = phys * stride_c_blk + (k_pos % BLOCK_SIZE) * stride_c_slot + kv_head_off  # [TILE_N]
    kv_offs = slot_off[:, None] + d[None, :]
    k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [TILE_N, HEAD_DIM_P]
    v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [TILE_N, HEAD_DIM_P]

    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, TILE_N]
    if MASKED:
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, TILE_N]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Batch-dependent integers are not specialised: Triton would otherwise compile a variant for
# each of (== 1, divisible by 16, other) per argument, i.e. new compiles as batch sizes change
# during serving (seconds each), which the warm-up cannot enumerate.
@triton.jit(do_not_specialize=["num_tokens", "num_seqs", "q_len_lo", "q_len_hi", "num_splits"])
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    partial_acc_ptr,  # [num_tokens, num_heads, num_splits, HEAD_DIM_P] fp32 (SPLIT_KV only)
    partial_ml_ptr,  # [2, num_tokens, num_heads, num_splits] fp32: running max, sum (SPLIT_KV only)
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
    num_heads,
    q_len_lo,  # this launch owns the sequences with q_len_lo < q_len <= q_len_hi
    q_len_hi,
    num_splits,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_KV: tl.constexpr,  # num_splits > 1: write partials for the merge kernel
    ZERO_PADDING: tl.constexpr,  # this launch zeroes the padding rows
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile_idx, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    # The virtual sequence `num_seqs` spans the padding rows [query_start_loc[-1], num_tokens).
    q_end = tl.load(query_start_loc_ptr + seq + 1, mask=seq < num_seqs, other=num_tokens)
    q_len = q_end - q_start
    seq_tile = tile_idx - (q_start // BLOCK_Q + seq)
    if seq_tile * BLOCK_Q >= q_len:
        return
    if seq < num_seqs:
        if (q_len <= q_len_lo) | (q_len > q_len_hi):  # the other launch's sequence
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
        if ZERO_PADDING:
            tl.store(
                out_ptr + o_offs, tl.zeros([BLOCK_M, HEAD_DIM_P], out_ptr.dtype.element_ty), mask=io_mask
            )
        return

    q_offs = tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=io_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_P]

    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the sequence's first new token
    q_pos = first_pos + tok_in_seq  # [BLOCK_M]
    # Keys this tile can see: positions below its last query's position + 1.
    num_keys = first_pos + tl.minimum((seq_tile + 1) * BLOCK_Q, q_len)
    # Split-KV: this program takes one of num_splits equal, TILE_N-aligned slices of the keys.
    per_split = tl.cdiv(tl.cdiv(num_keys, num_splits), TILE_N) * TILE_N
    key_lo = split * per_split
    key_hi = tl.minimum(num_keys, key_lo + per_split)

    # A finite start for the running max keeps fully masked (invalid) rows free of inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    kv_head_off = kv_head * stride_c_head

    # Keys below the tile's first query position are visible to every row: no mask there.
    full_hi = tl.maximum(key_lo, tl.minimum(key_hi, first_pos + seq_tile * BLOCK_Q))
    full_hi = key_lo + (full_hi - key_lo) // TILE_N * TILE_N
    for start_n in range(key_lo, full_hi, TILE_N):
        acc, m_i, l_i = _attend_key_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, start_n, key_hi, kv_head_off, d, d_valid,
            scale_log2, stride_c_blk, stride_c_slot, BLOCK_SIZE, TILE_N, DOT_PRECISION, False,
        )  # fmt: skip
    for start_n in range(full_hi, key_hi, TILE_N):
        acc, m_i, l_i = _attend_key_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, start_n, key_hi, kv_head_off, d, d_valid,
            scale_log2, stride_c_blk, stride_c_slot, BLOCK_SIZE, TILE_N, DOT_PRECISION, True,
        )  # fmt: skip

    if not SPLIT_KV:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # Unnormalised partials; an empty slice leaves (m, l, acc) = (-1e30, 0, 0), weight 0 at merge.
        part = (tok * num_heads + head) * num_splits + split  # [BLOCK_M]
        tl.store(partial_acc_ptr + part[:, None] * HEAD_DIM_P + d[None, :], acc, mask=row_valid[:, None])
        tl.store(partial_ml_ptr + part, m_i, mask=row_valid)
        tl.store(partial_ml_ptr + num_tokens * num_heads * num_splits + part, l_i, mask=row_valid)


@triton.jit(do_not_specialize=["num_tokens", "num_seqs", "num_splits"])
def _merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    partial_acc_ptr,  # [num_tokens, num_heads, num_splits, HEAD_DIM_P] fp32
    partial_ml_ptr,  # [2, num_tokens, num_heads, num_splits] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_tokens,
    num_seqs,
    num_heads,
    stride_o_tok,
    stride_o_head,
    num_splits,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    MAX_SPLITS_P: tl.constexpr,  # a power of two >= num_splits
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM_P)
    o_ptrs = out_ptr + tok * stride_o_tok + head * stride_o_head + d
    if tok >= tl.load(query_start_loc_ptr + num_seqs):  # bucket padding row
        tl.store(o_ptrs, tl.zeros([HEAD_DIM_P], out_ptr.dtype.element_ty), mask=d < HEAD_DIM)
        return
    split = tl.arange(0, MAX_SPLITS_P)
    used = split < num_splits  # [MAX_SPLITS_P]
    part = (tok * num_heads + head) * num_splits + split  # [MAX_SPLITS_P]
    m = tl.load(partial_ml_ptr + part, mask=used, other=-1.0e30)
    l_sum = tl.load(partial_ml_ptr + num_tokens * num_heads * num_splits + part, mask=used, other=0.0)
    acc = tl.load(partial_acc_ptr + part[:, None] * HEAD_DIM_P + d[None, :], mask=used[:, None],
                  other=0.0)  # [MAX_SPLITS_P, HEAD_DIM_P]
    # Split 0 always holds key 0, so the max is finite; unused splits get weight 0 (l and acc are 0).
    weight = tl.exp2(m - tl.max(m, 0))  # [MAX_SPLITS_P]
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l_sum * weight, 0)
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


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
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal paged attention of every sequence's new tokens; padding rows come back as zeros.

    When every sequence fits one narrow (decode) tile, i.e. max_query_len <= its BLOCK_Q, this is
    one launch, split over the keys when the batch is too small to fill the GPU (`num_splits`, a
    power of two, overrides that choice), plus a small merge launch when split. Otherwise it is
    two launches of the same kernel, narrow tiles owning the sequences with few new tokens and
    wide tiles the rest, so decode rows in a mixed batch do not pay for 128-row tiles.

    `max_query_len` and `max_seq_len` are host-side hints that only pick launches, tiles and
    splits: key and query ranges are read from `seq_lens` / `query_start_loc` on the device, so
    any values give correct results and a CUDA graph captured with one replays correctly for any
    batch of the same shape. No host syncs.
    """
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
    if num_tokens == 0:
        return out
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    # Exact fp32 dots for fp32 inputs (tf32 would cost ~1e-3 relative error); bf16/fp16 use tensor cores.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def launch(
        tiles: AttentionTiles, q_len_lo: int, q_len_hi: int, zero_padding: bool, splits: int, partials: tuple
    ) -> None:
        grid = (num_tokens // tiles.block_q + num_seqs + 1, num_kv_heads, splits)
        _paged_attention_kernel[grid](
            out, *partials, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
            scale * _LOG2E, num_tokens, num_seqs, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), num_heads,
            q_len_lo, q_len_hi, splits,
            GROUP=group, BLOCK_Q=tiles.block_q, BLOCK_M=tiles.block_m, HEAD_DIM=head_dim,
            HEAD_DIM_P=head_dim_p, BLOCK_SIZE=block_size, TILE_N=tiles.tile_n, DOT_PRECISION=precision,
            SPLIT_KV=splits > 1, ZERO_PADDING=zero_padding, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )  # fmt: skip

    narrow = decode_tiles(group, head_dim, q.dtype)
    if max_query_len > narrow.block_q:
        launch(narrow, 0, narrow.block_q, False, 1, (out, out))
        launch(prefill_tiles(group, head_dim, q.dtype), narrow.block_q, _NO_LIMIT, True, 1, (out, out))
        return out

    if num_splits is None:
        num_splits = choose_num_splits(num_seqs * num_kv_heads, max_seq_len, multiprocessors(q.device))
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    if num_splits == 1:
        launch(narrow, 0, _NO_LIMIT, True, 1, (out, out))  # partial buffers never touched
        return out
    # [num_tokens, num_heads, splits, head_dim_p] unnormalised outputs; [2, ...] running max and sum
    partial_acc = q.new_empty((num_tokens, num_heads, num_splits, head_dim_p), dtype=torch.float32)
    partial_ml = q.new_empty((2, num_tokens, num_heads, num_splits), dtype=torch.float32)
    launch(narrow, 0, _NO_LIMIT, False, num_splits, (partial_acc, partial_ml))
    _merge_splits_kernel[(num_tokens, num_heads)](
        out, partial_acc, partial_ml, query_start_loc, num_tokens, num_seqs, num_heads,
        out.stride(0), out.stride(1), num_splits,
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, MAX_SPLITS_P=triton.next_power_of_2(max(num_splits, MAX_SPLITS)),
        num_warps=4,
    )  # fmt: skip
    return out
