"""Split-row sampler path (kernels/triton_sampler_split.py) against the reference and the per-row kernel.

The reference is `logits_tail`; the per-row kernel (`split_rows=False`) computes the same race
scores bit for bit, so the two kernels must agree on every row, ties included. On the CPU the
kernels run in the Triton interpreter: rows are few and vocabularies small, with small tiles and
an explicit program target so that chunks span several tiles and the last chunk is short.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fused_sampling import _allowed, _check_rows, _random_logits, _random_settings

from compiled_serve.kernels.logits_tail import logits_tail


def _both_kernels(
    logits: torch.Tensor,
    settings: tuple[torch.Tensor, ...],
    block: int | None = None,
    target: int | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((ids, logprobs) of the split path, (ids, logprobs) of the per-row kernel)."""
    from compiled_serve.kernels.triton_sampler import fused_sample_triton
    from compiled_serve.kernels.triton_sampler_split import fused_sample_split_rows

    row_kernel = fused_sample_triton(logits, *settings, block=block, split_rows=False)
    if target is None:  # the production dispatch
        split = fused_sample_triton(logits, *settings, block=block)
    else:
        ids = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        logprobs = torch.empty_like(ids, dtype=torch.float32)
        split = fused_sample_split_rows(
            ids, logprobs, logits, *settings, block=block or 1024, target_programs=target
        )
    return split, row_kernel


def _assert_matches(logits: torch.Tensor, settings: tuple[torch.Tensor, ...], **kwargs: int) -> torch.Tensor:
    """Split path == reference tokens, == per-row kernel tokens; logprobs within 1e-5. Returns ids."""
    (ids, logprobs), (row_ids, row_logprobs) = _both_kernels(logits, settings, **kwargs)
    ref_ids, ref_logprobs = logits_tail(logits, *settings)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(ids, row_ids)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs, row_logprobs, atol=1e-5, rtol=0)
    _check_rows(logits, settings, ids, logprobs)
    return ids


def _uniform_settings(num_rows: int, temperature: float, min_p: float, greedy: bool, device: str):
    full = lambda v, dtype=torch.float32: torch.full((num_rows,), v, dtype=dtype, device=device)  # noqa: E731
    return (full(temperature), full(0, torch.int32), full(1.0), full(min_p),
            torch.arange(num_rows, device=device) * 7919 - 2**40, torch.arange(num_rows, device=device) + 3,
            full(greedy, torch.bool))  # fmt: skip


CHUNKED_SHAPES = [
    (1, 128256, 1024),
    (3, 151936, 1024),
    (256, 151936, 1024),
    (5, 3001, 64),
    (1, 17, 32),
    (700, 1000, 64),
]


@pytest.mark.parametrize(("num_rows", "vocab", "block"), CHUNKED_SHAPES)
def test_chunks_cover_the_vocabulary_in_whole_tiles(num_rows: int, vocab: int, block: int) -> None:
    from compiled_serve.kernels.triton_sampler_split import MAX_CHUNKS, TARGET_PROGRAMS, split_chunks

    chunks, tiles = split_chunks(num_rows, vocab, block)
    chunk = tiles * block
    assert 1 <= chunks <= MAX_CHUNKS
    assert (chunks - 1) * chunk < vocab <= chunks * chunk  # covered, and no chunk is empty
    assert num_rows * chunks <= max(num_rows, 2 * TARGET_PROGRAMS)


def test_greedy_rows_take_the_first_maximum(triton_device: str) -> None:
    """Ties across chunks and inside a tile: the lowest index wins, as torch.argmax and the kernel."""
    vocab = 3001  # 8 chunks of 6 tiles of 64 (target 32 over 4 rows); the last chunk is short
    logits = _random_logits(4, vocab, seed=30)
    logits[0, [2000, 700, 2990]] = 50.0  # chunks 5, 1 and 7: chunk 1 holds the first
    logits[1, [1501, 1500, 1530]] = 50.0  # one tile
    logits[2, [1500, 1200]] = 50.0  # one chunk (1152-1535), two tiles
    logits[3, vocab - 1] = 50.0  # the last token, in the short chunk
    settings = _uniform_settings(4, 1.0, 0.0, True, triton_device)
    ids = _assert_matches(logits.to(triton_device), settings, block=64, target=32)
    assert ids.tolist() == [700, 1500, 1200, vocab - 1]


