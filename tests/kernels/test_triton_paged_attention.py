"""Unified Triton paged attention (and the KV write in front of it) against the torch references."""

from __future__ import annotations

import random

import pytest
import torch

from compiled_serve.kernels.paged_attention import paged_attention_reference, write_kv_reference

triton = pytest.importorskip("triton")

from compiled_serve.kernels.kv_write import (  # noqa: E402
    paged_attention_with_kv_write_triton,
    write_kv_triton,
)
from compiled_serve.kernels.triton_attention_config import choose_num_splits  # noqa: E402
from compiled_serve.kernels.triton_paged_attention import paged_attention_triton  # noqa: E402

SCALE = 0.125

# (context incl. new tokens, new tokens) per sequence, kv heads, GQA group, head_dim, block size, pad rows
CASES = {
    # decode rows with long contexts, a prefill chunk on a cached prefix, a fresh odd-length prefill
    "mixed_gqa4_d64": ([(70, 1), (45, 13), (17, 17), (100, 1)], 2, 4, 64, 16, 3),
    # lengths at and around block boundaries, plain MHA
    "boundaries_mha_d128": ([(15, 15), (16, 1), (17, 2), (32, 32), (33, 1)], 1, 1, 128, 16, 0),
    # GQA 8, 32-slot blocks, a sequence with no new tokens (CUDA-graph padding sequence)
    "gqa8_bs32": ([(31, 1), (32, 3), (5, 0), (65, 9)], 1, 8, 128, 32, 5),
    # pure decode batch
    "decode_gqa4": ([(1, 1), (16, 1), (47, 1), (64, 1)], 2, 4, 64, 16, 2),
}


def _random_seqs(rng: random.Random, n: int) -> list[tuple[int, int]]:
    seqs = []
    for _ in range(n):
        kind = rng.choice(["decode", "chunk", "fresh"])
        ctx = rng.randint(1, 80)
        q_len = 1 if kind == "decode" else ctx if kind == "fresh" else rng.randint(1, ctx)
        seqs.append((ctx, q_len))
    return seqs


def _attend(
    batch, out: torch.Tensor | None = None, max_query_len: int | None = None, num_splits: int | None = None
) -> torch.Tensor:
    mql = batch.max_query_len if max_query_len is None else max_query_len
    return paged_attention_triton(
        batch.q,
        batch.kv_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        mql,
        batch.max_seq_len,
        SCALE,
        out=out,
        num_splits=num_splits,
    )


def _write_and_attend(batch, out: torch.Tensor) -> torch.Tensor:
    return paged_attention_with_kv_write_triton(
        batch.q,
        batch.k,
        batch.v,
        batch.kv_cache,
        batch.slot_mapping,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        batch.max_query_len,
        batch.max_seq_len,
        SCALE,
        out=out,
    )


def _check_attention(batch, out: torch.Tensor, rel_err, tol: float) -> None:
    ref = paged_attention_reference(
        batch.q.float(),
        batch.kv_cache.float(),
        batch.block_tables,
        batch.seq_lens_host,
        batch.query_start_loc_host,
        SCALE,
    )
    assert not torch.isnan(out).any(), "some output rows were never written"
    pad = batch.query_start_loc_host[-1]
    assert torch.all(out[pad:] == 0), "padding rows must come back as zeros"
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("case", sorted(CASES))
def test_paged_attention_matches_reference(case: str, triton_device, make_paged_batch, rel_err) -> None:
    seqs, kvh, group, head_dim, block_size, pad = CASES[case]
    batch = make_paged_batch(
        seqs,
        num_kv_heads=kvh,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        pad_rows=pad,
        device=triton_device,
    )
    out = torch.full_like(batch.q, float("nan"))
    _attend(batch, out)
    _check_attention(batch, out, rel_err, 1e-4)


@pytest.mark.parametrize("seed", [1, 2])
def test_paged_attention_random_batches(seed: int, triton_device, make_paged_batch, rel_err) -> None:
    rng = random.Random(seed)
    group = rng.choice([1, 4, 8])
    batch = make_paged_batch(
        _random_seqs(rng, rng.randint(2, 5)),
        num_kv_heads=rng.choice([1, 2]),
        group=group,
        head_dim=rng.choice([64, 128]),
        block_size=rng.choice([16, 32]),
        pad_rows=rng.randint(0, 4),
        device=triton_device,
        seed=seed,
    )
    out = torch.full_like(batch.q, float("nan"))
    _attend(batch, out)
    _check_attention(batch, out, rel_err, 1e-4)


@pytest.mark.parametrize(
    ("seqs", "max_query_len"),
    [
        ([(20, 6), (9, 9), (30, 1)], 1),  # understated: one narrow-tile launch takes everything
        ([(20, 6), (9, 9), (30, 1)], 64),  # two launches split the sequences between them
        ([(17, 1), (40, 1)], 64),  # overstated: the wide-tile launch owns nothing
    ],
)
def test_length_hints_never_change_results(
    seqs: list[tuple[int, int]], max_query_len: int, triton_device, make_paged_batch, rel_err
) -> None:
    """max_query_len only picks launches and tile shapes; results must not depend on it."""
    batch = make_paged_batch(
        seqs, num_kv_heads=2, group=4, head_dim=64, block_size=16, pad_rows=1, device=triton_device
    )
    out = torch.full_like(batch.q, float("nan"))
    _attend(batch, out, max_query_len=max_query_len)
    _check_attention(batch, out, rel_err, 1e-4)


