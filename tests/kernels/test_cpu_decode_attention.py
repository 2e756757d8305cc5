"""The C decode-attention kernel (kernels/cpu_decode_attention.c) against the pure-torch reference:
the KV write must equal `write_kv_reference` bit for bit, the attention `paged_attention_reference`
within float32 tolerance, for one sequence and many, GQA groups, long contexts and strided views."""

from __future__ import annotations

import pytest
import torch

from compiled_serve.kernels import cpu_decode_attention
from compiled_serve.kernels.paged_attention import paged_attention_reference, write_kv_reference

pytestmark = pytest.mark.skipif(not cpu_decode_attention.available(), reason="no C compiler for the CPU kernel")


def _case(ctx: list[int], kvh: int, group: int, hd: int, bs: int, seed: int, qkv_packed: bool = False):
    torch.manual_seed(seed)
    max_blocks = -(-max(ctx) // bs) + 1
    nb = len(ctx) * max_blocks + 3
    cache = torch.randn(2, nb, bs, kvh, hd) * 2  # stale finite values everywhere: must not leak in
    tables = torch.randperm(nb)[: len(ctx) * max_blocks].view(len(ctx), max_blocks).to(torch.int32)
    slots = torch.tensor([int(tables[i, (n - 1) // bs]) * bs + (n - 1) % bs for i, n in enumerate(ctx)])
    s, h = len(ctx), kvh * group
    if qkv_packed:  # q, k, v as views of one projection output, as the model's graph hands them over
        qkv = torch.randn(s, (h + 2 * kvh) * hd)
        q = qkv[:, : h * hd].view(s, h, hd)
        k = qkv[:, h * hd: (h + kvh) * hd].view(s, kvh, hd)
        v = qkv[:, (h + kvh) * hd:].view(s, kvh, hd)
    else:
        q, k, v = torch.randn(s, h, hd), torch.randn(s, kvh, hd), torch.randn(s, kvh, hd)
    return q, k, v, cache, slots, tables


def _step(slots, tables, lens):
    step = cpu_decode_attention.plan_step(slots, tables, lens, int(lens.max()))
    assert step is not None
    return step


@pytest.mark.parametrize(("ctx", "kvh", "group", "hd", "bs"), [
    ([1], 3, 3, 64, 16),  # the embedded model's geometry, first decode
    ([150], 3, 3, 64, 16),
    ([16, 5, 33, 1, 200], 2, 4, 32, 16),
    ([40, 40], 4, 1, 8, 4),  # no GQA
    ([1000, 3], 1, 8, 128, 16),  # one KV head, head_dim 128, a long context
])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_reference(ctx, kvh, group, hd, bs, threads):
    q, k, v, cache, slots, tables = _case(ctx, kvh, group, hd, bs, seed=sum(ctx) + hd)
    ref_cache = cache.clone()
    write_kv_reference(k, v, ref_cache, slots)
    ref = paged_attention_reference(q, ref_cache, tables, ctx, list(range(len(ctx) + 1)), 0.125)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lens = torch.tensor(ctx, dtype=torch.int32)
        out = cpu_decode_attention.decode_attention(q, k, v, cache, _step(slots, tables, lens), 0.125)
    finally:
        torch.set_num_threads(before)
    assert out is not None
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_strided_views_of_one_projection():
    q, k, v, cache, slots, tables = _case([7, 70], 3, 3, 64, 16, seed=5, qkv_packed=True)
    assert not q.is_contiguous()
    ref_cache = cache.clone()
    write_kv_reference(k, v, ref_cache, slots)
    ref = paged_attention_reference(q, ref_cache, tables, [7, 70], [0, 1, 2], 0.3)
    lens = torch.tensor([7, 70], dtype=torch.int32)
    out = cpu_decode_attention.decode_attention(q, k, v, cache, _step(slots, tables, lens), 0.3)
    assert out is not None and torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_declines_what_it_does_not_take():
    q, k, v, cache, slots, tables = _case([9], 2, 2, 16, 4, seed=1)
    lens = torch.tensor([9], dtype=torch.int32)
    step = _step(slots, tables, lens)
    attend = cpu_decode_attention.decode_attention
    assert attend(q.bfloat16(), k, v, cache, step, 0.5) is None
    assert attend(q, k, v, cache.bfloat16(), step, 0.5) is None
    assert attend(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cache, step, 0.5) is None
    assert attend(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]), cache, step, 0.5) is None  # rows != seqs
    too_many_heads = torch.randn(1, 2 * 65, 16)  # 130 heads: past MAX_HEADS
    assert attend(too_many_heads, k, v, cache, step, 0.5) is None
    assert torch.equal(cache, _case([9], 2, 2, 16, 4, seed=1)[3])  # declined calls write nothing
    assert cpu_decode_attention.plan_step(slots.int(), tables, lens, 9) is None
    assert cpu_decode_attention.plan_step(slots, tables.long(), lens, 9) is None