@pytest.mark.parametrize("min_p", [0.0, 0.05])
def test_temperature_rows_draw_the_reference_tokens(min_p: float, triton_device: str) -> None:
    vocab = 2500  # not a multiple of the 4-tile chunks of 128
    logits = _random_logits(4, vocab, seed=31).to(triton_device)
    settings = list(_uniform_settings(4, 1.0, min_p, False, triton_device))
    settings[0] = torch.tensor([1.0, 0.6, 1.4, 2.0], device=triton_device)
    _assert_matches(logits, tuple(settings), block=128, target=16)


def test_min_p_bites_on_flat_rows(triton_device: str) -> None:
    """Near-flat rows where min-p drops about half the tokens: each draw must stay in the kept set."""
    rows, vocab = 12, 700
    logits = (0.1 * _random_logits(rows, vocab, seed=32)).to(triton_device)
    settings = _uniform_settings(rows, 1.0, 0.8, False, triton_device)
    assert _allowed(logits, settings).float().mean() < 0.6  # the filter does bite
    _assert_matches(logits, settings, block=64, target=48)


def test_mixed_batch_searches_top_k_and_top_p_rows_on_the_device(triton_device: str) -> None:
    """Random settings: greedy rows (some with top-k set), temperature / min-p rows, top-k and
    top-p rows; which rows run the chunked threshold search is read on the device."""
    rows, vocab = 8, 1500
    logits = _random_logits(rows, vocab, seed=33).to(triton_device)
    settings = _random_settings(rows, vocab, seed=33, device=triton_device)
    top_k, top_p, greedy = settings[1], settings[2], settings[-1]
    searched = ~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0))
    assert 0 < int(searched.sum()) < rows  # both paths are exercised
    assert bool((greedy & (top_k > 0)).any())  # a greedy row with top-k stays on the split path
    _assert_matches(logits, settings, block=128)


def _search_settings(top_k: list[int], top_p: list[float], min_p: list[float], temperature: float,
                     device: str) -> tuple[torch.Tensor, ...]:  # fmt: skip
    rows = len(top_k)
    settings = list(_uniform_settings(rows, temperature, 0.0, False, device))
    settings[1] = torch.tensor(top_k, dtype=torch.int32, device=device)
    settings[2] = torch.tensor(top_p, dtype=torch.float32, device=device)
    settings[3] = torch.tensor(min_p, dtype=torch.float32, device=device)
    return tuple(settings)


def test_top_k_and_top_p_rows_over_many_chunks_draw_the_reference_tokens(triton_device: str) -> None:
    """Each filter alone and stacked, on rows spread over 20 search chunks and 40 race chunks:
    the chunked threshold search must give the per-row kernel's thresholds, so the same draws."""
    from compiled_serve.kernels.triton_sampler_split import SEARCH_BLOCK, SEARCH_PROGRAMS, split_chunks

    vocab = 5000
    top_k = [1, 7, 0, 0, 50, 4999, 0, 3]
    top_p = [1.0, 1.0, 0.5, 0.9, 0.8, 1.0, 0.999, 0.6]
    min_p = [0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.1]
    assert split_chunks(len(top_k), vocab, SEARCH_BLOCK, SEARCH_PROGRAMS)[0] > 10  # a many-chunk search
    logits = _random_logits(len(top_k), vocab, seed=40).to(triton_device)
    for draw in range(2):  # other seeds: other race winners inside the same kept sets
        settings = _search_settings(top_k, top_p, min_p, 0.8, triton_device)
        settings = settings[:4] + (settings[4] + draw * 104729,) + settings[5:]
        _assert_matches(logits, settings, block=64, target=32)


