"""A faster CPU implementation of paged attention, tested against `paged_attention_reference`.

The reference loops over sequences in Python, which costs one small SDPA call per sequence per
layer. Here every decode row (one new token) in the batch is handled in one batched computation:
the contexts are gathered through the block tables into a padded [S, max_ctx] layout and masked
by length. Prefill chunks (several new tokens) still go one sequence at a time, where a single
SDPA call is already large. The gather indices depend only on the step, not the layer, so they are
planned once per step (`DecodePlan`) and reused by every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compiled_serve.kernels.paged_attention import paged_attention_reference


class DecodePlan(NamedTuple):
    decode_rows: torch.Tensor  # [S] query rows of the decoding sequences
    slots: torch.Tensor  # [S, max_ctx] cache slot of every context position (clamped where invalid)
    valid: torch.Tensor  # [S, max_ctx] bool: position < seq_len
    prefill: list[int]  # sequences with a multi-token chunk (handled by the reference)
    prefill_rows: torch.Tensor | None  # their query rows, back to back
    prefill_qsl: list[int]  # query_start_loc of the prefill sub-batch


def plan_decode(block_tables: torch.Tensor, seq_lens: list[int], query_start_loc: list[int],
                block_size: int) -> DecodePlan | None:
    """None when fewer than two sequences decode (the reference is as fast then)."""
    q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(len(seq_lens))]
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if len(decode) < 2:
        return None
    prefill = [i for i, n in enumerate(q_lens) if n > 1]
    prefill_rows, sub_qsl = None, [0]
    if prefill:
        rows = []
        for i in prefill:
            rows.append(torch.arange(query_start_loc[i], query_start_loc[i + 1]))
            sub_qsl.append(sub_qsl[-1] + q_lens[i])
        prefill_rows = torch.cat(rows)
    lens = torch.tensor([seq_lens[i] for i in decode])
    num_blocks = -(-int(lens.max()) // block_size)
    tables = block_tables[decode, :num_blocks].long()  # [S, nb]
    pos = torch.arange(num_blocks * block_size)
    slots = tables[:, pos // block_size] * block_size + pos % block_size  # [S, ctx]
    return DecodePlan(torch.tensor([query_start_loc[i] for i in decode]), slots, pos[None, :] < lens[:, None],
                      prefill, prefill_rows, sub_qsl)


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
        plan = plan_decode(block_tables, seq_lens, query_start_loc, kv_cache.shape[2])
    if plan is None:
        return paged_attention_reference(q, kv_cache, block_tables, seq_lens, query_start_loc, scale)
    out = torch.zeros_like(q)
    if plan.prefill:
        out[plan.prefill_rows] = paged_attention_reference(
            q[plan.prefill_rows], kv_cache, block_tables[plan.prefill], [seq_lens[i] for i in plan.prefill],
            plan.prefill_qsl, scale)
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)  # [2, slots, kvh, hd]
    k = flat[0][plan.slots]  # [S, ctx, kvh, hd]
    v = flat[1][plan.slots]
    s = plan.decode_rows.shape[0]
    qd = q[plan.decode_rows].view(s, num_kv_heads, -1, head_dim).to(k.dtype)  # [S, kvh, g, hd]
    scores = torch.einsum("skgd,sckd->skgc", qd, k) * scale  # [S, kvh, g, ctx]
    scores = scores.masked_fill(~plan.valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    o = torch.einsum("skgc,sckd->skgd", probs, v)  # [S, kvh, g, hd]
    out[plan.decode_rows] = o.reshape(s, -1, head_dim).to(q.dtype)
    return out
