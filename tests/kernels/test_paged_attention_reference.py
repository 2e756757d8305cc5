"""The pure-torch paged-attention reference against dense causal attention per sequence."""

from __future__ import annotations

import pytest
import torch

from compiled_serve.kernels.causal_attention import causal_attention_reference
from compiled_serve.kernels.paged_attention import paged_attention_reference, write_kv_reference


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_over_cached_context_matches_dense(group: int, block_size: int):
    torch.manual_seed(group * 100 + block_size)
    kvh, hd = 2, 8
    heads = kvh * group
    ctx_lens, q_lens = [9, 17, 1, 32], [3, 17, 1, 1]  # chunk on cached prefix, fresh prefill, decodes
    num_blocks = 40
    cache = torch.zeros(2, num_blocks, block_size, kvh, hd)
    perm = torch.randperm(num_blocks).tolist()  # scattered blocks
    tables, qs, ks, vs, slots, dense = [], [], [], [], [], []
    qsl = [0]
    for ctx, ql in zip(ctx_lens, q_lens):
        nb = -(-ctx // block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks + [0] * (8 - nb))
        q = torch.randn(ctx, heads, hd)
        k = torch.randn(ctx, kvh, hd)
        v = torch.randn(ctx, kvh, hd)
        # the cached part is written beforehand, the new part by this step
        pre = [blocks[p // block_size] * block_size + p % block_size for p in range(ctx)]
        write_kv_reference(k[: ctx - ql], v[: ctx - ql], cache, torch.tensor(pre[: ctx - ql], dtype=torch.long))
        qs.append(q[ctx - ql:])
        ks.append(k[ctx - ql:])
        vs.append(v[ctx - ql:])
        slots += pre[ctx - ql:]
        qsl.append(qsl[-1] + ql)
        dense.append(causal_attention_reference(q, k, v, 0.3)[ctx - ql:])
    pad = 2  # bucket padding rows
    q = torch.cat(qs + [torch.randn(pad, heads, hd)])
    k = torch.cat(ks + [torch.randn(pad, kvh, hd)])
    v = torch.cat(vs + [torch.randn(pad, kvh, hd)])
    before = cache.clone()
    write_kv_reference(k, v, cache, torch.tensor(slots + [-1] * pad))
    assert (cache != before).any()
    out = paged_attention_reference(q, cache, torch.tensor(tables, dtype=torch.int32), ctx_lens, qsl, 0.3)
    torch.testing.assert_close(out[: qsl[-1]], torch.cat(dense), rtol=1e-5, atol=1e-5)
    assert (out[qsl[-1]:] == 0).all()


@pytest.mark.parametrize("group", [1, 3])
def test_cpu_batched_decode_matches_reference(group: int):
    from compiled_serve.kernels.paged_attention_cpu import paged_attention_cpu

    torch.manual_seed(7 + group)
    kvh, hd, bs, nb = 2, 8, 4, 64
    cache = torch.randn(2, nb, bs, kvh, hd)
    ctx = [1, 5, 16, 17, 9, 33]
    q_lens = [1, 1, 1, 4, 1, 1]  # decodes plus one chunk
    tables = torch.randperm(nb)[: len(ctx) * 9].view(len(ctx), 9).to(torch.int32)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1] + 3, kvh * group, hd)  # 3 padding rows
    ref = paged_attention_reference(q, cache, tables, ctx, qsl, 0.5)
    fast = paged_attention_cpu(q, cache, tables, ctx, qsl, 0.5)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ctx", [[1], [37], [16, 5, 33, 1], [40, 40]])
def test_cpu_decode_only_matches_reference(ctx: list[int]):
    """Decode-only steps (one sequence or many, no padding rows): the one-SDPA path returns its
    output as is; stale finite values past each length in the cache must not leak in."""
    from compiled_serve.kernels.paged_attention_cpu import paged_attention_cpu, plan_decode

    torch.manual_seed(len(ctx) + ctx[0])
    kvh, group, hd, bs, nb = 3, 3, 8, 16, 32
    cache = torch.randn(2, nb, bs, kvh, hd) * 3
    tables = torch.randperm(nb)[: len(ctx) * 3].view(len(ctx), 3).to(torch.int32)
    qsl = list(range(len(ctx) + 1))
    q = torch.randn(len(ctx), kvh * group, hd)
    plan = plan_decode(tables, ctx, qsl, bs, q.shape[0])
    assert plan is not None and plan.decode_rows is None and (plan.mask is None) == (len(ctx) == 1)
    ref = paged_attention_reference(q, cache, tables, ctx, qsl, 0.35)
    torch.testing.assert_close(paged_attention_cpu(q, cache, tables, ctx, qsl, 0.35, plan=plan), ref,
                               rtol=1e-5, atol=1e-5)


def test_cpu_one_decode_with_prefill_and_padding_matches_reference():
    from compiled_serve.kernels.paged_attention_cpu import paged_attention_cpu

    torch.manual_seed(3)
    kvh, hd, bs, nb = 2, 8, 4, 32
    cache = torch.randn(2, nb, bs, kvh, hd)
    ctx, qsl = [9, 6], [0, 5, 6]  # a chunk of 5, then one decode
    tables = torch.randperm(nb)[:8].view(2, 4).to(torch.int32)
    q = torch.randn(8, kvh * 2, hd)  # 2 padding rows
    ref = paged_attention_reference(q, cache, tables, ctx, qsl, 0.5)
    torch.testing.assert_close(paged_attention_cpu(q, cache, tables, ctx, qsl, 0.5), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [0, 2])
def test_cpu_kv_write_matches_reference(padding: int):
    from compiled_serve.kernels.paged_attention_cpu import write_kv_cpu

    torch.manual_seed(padding)
    cache = torch.randn(2, 8, 4, 2, 8)
    slots = torch.tensor([5, 0, 31, 12] + [-1] * padding)
    k, v = torch.randn(len(slots), 2, 8), torch.randn(len(slots), 2, 8)
    ref = cache.clone()
    write_kv_reference(k, v, ref, slots)
    write_kv_cpu(k, v, cache, slots)
    assert torch.equal(cache, ref)
