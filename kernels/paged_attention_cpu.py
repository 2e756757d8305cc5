"""A faster CPU implementation of paged attention, tested against `paged_attention_reference`.

The reference loops over sequences in Python, which costs one small SDPA call (with K/V
repeated per query head and a float mask) per sequence per layer. Here every decode row (one new
token) in the batch, one sequence or many, is handled by one SDPA call per layer: the contexts
are gathered through the block tables whole blocks at a time (one `index` over the cache's block
dimension: rows of block_size * kv_heads * head_dim values, K and V together) into a padded
[S, kv_heads, max_ctx, head_dim] view, and `scaled_dot_product_attention` runs GQA itself
(`enable_gqa`, no repeated K/V) with a boolean length mask (none for a single sequence: its
context is sliced to its length). Prefill chunks (several new tokens) still go one sequence at a
time, where a single SDPA call is already large. The gather indices depend only on the step, not
the layer, so they are planned once per step (`DecodePlan`) and reused by every layer.

Masked positions are cache slots past a sequence's length in its last block (or another
sequence's padding): SDPA gives them zero weight, which is exact as long as the cache holds
finite values there: it is allocated zeroed (engine/kv_cache.py) and only ever written with K/V.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from compiled_serve.kernels.paged_attention import paged_attention_reference, write_kv_reference


class DecodePlan(NamedTuple):
    decode_rows: torch.Tensor | None  # [S] query rows of the decoding sequences; None: rows 0..S-1, all of q
    tables: torch.Tensor  # [S, nb] int64 blocks of each decoding sequence (the longest's count)
    ctx: int  # nb * block_size, or the single sequence's length
    mask: torch.Tensor | None  # [S, 1, 1, ctx] bool: position < seq_len; None for one sequence
    prefill: list[int]  # sequences with a multi-token chunk (handled by the reference)
    prefill_rows: torch.Tensor | None  # their query rows, back to back
    prefill_qsl: list[int]  # query_start_loc of the prefill sub-batch


def plan_decode(block_tables: torch.Tensor, seq_lens: list[int], query_start_loc: list[int],
                block_size: int, num_rows: int | None = None) -> DecodePlan | None:
    """None when no sequence decodes (a prefill-only step: the reference)."""
    q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(len(seq_lens))]
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if not decode:
        return None
    prefill = [i for i, n in enumerate(q_lens) if n > 1]
    prefill_rows, sub_qsl = None, [0]
    if prefill:
        rows = []
        for i in prefill:
            rows.append(torch.arange(query_start_loc[i], query_start_loc[i + 1]))
            sub_qsl.append(sub_qsl[-1] + q_lens[i])
        prefill_rows = torch.cat(rows)
    lens = [seq_lens[i] for i in decode]
    longest = max(lens)
    num_blocks = -(-longest // block_size)
    tables = block_tables[decode, :num_blocks].long()  # [S, nb]
    if len(decode) == 1:
        ctx, mask = longest, None
    else:
        ctx = num_blocks * block_size
        mask = (torch.arange(ctx)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
    rows = [query_start_loc[i] for i in decode]
    whole = not prefill and rows == list(range(len(decode))) and num_rows == len(decode)
    return DecodePlan(None if whole else torch.tensor(rows), tables, ctx, mask, prefill, prefill_rows, sub_qsl)


def paged_attention_cpu(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    plan: DecodePlan | None = None,
) -> torch.Tensor:
    if plan is None:
        plan = plan_decode(block_tables, seq_lens, query_start_loc, kv_cache.shape[2], q.shape[0])
    if plan is None:
        return paged_attention_reference(q, kv_cache, block_tables, seq_lens, query_start_loc, scale)
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    s, nb = plan.tables.shape
    # One gather of whole blocks, K and V together: [2, S * nb, bs*kvh*hd] -> [2, S, nb*bs, kvh, hd].
    # index_select, not kv_cache[:, tables]: the same copy in 12 instead of 56 us for one sequence.
    blocks = kv_cache.view(2, kv_cache.shape[1], -1)
    kv = torch.index_select(blocks, 1, plan.tables.view(-1)).view(2, s, -1, num_kv_heads, head_dim)[:, :, : plan.ctx]
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [S, kvh, ctx, hd] (strided views)
    qd = q if plan.decode_rows is None else q[plan.decode_rows]
    qd = qd.view(s, -1, 1, head_dim).to(k.dtype)  # [S, heads, 1, hd]
    o = F.scaled_dot_product_attention(qd, k, v, attn_mask=plan.mask, scale=scale,
                                       enable_gqa=qd.shape[1] != num_kv_heads)
    o = o.view(s, -1, head_dim).to(q.dtype)
    if plan.decode_rows is None:
        return o
    out = torch.zeros_like(q)
    if plan.prefill:
        out[plan.prefill_rows] = paged_attention_reference(
            q[plan.prefill_rows], kv_cache, block_tables[plan.prefill], [seq_lens[i] for i in plan.prefill],
            plan.prefill_qsl, scale)
    out[plan.decode_rows] = o
    return out


def write_kv_cpu(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 all_valid: bool | None = None) -> None:
    """`write_kv_reference` in one scatter (K and V stacked) when no row is padding (the CPU step pads
    none); `all_valid`: that is already known (the op checks once a step, not once a layer)."""
    n = slot_mapping.shape[0]
    if all_valid is None:
        all_valid = bool((slot_mapping >= 0).all())
    if not all_valid:
        write_kv_reference(k, v, kv_cache, slot_mapping)
        return
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])  # [2, slots, kvh, hd]
    flat[:, slot_mapping] = torch.stack((k[:n], v[:n])).to(flat.dtype)