def test_top_k_ties_at_the_boundary_are_all_kept(triton_device: str) -> None:
    """The k-th largest value repeated across chunks: every copy is kept (key >= threshold), as
    in the per-row kernel, so draws land on all of them over many seeds."""
    vocab, rows = 1200, 16
    logits = torch.full((rows, vocab), -5.0)
    logits[:, 10] = 4.0  # the largest
    tied = [150, 600, 601, 1199]  # the 2nd..5th largest are equal, in three chunks
    logits[:, tied] = 3.5
    logits = logits.to(triton_device)
    settings = _search_settings([3] * rows, [1.0] * rows, [0.0] * rows, 1.0, triton_device)
    settings = settings[:4] + (torch.arange(rows, device=triton_device) * 7919 + 11,) + settings[5:]
    (ids, logprobs), (row_ids, _) = _both_kernels(logits, settings, block=64, target=32)
    assert torch.equal(ids, row_ids)
    assert set(ids.tolist()) <= {10, *tied}
    assert len(set(ids.tolist()) & set(tied)) >= 2  # the ties are all in the kept set
    _check_rows(logits, settings, ids, logprobs)


def test_top_p_keeps_only_the_dominant_token(triton_device: str) -> None:
    """One token holds ~99% of the mass: top_p 0.5 keeps it alone, whatever the seed."""
    vocab, rows = 3000, 6
    logits = _random_logits(rows, vocab, seed=41)
    logits[:, 2345] = 40.0
    settings = _search_settings([0] * rows, [0.5] * rows, [0.0] * rows, 1.0, triton_device)
    settings = settings[:4] + (torch.arange(rows, device=triton_device) * 31 + 5,) + settings[5:]
    ids = _assert_matches(logits.to(triton_device), settings, block=128, target=16)
    assert ids.tolist() == [2345] * rows


@pytest.mark.parametrize("greedy", [True, False])
def test_single_row_spreads_over_many_chunks(greedy: bool, triton_device: str) -> None:
    """Batch 1 at the default target: 40 chunks of 2 tiles of 64, the last one short."""
    from compiled_serve.kernels.triton_sampler_split import split_chunks

    vocab = 5000
    assert split_chunks(1, vocab, 64) == (40, 2)
    logits = _random_logits(1, vocab, seed=34).to(triton_device)
    _assert_matches(logits, _uniform_settings(1, 0.9, 0.0, greedy, triton_device), block=64)


