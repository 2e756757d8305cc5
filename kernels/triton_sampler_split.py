"""Split-row fast path of the Triton fused sampler: C programs share a row instead of one.

The per-row kernel (kernels/triton_sampler.py) gives each row one program, so a batch of one
runs on one SM, and 256 rows fill two waves of 132 SMs with programs that each stream a whole
vocabulary. For launches without penalties this path spreads every row over C chunk programs
(C from the batch size, so rows * C is ~4 waves) and merges their partials:

1. `_chunk_stats_kernel` [rows, C]: per chunk, the row max and the sum of exp(x - max) (for the
   logprob), the index of the first maximum (greedy token), and the max of the scaled row.
2. `_chunk_race_kernel` [rows, C], sampled rows only: the row's scaled max from the C partials,
   then the per-row kernel's exponential race over the chunk: score `exp(s - s_max) / -log(u)`,
   kept when `exp(s - s_max) >= min_p`, u from Philox with key = seed and counter = (token,
   offset low, offset high, 0). The score is the per-row kernel's bit for bit.
3. `_merge_chunks_kernel` [rows]: online-softmax merge of (max, sum) for the logprob; the first
   chunk holding the best greedy value / race score gives the token, so ties go to the lowest
   token index, exactly as the per-row kernel's tile loop.
Between 1 and 2, sampled rows with top-k or top-p get their thresholds from the chunked search
of kernels/triton_sampler_topk.py, and the race keeps only tokens with key >= the row's
threshold (INT32_MIN, keep all, on the other rows). Which rows search is read on the device:
no host sync, a fixed set of launches.

Why two passes over the logits and not one log-space race (compare `s - log E`, min-p as
`s - s_max >= log(min_p)`): a chunk cannot apply min-p before the row max is known (its best
token may fall below the row's threshold while another of its tokens passes), and rescaled or
log-space scores round differently from the per-row kernel's, which can flip near-ties. With the
max first, every score and min-p test is the per-row kernel's own, so the two paths pick the
same token always. The second read costs ~the copy time of the logits; sampled rows are bound
by Philox (10 rounds a token) anyway, and greedy rows skip the race.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiled_serve.kernels.triton_sampler import _scaled_tile
from compiled_serve.kernels.triton_sampler_topk import SEARCH_BLOCK, _row_kind, search_thresholds

# Partials per (row, chunk), fp32 [rows, C, 3]; constexpr globals, as @jit functions require.
_ROW_MAX = tl.constexpr(0)  # max of the raw (= unpenalised) logits, -inf when all are
_SUM_EXP = tl.constexpr(1)  # sum of exp(x - max(_ROW_MAX, -1e30))
_SCALED_MAX = tl.constexpr(2)  # max of logits / temperature
_STATS = tl.constexpr(3)
_FINITE_FLOOR = tl.constexpr(-1.0e30)  # the per-row kernel's start for the logsumexp max
MAX_CHUNKS = 64  # a power of two: the lanes the race and merge read partials with
TARGET_PROGRAMS = 528  # 4 waves of 132 SMs (H100 / H200)
SEARCH_PROGRAMS = 4 * TARGET_PROGRAMS  # the threshold search: 16 candidates an element


def split_chunks(
    num_rows: int, vocab: int, block: int, target_programs: int = TARGET_PROGRAMS
) -> tuple[int, int]:
    """(chunks per row, BLOCK tiles per chunk): rows * chunks ~ target_programs, C <= MAX_CHUNKS.

    Chunks are whole tiles, so the last may be short; none is empty (C = cdiv(vocab, chunk)).
    """
    wanted = min(MAX_CHUNKS, triton.next_power_of_2(max(1, target_programs // num_rows)))
    tiles = triton.cdiv(triton.cdiv(vocab, wanted), block)
    return triton.cdiv(vocab, tiles * block), tiles


@triton.jit
def _philox_uniform(idx, seed, offset):
    """u in (0, 1) per token id: the first word of Philox4x32-10 with key (seed) and counter
    (token, offset low, offset high, 0), as ((bits >> 9) + 0.5) * 2^-23 (kernels/philox.py)."""
    c0 = idx.to(tl.uint32)
    zero = c0 * 0
    offset_lo = zero + offset.to(tl.uint32)  # int64 -> uint32 keeps the low word
    offset_hi = zero + (offset >> 32).to(tl.uint32)
    bits, _, _, _ = tl.philox_impl(
        c0, offset_lo, offset_hi, zero, seed.to(tl.uint32), (seed >> 32).to(tl.uint32)
    )
    return ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


# New batch sizes must never compile a new variant (see kernels/triton_paged_attention.py), so
# batch-dependent integers are not specialised, nor the alignment of the per-row settings: the
# engine packs them into one buffer (engine/step_sampler.py), so their offsets move with N.
# vocab, the row stride and the logits pointer stay specialised (vectorised loads).
_SETTINGS = ["temperature_ptr", "greedy_ptr", "top_k_ptr", "top_p_ptr", "min_p_ptr", "seed_ptr", "offset_ptr"]


@triton.jit(do_not_specialize=["tiles_per_chunk"], do_not_specialize_on_alignment=_SETTINGS[:4])
def _chunk_stats_kernel(
    stats_ptr,  # [N, C, _STATS] float32
    greedy_arg_ptr,  # [N, C] int32, the chunk's first maximum
    logits_ptr,  # [N, V]
    temperature_ptr, greedy_ptr, top_k_ptr, top_p_ptr,  # [N] float32, int8, int32, float32 (_row_kind)
    vocab, stride_row, tiles_per_chunk, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    part = row * tl.num_programs(1) + tl.program_id(1)
    _, temperature, _ = _row_kind(row, temperature_ptr, greedy_ptr, top_k_ptr, top_p_ptr, vocab)
    chunk_start = tl.program_id(1) * tiles_per_chunk * BLOCK
    row_max = tl.full([], float("-inf"), tl.float32)
    arg = tl.zeros([], tl.int32)
    exp_max = tl.full([], _FINITE_FLOOR, tl.float32)  # finite: no -inf - -inf on all -inf tiles
    sum_exp = tl.zeros([], tl.float32)
    scaled_max = tl.full([], float("-inf"), tl.float32)
    for tile in range(0, tiles_per_chunk):
        start = chunk_start + tile * BLOCK
        idx, valid, x, s, key = _scaled_tile(
            logits_ptr + row * stride_row, start, vocab, temperature, BLOCK
        )
        tile_max = tl.max(x, 0)
        # Strictly greater, else the earlier tile keeps it: the first maximum wins.
        arg = tl.where((tile_max > row_max) | (tile == 0), tl.argmax(x, 0).to(tl.int32) + start, arg)
        row_max = tl.maximum(row_max, tile_max)
        rescaled = tl.maximum(exp_max, tile_max)
        sum_exp = sum_exp * tl.exp(exp_max - rescaled) + tl.sum(tl.exp(x - rescaled), 0)
        exp_max = rescaled
        scaled_max = tl.maximum(scaled_max, tl.max(s, 0))
    tl.store(stats_ptr + part * _STATS + _ROW_MAX, row_max)
    tl.store(stats_ptr + part * _STATS + _SUM_EXP, sum_exp)
    tl.store(stats_ptr + part * _STATS + _SCALED_MAX, scaled_max)
    tl.store(greedy_arg_ptr + part, arg)


@triton.jit(do_not_specialize=["tiles_per_chunk"], do_not_specialize_on_alignment=_SETTINGS)
def _chunk_race_kernel(
    race_best_ptr,  # [N, C] float32, the chunk's best score (-1: nothing kept)
    race_arg_ptr,  # [N, C] int32, its first token with that score
    stats_ptr,  # [N, C, _STATS] float32 from _chunk_stats_kernel
    threshold_ptr,  # [N] int64 from search_thresholds: keep tokens with key >= threshold
    logits_ptr,  # [N, V]
    temperature_ptr, greedy_ptr, top_k_ptr, top_p_ptr,  # [N] float32, int8, int32, float32 (_row_kind)
    min_p_ptr,  # [N] float32
    seed_ptr,  # [N] int64
    offset_ptr,  # [N] int64
    vocab, stride_row, tiles_per_chunk, BLOCK: tl.constexpr, CHUNK_SLOTS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    num_chunks = tl.num_programs(1)
    part = row * num_chunks + tl.program_id(1)
    sampled, temperature, _ = _row_kind(row, temperature_ptr, greedy_ptr, top_k_ptr, top_p_ptr, vocab)
    if sampled:
        chunks = tl.arange(0, CHUNK_SLOTS)
        scaled_maxima = tl.load(
            stats_ptr + (row * num_chunks + chunks) * _STATS + _SCALED_MAX, mask=chunks < num_chunks,
            other=float("-inf"),
        )  # fmt: skip
        s_max = tl.max(scaled_maxima, 0)  # the row's, as the per-row kernel's pass 1 finds it
        min_p = tl.load(min_p_ptr + row)
        threshold = tl.load(threshold_ptr + row)
        seed = tl.load(seed_ptr + row)
        offset = tl.load(offset_ptr + row)
        chunk_start = tl.program_id(1) * tiles_per_chunk * BLOCK
        best = tl.full([], -1.0, tl.float32)
        winner = tl.zeros([], tl.int32)
        for tile in range(0, tiles_per_chunk):
            start = chunk_start + tile * BLOCK
            idx, valid, x, s, key = _scaled_tile(
                logits_ptr + row * stride_row, start, vocab, temperature, BLOCK
            )
            weight = tl.exp(s - s_max)  # [BLOCK] unnormalised probs
            noise = -tl.log(_philox_uniform(idx, seed, offset))  # [BLOCK] Exp(1)
            score = tl.where(valid & (key >= threshold) & (weight >= min_p), weight / noise, -1.0)
            tile_best = tl.max(score, 0)
            winner = tl.where(tile_best > best, tl.argmax(score, 0).to(tl.int32) + start, winner)
            best = tl.maximum(best, tile_best)
        tl.store(race_best_ptr + part, best)
        tl.store(race_arg_ptr + part, winner)


@triton.jit(do_not_specialize=["num_chunks"], do_not_specialize_on_alignment=_SETTINGS[:4])
def _merge_chunks_kernel(
    token_ptr,  # [N] int64
    logprob_ptr,  # [N] float32
    stats_ptr,  # [N, C, _STATS] float32
    greedy_arg_ptr,  # [N, C] int32
    race_best_ptr,  # [N, C] float32 (sampled rows)
    race_arg_ptr,  # [N, C] int32 (sampled rows)
    logits_ptr,  # [N, V]
    temperature_ptr, greedy_ptr, top_k_ptr, top_p_ptr,  # [N] float32, int8, int32, float32 (_row_kind)
    vocab, stride_row, num_chunks, CHUNK_SLOTS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    sampled, temperature, _ = _row_kind(row, temperature_ptr, greedy_ptr, top_k_ptr, top_p_ptr, vocab)
    chunks = tl.arange(0, CHUNK_SLOTS)
    live = chunks < num_chunks
    part = row * num_chunks + chunks  # [CHUNK_SLOTS], live where < num_chunks
    row_max = tl.load(stats_ptr + part * _STATS + _ROW_MAX, mask=live, other=float("-inf"))
    sum_exp = tl.load(stats_ptr + part * _STATS + _SUM_EXP, mask=live, other=0.0)
    exp_max = tl.maximum(row_max, _FINITE_FLOOR)  # what each chunk's sum is relative to
    top = tl.max(exp_max, 0)
    total = tl.sum(sum_exp * tl.exp(exp_max - top), 0)
    # argmax takes the first chunk on ties, and each chunk its first token: the first maximum.
    token = tl.load(greedy_arg_ptr + row * num_chunks + tl.argmax(row_max, 0))
    # Greedy rows have no race partials (-1 everywhere: nothing kept).
    race_best = tl.where(sampled, tl.load(race_best_ptr + part, mask=live, other=-1.0), -1.0)
    race_token = tl.load(race_arg_ptr + row * num_chunks + tl.argmax(race_best, 0))
    token = tl.where(tl.max(race_best, 0) > -1.0, race_token, token)  # nothing kept: greedy
    x_token = tl.load(logits_ptr + row * stride_row + token).to(tl.float32)  # raw: unpenalised
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, (x_token - top) - tl.log(total))


def fused_sample_split_rows(
    token_ids: torch.Tensor,  # [N] int64, written
    logprobs: torch.Tensor,  # [N] float32, written
    logits: torch.Tensor,  # [N, V], unit stride along V
    *settings: torch.Tensor,  # temperature, top_k, top_p, min_p, seeds, offsets, greedy [N] each
    block: int,
    target_programs: int = TARGET_PROGRAMS,
    search_programs: int = SEARCH_PROGRAMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_sample` without penalties: a fixed set of launches, no host syncs (CUDA-graph safe)."""
    temperature, top_k, top_p, min_p, seeds, offsets, greedy = settings
    num_rows, vocab = logits.shape
    num_chunks, tiles_per_chunk = split_chunks(num_rows, vocab, block, target_programs)
    stats = torch.empty(num_rows, num_chunks, _STATS.value, dtype=torch.float32, device=logits.device)
    greedy_arg = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    race_best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    race_arg = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    temperature, greedy, top_k, top_p = temperature.float(), greedy.to(torch.int8), top_k.int(), top_p.float()
    min_p, seeds, offsets = min_p.float(), seeds.long(), offsets.long()
    row_kind = (temperature, greedy, top_k, top_p)
    stride_row = logits.stride(0)
    chunk_grid = (num_rows, num_chunks)
    _chunk_stats_kernel[chunk_grid](
        stats, greedy_arg, logits, *row_kind, vocab, stride_row, tiles_per_chunk, BLOCK=block
    )  # fmt: skip
    search_grid = split_chunks(num_rows, vocab, SEARCH_BLOCK, search_programs)
    threshold = search_thresholds(
        stats, logits, row_kind, *search_grid, (_STATS.value, _SCALED_MAX.value), MAX_CHUNKS
    )  # fmt: skip
    _chunk_race_kernel[chunk_grid](
        race_best, race_arg, stats, threshold, logits, *row_kind, min_p, seeds, offsets, vocab, stride_row,
        tiles_per_chunk, BLOCK=block, CHUNK_SLOTS=MAX_CHUNKS,
    )  # fmt: skip
    _merge_chunks_kernel[(num_rows,)](
        token_ids, logprobs, stats, greedy_arg, race_best, race_arg, logits, *row_kind, vocab, stride_row,
        num_chunks, CHUNK_SLOTS=MAX_CHUNKS, num_warps=1,
    )  # fmt: skip
    return token_ids, logprobs
