"""A faster CPU implementation of paged attention, tested against `paged_attention_reference`.

The reference loops over sequences in Python, which costs one small SDPA call per sequence per
layer. Here every decode row (one new token) in the batch is handled in one batched computation:
the contexts are gathered through the block tables into a padded [S, max_ctx] layout and masked
by length. Prefill chunks (several new tokens) still go one sequence at a time, where a single
SDPA call is already large.
"""

from __future__ import annotations

import torch

from compiled_serve.kernels.paged_attention import paged_attention_reference


def paged_attention_cpu(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
) -> torch.Tensor:
    q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(len(seq_lens))]
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if len(decode) < 2:
        return paged_attention_reference(q, kv_cache, block_tables, seq_lens, query_start_loc, scale)
    out = torch.zeros_like(q)
    prefill = [i for i, n in enumerate(q_lens) if n > 1]
    if prefill:  # sequences with chunks: the reference on just those rows
        sub_qsl, rows = [0], []
        for i in prefill:
            rows.append(torch.arange(query_start_loc[i], query_start_loc[i + 1]))
            sub_qsl.append(sub_qsl[-1] + q_lens[i])
        rows_t = torch.cat(rows)
        out[rows_t] = paged_attention_reference(
            q[rows_t], kv_cache, block_tables[prefill], [seq_lens[i] for i in prefill], sub_qsl, scale)

    block_size, num_kv_heads, head_dim = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
    group = q.shape[1] // num_kv_heads
    lens = torch.tensor([seq_lens[i] for i in decode])
    max_ctx = int(max(seq_lens[i] for i in decode))
    num_blocks = -(-max_ctx // block_size)
    tables = block_tables[decode, :num_blocks].long()  # [S, nb]
    k = kv_cache[0][tables].reshape(len(decode), num_blocks * block_size, num_kv_heads, head_dim)
    v = kv_cache[1][tables].reshape(len(decode), num_blocks * block_size, num_kv_heads, head_dim)
    rows = torch.tensor([query_start_loc[i] for i in decode])
    qd = q[rows].view(len(decode), num_kv_heads, group, head_dim).to(k.dtype)  # [S, kvh, g, hd]
    scores = torch.einsum("skgd,sckd->skgc", qd, k) * scale  # [S, kvh, g, ctx]
    valid = torch.arange(num_blocks * block_size)[None, :] < lens[:, None]  # [S, ctx]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    o = torch.einsum("skgc,sckd->skgd", probs, v)  # [S, kvh, g, hd]
    out[rows] = o.reshape(len(decode), -1, head_dim).to(q.dtype)
    return out