# ---------------------------------------------------------------------------------------------
# CUDA: the compiled kernels at real vocabularies, inside a CUDA graph, with no host syncs.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_split_path_equals_the_row_kernel(dtype: torch.dtype, cuda_device: str) -> None:
    """Same scores bit for bit, so the same token on every row without top-p, bf16 ties included.
    Top-p rows: the chunked search sums the mass per chunk, then over chunks, so where the mass
    crosses p * total within rounding its threshold (and the draw) may differ; the draw must
    still be an allowed token."""
    for rows, vocab in [(1, 128256), (64, 151936)]:
        logits = _random_logits(rows, vocab, seed=35, dtype=dtype).to(cuda_device)
        settings = _random_settings(rows, vocab, seed=35, device=cuda_device)
        (ids, logprobs), (row_ids, row_logprobs) = _both_kernels(logits, settings)
        exact = settings[2] >= 1.0
        assert torch.equal(ids[exact], row_ids[exact])
        assert int((ids != row_ids).sum()) <= max(1, rows // 16)
        same = ids == row_ids
        torch.testing.assert_close(logprobs[same], row_logprobs[same], atol=1e-5, rtol=0)
        _check_rows(logits, settings, ids, logprobs)


@pytest.mark.gpu
def test_gpu_split_path_replays_in_a_graph_without_syncs_or_new_compiles(cuda_device: str) -> None:
    from compiled_serve.kernels import triton_sampler_split as split
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    vocab = 151936
    from compiled_serve.kernels import triton_sampler_topk as topk

    kernels = (split._chunk_stats_kernel, split._chunk_race_kernel, split._merge_chunks_kernel,
               topk._threshold_pass_kernel)  # fmt: skip

    def compiled_variants() -> int:
        return sum(len(k.device_caches[torch.cuda.current_device()][0]) for k in kernels)

    def inputs(rows: int, shifted: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """shifted: settings 4 bytes off alignment, as the engine's packed buffer gives them for some N."""
        settings = _random_settings(rows, vocab, rows, cuda_device)
        if shifted:
            settings = tuple(
                t if t.dtype == torch.bool else torch.cat([t.new_zeros(1), t])[1:] for t in settings
            )
        return _random_logits(rows, vocab, seed=rows).to(cuda_device), settings

    logits, settings = inputs(3)
    eager = fused_sample_triton(logits, *settings)
    variants = compiled_variants()
    for rows in (1, 16, 37, 256):  # new batch sizes (== 1, % 16, other) reuse the compiled kernels
        other_logits, other_settings = inputs(rows, shifted=rows != 256)
        fused_sample_triton(other_logits, *other_settings)
    assert compiled_variants() == variants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused_sample_triton(logits, *settings)
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0])
    torch.testing.assert_close(captured[1], eager[1], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# CPU: the real compiler (not the interpreter) accepts the kernels, for sm_90, down to a cubin.

_INT_ARGS = {"vocab", "stride_row", "tiles_per_chunk", "num_chunks", "num_rows", "stats_chunks", "pass_index"}
_POINTER_TYPES = {"seed_ptr": "*i64", "offset_ptr": "*i64", "token_ptr": "*i64", "greedy_ptr": "*i8",
                  "top_k_ptr": "*i32", "greedy_arg_ptr": "*i32", "race_arg_ptr": "*i32", "logits_ptr": "*bf16",
                  "threshold_ptr": "*i64", "bounds_ptr": "*i64"}  # fmt: skip


SPLIT_KERNELS = [
    ("triton_sampler_split", "_chunk_stats_kernel"),
    ("triton_sampler_split", "_chunk_race_kernel"),
    ("triton_sampler_split", "_merge_chunks_kernel"),
    ("triton_sampler_topk", "_threshold_pass_kernel"),
]


def compile_split_kernels_for_hopper() -> None:
    """Compile each split kernel for sm_90 to a cubin; run in a process without TRITON_INTERPRET."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from compiled_serve.kernels import triton_sampler_split, triton_sampler_topk

    passes = triton_sampler_topk.COUNT_PASSES + triton_sampler_topk.MASS_PASSES
    constexprs = {"BLOCK": 1024, "SPLITS": 16, "CHUNK_SLOTS": triton_sampler_split.MAX_CHUNKS, "MASS": True,
                  "STATS": 3, "SCALED_MAX": 2, "COUNT_PASSES": triton_sampler_topk.COUNT_PASSES, "PASSES": passes}  # fmt: skip
    for module, name in SPLIT_KERNELS:
        kernel = getattr(importlib.import_module(f"compiled_serve.kernels.{module}"), name)
        signature = {
            arg: "constexpr"
            if arg in constexprs
            else "i32"
            if arg in _INT_ARGS
            else _POINTER_TYPES.get(arg, "*fp32")
            for arg in kernel.arg_names
        }
        used = {k: v for k, v in constexprs.items() if k in signature}
        compiled = triton.compile(ASTSource(kernel, signature, used), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], name


@pytest.mark.heavy
def test_split_kernels_compile_for_hopper() -> None:
    """The interpreter accepts code the compiler rejects; this runs the compiler (no GPU needed)."""
    pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).parent
    script = f"import sys; sys.path.insert(0, {str(here)!r}); import {Path(__file__).stem} as t; t.compile_split_kernels_for_hopper()"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
