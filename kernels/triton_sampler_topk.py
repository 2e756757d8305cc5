"""Top-k / top-p thresholds for the split-row sampler: the bisection spread over chunk programs.

The per-row kernel (kernels/triton_sampler.py) finds both thresholds on one program per row:
about 8 passes over the row for top-k and 8 for top-p, each testing SPLITS evenly spaced
candidate keys (`_search_threshold`). Here every pass is one launch of [rows, C] programs:

* each program first finishes the previous pass for its row: it sums the previous pass's
  per-chunk tails over the C chunks (in chunk order, so every program of the row gets the same
  numbers) and narrows (lo, hi) exactly as `_search_threshold` does; chunk 0 records the result;
* then it counts (top-k passes) or sums exp(s - s_max) (top-p passes) over its chunk for the
  SPLITS candidates of the new interval and writes those partial tails to scratch.

Top-k starts from (INT32_MIN, key(s_max) + 1): every key is >= INT32_MIN, so the search finds the
same k-th largest key as the per-row kernel's start at the row's minimum key. Top-p starts from
the top-k threshold; its first pass also sums the mass above that threshold (the per-row
kernel's `total`), from which the next launch takes target = p * total. A last launch narrows
once more and writes each row's threshold (INT32_MIN: keep all) for the race in
kernels/triton_sampler_split.py, which keeps tokens with key >= threshold, so ties at the
boundary are all kept. Counts are exact in fp32, so top-k thresholds are the per-row kernel's
bit for bit; top-p masses are summed per chunk and then over chunks instead of tile after tile,
which can move the threshold only when the mass crosses p * total within float rounding.

A fixed number of launches (no host syncs, CUDA-graph safe): rows that need no search, and
searches that closed early, exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiled_serve.kernels.triton_sampler import _order_key, _scaled_tile

_INT32_MIN = tl.constexpr(-(2**31))
SPLITS = 16  # candidates a pass tests, as the per-row kernel's _SPLITS
SEARCH_BLOCK = 256  # tile of a search pass: [SPLITS, SEARCH_BLOCK] compares stay in registers


def passes_to_close(width: int, splits: int = SPLITS) -> int:
    """Passes that close any key interval of at most `width` (the bisection's worst case)."""
    passes = 0
    while width > 1:
        step = max(width // splits, 1)
        width = 1 if width <= splits else max(step, width - splits * step)
        passes += 1
    return passes


COUNT_PASSES = passes_to_close(2**32)  # keys span INT32_MIN .. INT32_MAX + 1: 8 passes
MASS_PASSES = COUNT_PASSES


@triton.jit
def _row_kind(row, temperature_ptr, greedy_ptr, top_k_ptr, top_p_ptr, vocab):
    """(sampled, temperature, searched): the row draws a token (else greedy); the temperature
    to divide by (1 on greedy rows); the row needs a top-k / top-p threshold search."""
    temperature = tl.load(temperature_ptr + row)
    sampled = (tl.load(greedy_ptr + row) == 0) & (temperature > 0.0)
    top_k = tl.load(top_k_ptr + row)
    searched = sampled & (((top_k > 0) & (top_k < vocab)) | (tl.load(top_p_ptr + row) < 1.0))
    return sampled, tl.where(sampled, temperature, 1.0), searched


@triton.jit
def _candidates(lo, hi, SPLITS: tl.constexpr):
    """[SPLITS] int64 evenly spaced keys in (lo, hi], increasing (`_search_threshold`'s)."""
    step = tl.maximum((hi - lo) // SPLITS, 1)
    return tl.minimum(lo + step * (tl.arange(0, SPLITS).to(tl.int64) + 1), hi)


@triton.jit
def _narrow(lo, hi, target, partial_ptr, num_chunks, SPLITS: tl.constexpr, CHUNK_SLOTS: tl.constexpr):
    """(lo, hi) after a pass: the tails of its candidates summed over the chunks' partials
    [num_chunks, SPLITS] at partial_ptr; unchanged when the interval was already closed."""
    chunks = tl.arange(0, CHUNK_SLOTS)
    splits = tl.arange(0, SPLITS)
    tails = tl.load(
        partial_ptr + chunks[:, None] * SPLITS + splits[None, :], mask=(chunks < num_chunks)[:, None], other=0.0
    )  # fmt: skip
    reached = tl.sum(tails, 0) >= target  # [SPLITS]; true on a prefix (tails fall as keys rise)
    candidates = _candidates(lo, hi, SPLITS)
    is_open = hi - lo > 1
    new_lo = tl.maximum(lo, tl.max(tl.where(reached, candidates, lo), 0))
    new_hi = tl.minimum(hi, tl.min(tl.where(reached, hi, candidates), 0))
    return tl.where(is_open, new_lo, lo), tl.where(is_open, new_hi, hi)


# pass_index and the batch-dependent ints are not specialised (one variant for every pass and
# batch size), nor the alignment of the per-row settings (see kernels/triton_sampler_split.py).
@triton.jit(
    do_not_specialize=["num_rows", "num_chunks", "stats_chunks", "tiles_per_chunk", "pass_index"],
    do_not_specialize_on_alignment=["temperature_ptr", "greedy_ptr", "top_k_ptr", "top_p_ptr"],
)
def _threshold_pass_kernel(
    threshold_ptr,  # [N] int64, written by the last launch: keep tokens with key >= threshold
    bounds_ptr,  # [PASSES + 1, N, 2] int64: (lo, hi) each pass searched
    target_ptr,  # [PASSES + 1, N] float32: the tail each pass looked for
    partial_ptr,  # [PASSES, N, C, SPLITS] float32: per-chunk tails of each pass's candidates
    base_ptr,  # [N, C] float32: per-chunk mass above the top-k threshold (first top-p pass)
    stats_ptr,  # [N, stats_chunks, STATS] float32 from _chunk_stats_kernel
    logits_ptr,  # [N, V]
    temperature_ptr, greedy_ptr, top_k_ptr, top_p_ptr,  # [N] float32, int8, int32, float32 (_row_kind)
    vocab, stride_row, num_rows, num_chunks, stats_chunks, tiles_per_chunk, pass_index,
    MASS: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, CHUNK_SLOTS: tl.constexpr,
    STATS: tl.constexpr, SCALED_MAX: tl.constexpr, COUNT_PASSES: tl.constexpr, PASSES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    sampled, temperature, searched = _row_kind(row, temperature_ptr, greedy_ptr, top_k_ptr, top_p_ptr, vocab)
    if searched:
        slots = tl.arange(0, CHUNK_SLOTS)
        scaled_maxima = tl.load(
            stats_ptr + (row * stats_chunks + slots) * STATS + SCALED_MAX, mask=slots < stats_chunks,
            other=float("-inf"),
        )  # fmt: skip
        s_max = tl.max(scaled_maxima, 0)
        key_hi = _order_key(s_max).to(tl.int64) + 1  # nothing is >= key_hi
        top_k = tl.load(top_k_ptr + row)
        # This pass's interval and target: the first, or the previous pass narrowed.
        lo = tl.full([], _INT32_MIN, tl.int64)
        hi = tl.where((top_k > 0) & (top_k < vocab), key_hi, lo + 1)  # lo + 1: closed (top-k off)
        target = top_k.to(tl.float32)
        if pass_index > 0:
            previous = pass_index - 1
            row_pass = previous * num_rows + row
            lo = tl.load(bounds_ptr + row_pass * 2)
            hi = tl.load(bounds_ptr + row_pass * 2 + 1)
            target = tl.load(target_ptr + row_pass)
            if previous == COUNT_PASSES:  # the first top-p pass also summed the mass above lo
                chunks = tl.arange(0, CHUNK_SLOTS)
                base = tl.load(base_ptr + row * num_chunks + chunks, mask=chunks < num_chunks, other=0.0)
                target = tl.load(top_p_ptr + row) * tl.sum(base, 0)
            lo, hi = _narrow(
                lo, hi, target, partial_ptr + row_pass * num_chunks * SPLITS, num_chunks, SPLITS, CHUNK_SLOTS
            )  # fmt: skip
            if pass_index == COUNT_PASSES:  # top-k is done: top-p searches above its threshold
                hi = tl.where(tl.load(top_p_ptr + row) < 1.0, key_hi, lo + 1)
        row_pass = pass_index * num_rows + row
        if chunk == 0:
            tl.store(bounds_ptr + row_pass * 2, lo)
            tl.store(bounds_ptr + row_pass * 2 + 1, hi)
            tl.store(target_ptr + row_pass, target)
        if (pass_index == PASSES) & (chunk == 0):
            tl.store(threshold_ptr + row, lo)
        if (pass_index < PASSES) & (hi - lo > 1):
            candidates = _candidates(lo, hi, SPLITS)
            tails = tl.zeros([SPLITS], tl.float32)
            base = tl.zeros([], tl.float32)
            chunk_start = chunk * tiles_per_chunk * BLOCK
            for tile in range(0, tiles_per_chunk):
                idx, valid, x, s, key = _scaled_tile(
                    logits_ptr + row * stride_row, chunk_start + tile * BLOCK, vocab, temperature, BLOCK
                )  # fmt: skip
                if MASS:
                    weight = tl.where(valid, tl.exp(s - s_max), 0.0)  # [BLOCK]
                    base += tl.sum(tl.where(key >= lo, weight, 0.0), 0)
                else:
                    weight = valid.to(tl.float32)
                above = key[None, :] >= candidates[:, None]  # [SPLITS, BLOCK]
                tails += tl.sum(tl.where(above, weight[None, :], 0.0), 1)
            tl.store(partial_ptr + (row_pass * num_chunks + chunk) * SPLITS + tl.arange(0, SPLITS), tails)
            if MASS:
                tl.store(base_ptr + row * num_chunks + chunk, base)
    if (searched == 0) & (pass_index == PASSES) & (chunk == 0):
        tl.store(threshold_ptr + row, tl.full([], _INT32_MIN, tl.int64))  # keep every token


def search_thresholds(
    stats: torch.Tensor,  # [N, stats_chunks, STATS] float32 from _chunk_stats_kernel
    logits: torch.Tensor,  # [N, V], unit stride along V
    row_kind: tuple[torch.Tensor, ...],  # temperature float32, greedy int8, top_k int32, top_p float32
    num_chunks: int,
    tiles_per_chunk: int,
    stats_layout: tuple[int, int],  # (STATS, SCALED_MAX) of the stats tensor
    chunk_slots: int,
) -> torch.Tensor:
    """[N] int64 per-row thresholds (INT32_MIN where no search): 1 + 16 launches of
    [N, num_chunks] programs over SEARCH_BLOCK tiles, no host syncs."""
    num_rows, vocab = logits.shape
    passes = COUNT_PASSES + MASS_PASSES
    device = logits.device
    threshold = torch.empty(num_rows, dtype=torch.int64, device=device)
    bounds = torch.empty(passes + 1, num_rows, 2, dtype=torch.int64, device=device)
    target = torch.empty(passes + 1, num_rows, dtype=torch.float32, device=device)
    partial = torch.empty(passes, num_rows, num_chunks, SPLITS, dtype=torch.float32, device=device)
    base = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=device)
    stats_width, scaled_max = stats_layout
    for pass_index in range(passes + 1):
        last = pass_index == passes
        _threshold_pass_kernel[(num_rows, 1 if last else num_chunks)](
            threshold, bounds, target, partial, base, stats, logits, *row_kind, vocab, logits.stride(0),
            num_rows, num_chunks, stats.shape[1], tiles_per_chunk, pass_index,
            MASS=pass_index >= COUNT_PASSES, BLOCK=SEARCH_BLOCK, SPLITS=SPLITS, CHUNK_SLOTS=chunk_slots,
            STATS=stats_width, SCALED_MAX=scaled_max, COUNT_PASSES=COUNT_PASSES, PASSES=passes,
        )  # fmt: skip
    return threshold
