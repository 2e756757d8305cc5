"""An FP8 (e4m3) KV cache: the Triton write and attention against the pure-torch reference on CUDA
(the interpreter's float8 casts differ from the GPU's), and the reference's own rounding on the CPU."""

from __future__ import annotations

import pytest
import torch

from compiled_serve.kernels.paged_attention import paged_attention_reference, write_kv_reference

FP8 = torch.float8_e4m3fn


def test_the_reference_write_stores_scaled_saturated_e4m3_values() -> None:
    torch.manual_seed(0)
    cache = torch.zeros(2, 4, 4, 2, 8, dtype=FP8)
    k, v = torch.randn(3, 2, 8) * 400, torch.randn(3, 2, 8)
    write_kv_reference(k, v, cache, torch.tensor([0, 5, -1]), k_scale=2.0, v_scale=0.25)
    flat = cache.view(2, -1, 2, 8).float()
    want_k = (k[:2] / 2.0).clamp(-448, 448)
    # e4m3: 3 mantissa bits, a value within 2^-4 of itself; nothing past 448; the padding row unwritten.
    assert bool(((flat[0, [0, 5]] - want_k).abs() <= want_k.abs() * 2.0 ** -4 + 2.0 ** -9).all())
    assert float(flat[0].abs().max()) <= 448.0
    assert bool(((flat[1, [0, 5]] - v[:2] / 0.25).abs() <= (v[:2] / 0.25).abs() * 2.0 ** -4 + 2.0 ** -9).all())
    assert int((flat != 0).any(-1).any(-1).sum()) == 4  # two slots in each of K and V


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 e4m3 in Triton needs an sm89+ CUDA device")
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (2.0, 0.5)])
def test_triton_fp8_cache_matches_the_reference(k_scale: float, v_scale: float) -> None:
    from compiled_serve.kernels.kv_write import paged_attention_with_kv_write_triton

    torch.manual_seed(1)
    dev = torch.device("cuda")
    kvh, hd, bs, nb, heads = 2, 64, 16, 32, 8
    lens, q_lens = [37, 5, 70], [37, 1, 3]  # a prefill, a decode, a chunk
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    tables = torch.randperm(nb)[: 3 * 5].view(3, 5).to(torch.int32)
    slots = []
    for s, (ctx, n) in enumerate(zip(lens, q_lens)):
        slots += [int(tables[s, p // bs]) * bs + p % bs for p in range(ctx - n, ctx)]
    # The context before this step's tokens: already in both caches, the same e4m3 bytes.
    base = torch.zeros(2, nb, bs, kvh, hd, dtype=FP8)
    old = torch.randn(2, nb * bs, kvh, hd) * 3
    base.view(2, -1, kvh, hd).copy_(old.clamp(-448, 448).to(FP8))
    t = qsl[-1]
    q = torch.randn(t, heads, hd, dtype=torch.bfloat16)
    k = (torch.randn(t, kvh, hd) * 600).to(torch.bfloat16)  # some past 448 * k_scale: saturated
    v = torch.randn(t, kvh, hd, dtype=torch.bfloat16)
    slot_mapping = torch.tensor(slots)

    ref_cache = base.clone()
    write_kv_reference(k, v, ref_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    deq = ref_cache.float()
    deq[0] *= k_scale
    deq[1] *= v_scale
    want = paged_attention_reference(q.float(), deq, tables, lens, qsl, 0.125)

    cache = base.to(dev)
    got = paged_attention_with_kv_write_triton(
        q.to(dev), k.to(dev), v.to(dev), cache, slot_mapping.to(dev), tables.to(dev),
        torch.tensor(lens, dtype=torch.int32, device=dev), torch.tensor(qsl, dtype=torch.int32, device=dev),
        max(q_lens), max(lens), 0.125, k_scale=k_scale, v_scale=v_scale)
    # The written bytes are the reference's (both round to nearest e4m3, saturating at 448).
    assert torch.equal(cache.cpu().view(torch.uint8), ref_cache.view(torch.uint8))
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-2)