@pytest.mark.parametrize("num_splits", [2, 16])
def test_split_kv_matches_reference(num_splits: int, triton_device, make_paged_batch, rel_err) -> None:
    """Split-KV partials + merge; 16 splits of 64-key slices leave most slices empty here."""
    batch = make_paged_batch(
        [(130, 1), (17, 1), (64, 1), (40, 9)],
        num_kv_heads=2,
        group=4,
        head_dim=64,
        block_size=16,
        pad_rows=2,
        device=triton_device,
    )
    out = torch.full_like(batch.q, float("nan"))
    _attend(batch, out, max_query_len=1, num_splits=num_splits)
    _check_attention(batch, out, rel_err, 1e-4)


def test_split_heuristic_only_splits_small_batches() -> None:
    assert choose_num_splits(1 * 8, 4096, sms=132) == 16
    assert choose_num_splits(8 * 8, 2048, sms=132) == 8  # ceil(264 / 64) = 5 -> 8
    assert choose_num_splits(64 * 8, 1024, sms=132) == 1
    assert choose_num_splits(1 * 8, 300, sms=132) == 1  # too short to be worth splitting


def test_write_kv_matches_reference_and_skips_padding(triton_device, make_paged_batch) -> None:
    batch = make_paged_batch(
        [(20, 6), (3, 3), (40, 1)],
        num_kv_heads=2,
        group=1,
        head_dim=64,
        block_size=16,
        pad_rows=3,
        device=triton_device,
    )
    # k and v as strided views of one fused qkv-style buffer, as a model's projection leaves them.
    num_tokens = batch.q.shape[0]
    kv = torch.randn(num_tokens, 2 * 2 * 64 + 32, device=triton_device)
    kv[batch.query_start_loc_host[-1] :] = 1e6  # padding rows: must never reach the cache
    k = kv[:, :128].view(num_tokens, 2, 64)
    v = kv[:, 128:256].view(num_tokens, 2, 64)
    expected = batch.kv_cache.clone()
    write_kv_reference(k, v, expected, batch.slot_mapping)
    write_kv_triton(k, v, batch.kv_cache, batch.slot_mapping)
    assert torch.equal(batch.kv_cache, expected)
    assert batch.kv_cache.abs().max() < 1e6


def test_write_then_attend_matches_reference(triton_device, make_paged_batch, rel_err) -> None:
    batch = make_paged_batch(
        [(33, 1), (18, 18), (50, 7)],
        num_kv_heads=2,
        group=4,
        head_dim=64,
        block_size=16,
        pad_rows=2,
        device=triton_device,
    )
    cache_ref = batch.kv_cache.clone()
    write_kv_reference(batch.k, batch.v, cache_ref, batch.slot_mapping)
    ref = paged_attention_reference(
        batch.q, cache_ref, batch.block_tables, batch.seq_lens_host, batch.query_start_loc_host, SCALE
    )
    out = torch.full_like(batch.q, float("nan"))
    _write_and_attend(batch, out)
    assert torch.equal(batch.kv_cache, cache_ref)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-4


# ---- GPU: bf16, larger shapes (skipped without CUDA) ----

GPU_CASES = {
    "llama8b_mixed": ([(1024, 1)] * 24 + [(700, 300), (513, 513), (2048, 1), (129, 64)], 8, 4, 128, 16, 7),
    "gqa8_d128_bs32": ([(4096, 1)] * 8 + [(1000, 250)], 4, 8, 128, 32, 0),
    "mha_d64": ([(300, 1), (301, 17), (256, 256)], 16, 1, 64, 16, 3),
    # few sequences: split-KV decode (16 splits) and its merge
    "small_decode_split": ([(4000, 1), (17, 1), (2048, 1)], 8, 4, 128, 16, 1),
    "spec_decode_q4": ([(999, 4), (64, 3), (1500, 4)], 8, 4, 128, 16, 2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_paged_attention_gpu(case: str, dtype: torch.dtype, cuda_device, make_paged_batch, rel_err) -> None:
    seqs, kvh, group, head_dim, block_size, pad = GPU_CASES[case]
    batch = make_paged_batch(
        seqs,
        num_kv_heads=kvh,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        pad_rows=pad,
        dtype=dtype,
        device=cuda_device,
    )
    cache_ref = batch.kv_cache.clone()
    write_kv_reference(batch.k, batch.v, cache_ref, batch.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))
    _write_and_attend(batch, out)
    torch.cuda.synchronize()
    assert torch.equal(batch.kv_cache, cache_ref)
    _check_attention(batch, out.float(), rel_err, 2e-2)


@pytest.mark.gpu
def test_paged_attention_gpu_fp32(cuda_device, make_paged_batch, rel_err) -> None:
    batch = make_paged_batch(
        [(1024, 1)] * 8 + [(333, 100)],
        num_kv_heads=8,
        group=4,
        head_dim=128,
        block_size=16,
        pad_rows=3,
        device=cuda_device,
    )
    out = torch.full_like(batch.q, float("nan"))
    _attend(batch, out)
    _check_attention(batch, out, rel_err, 1e-4)
