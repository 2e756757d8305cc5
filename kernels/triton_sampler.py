"""Triton fused sampler: the CUDA implementation of `compiled_serve::fused_sample`.

Semantics and the RNG scheme are those of `logits_tail` (kernels/logits_tail.py), the reference.
One program owns one row and walks the vocabulary in BLOCK-wide tiles, several times:

1. raw max and online logsumexp (logprob), the penalised row's argmax (greedy token), and the
   scaled row's max and minimum. With penalties, the penalised row is written to a float32
   scratch row that the later passes read instead of recomputing it (4 bytes a token instead of
   the logits, mask and counts). Greedy rows stop here.
2. top-k: the k-th largest scaled logit, found exactly by bisection over the int32 keys that
   order fp32 values (`_order_key`): at most 32 counting passes, fewer as the range closes.
3. top-p: the same bisection on the value whose tail mass `sum(exp(s - max), s >= t)` first
   reaches p * Z (Z: mass left by top-k); keeping every `s >= t` keeps the token crossing p.
4. the exponential race: argmax of exp(s - max) / E over the tokens that pass top-k, top-p and
   min-p (exp(s - max) >= min_p, i.e. prob >= min_p * max prob), E from Philox per token.

Thresholds are values, so ties with the last kept token are all kept (the sort-based reference
keeps a sort-order subset of ties at the top-p boundary; top-k ties are kept by both). Everything
stays on the device: no host syncs, one launch, so it replays under CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT32_MAX = tl.constexpr(2**31 - 1)  # a global a @jit function reads must be a constexpr
_SPLITS = 16  # threshold candidates tested per pass over the row


@triton.jit
def _order_key(s):
    """fp32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(key == -1, 0, key)  # -0.0 (key -1) compares equal to +0.0, as floats do


@triton.jit
def _penalised_tile(
    row_ptr, seen_row_ptr, counts_row_ptr, start, vocab, repetition, frequency, presence,
    REPETITION: tl.constexpr, FREQUENCY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One tile of pass 1: token ids, valid mask, raw and penalised logits (-inf past the vocab).

    The penalties of `apply_penalties` (kernels/logits_tail.py), in its order.
    """
    idx = start + tl.arange(0, BLOCK)
    valid = idx < vocab
    x = tl.load(row_ptr + idx, mask=valid, other=float("-inf")).to(tl.float32)
    p = x
    if REPETITION:
        seen = tl.load(seen_row_ptr + idx, mask=valid, other=0) != 0
        p = tl.where(seen, tl.where(p > 0, p / repetition, p * repetition), p)
    if FREQUENCY:
        counts = tl.load(counts_row_ptr + idx, mask=valid, other=0.0)
        p = p - frequency * counts
        p = p - presence * (counts > 0).to(tl.float32)
    return idx, valid, x, p


@triton.jit
def _scaled_tile(row_ptr, start, vocab, temperature, BLOCK: tl.constexpr):
    """One tile: token ids, valid mask, (penalised) and scaled logits (-inf past the vocab), keys."""
    idx = start + tl.arange(0, BLOCK)
    valid = idx < vocab
    x = tl.load(row_ptr + idx, mask=valid, other=float("-inf")).to(tl.float32)
    s = x / temperature
    return idx, valid, x, s, _order_key(s)


@triton.jit
def _search_threshold(
    row_ptr, vocab, temperature, s_max, lo, hi, target, MASS: tl.constexpr, BLOCK: tl.constexpr,
    SPLITS: tl.constexpr,
):  # fmt: skip
    """Largest key t in [lo, hi) with tail(t) >= target, given tail(lo) >= target > tail(hi).

    tail(t) sums, over tokens with key >= t, exp(s - s_max) when MASS, else 1 (a count). Each
    pass over the row tests SPLITS evenly spaced candidates at once, so the 2^32 key range
    closes in about 32 / log2(SPLITS) passes; the answer is exact (it is some token's key).
    """
    j = tl.arange(0, SPLITS).to(tl.int64) + 1  # [SPLITS]
    while hi - lo > 1:
        step = tl.maximum((hi - lo) // SPLITS, 1)
        candidates = tl.minimum(lo + step * j, hi)  # [SPLITS], increasing, in (lo, hi]
        tail = tl.zeros([SPLITS], tl.float32)
        for start in range(0, vocab, BLOCK):
            idx, valid, x, s, key = _scaled_tile(row_ptr, start, vocab, temperature, BLOCK)
            if MASS:
                weight = tl.where(valid, tl.exp(s - s_max), 0.0)  # [BLOCK]
            else:
                weight = valid.to(tl.float32)
            above = key[None, :] >= candidates[:, None]  # [SPLITS, BLOCK]
            tail += tl.sum(tl.where(above, weight[None, :], 0.0), 1)
        reached = tail >= target  # [SPLITS]; true on a prefix (tail falls as t rises)
        lo = tl.maximum(lo, tl.max(tl.where(reached, candidates, lo), 0))
        hi = tl.minimum(hi, tl.min(tl.where(reached, hi, candidates), 0))
    return lo


@triton.jit
def _fused_sample_kernel(
    token_ptr,  # [N] int64
    logprob_ptr,  # [N] float32
    logits_ptr,  # [N, V]
    work_ptr,  # [N, V] float32 penalised scratch with penalties, else logits_ptr again
    temperature_ptr,  # [N] float32
    top_k_ptr,  # [N] int32
    top_p_ptr,  # [N] float32
    min_p_ptr,  # [N] float32
    seed_ptr,  # [N] int64
    offset_ptr,  # [N] int64
    greedy_ptr,  # [N] bool (as int8)
    repetition_ptr,  # [N] float32 (read when REPETITION)
    seen_ptr,  # [N, V] bool as uint8 (read when REPETITION)
    frequency_ptr,  # [N] float32 (read when FREQUENCY)
    presence_ptr,  # [N] float32 (read when FREQUENCY)
    counts_ptr,  # [N, V] float32 (read when FREQUENCY)
    vocab,
    stride_row,
    stride_work,
    stride_seen,
    stride_counts,
    REPETITION: tl.constexpr,
    FREQUENCY: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    work_row_ptr = work_ptr + row * stride_work
    temperature = tl.load(temperature_ptr + row)
    sampled = (tl.load(greedy_ptr + row) == 0) & (temperature > 0.0)
    temperature = tl.where(sampled, temperature, 1.0)
    repetition = 1.0
    frequency = 0.0
    presence = 0.0
    if REPETITION:
        repetition = tl.load(repetition_ptr + row)
    if FREQUENCY:
        frequency = tl.load(frequency_ptr + row)
        presence = tl.load(presence_ptr + row)

    # Pass 1: raw max / sum of exp, penalised max / argmax, scaled max / min key.
    m_raw = tl.full([], -1.0e30, tl.float32)  # finite start: no -inf - -inf on all -inf tiles
    l_raw = tl.zeros([], tl.float32)
    m_pen = tl.full([], float("-inf"), tl.float32)
    arg_pen = tl.zeros([], tl.int32)
    s_max = tl.full([], float("-inf"), tl.float32)
    key_min = tl.full([], _INT32_MAX, tl.int32)
    for start in range(0, vocab, BLOCK):
        idx, valid, x, p = _penalised_tile(
            row_ptr, seen_ptr + row * stride_seen, counts_ptr + row * stride_counts, start, vocab,
            repetition, frequency, presence, REPETITION, FREQUENCY, BLOCK,
        )  # fmt: skip
        if REPETITION or FREQUENCY:
            tl.store(work_row_ptr + idx, p, mask=valid)
        m_new = tl.maximum(m_raw, tl.max(x, 0))
        l_raw = l_raw * tl.exp(m_raw - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m_raw = m_new
        tile_max = tl.max(p, 0)
        tile_arg = tl.argmax(p, 0).to(tl.int32) + start
        arg_pen = tl.where((tile_max > m_pen) | (start == 0), tile_arg, arg_pen)  # the first maximum wins
        m_pen = tl.maximum(m_pen, tile_max)
        s = p / temperature
        s_max = tl.maximum(s_max, tl.max(s, 0))
        key_min = tl.minimum(key_min, tl.min(tl.where(valid, _order_key(s), _INT32_MAX), 0))
    if REPETITION or FREQUENCY:
        tl.debug_barrier()  # the scratch row this block wrote is read back by all its threads

    token = arg_pen
    if sampled:
        key_hi = _order_key(s_max).to(tl.int64) + 1  # nothing is >= key_hi
        threshold = key_min.to(tl.int64)  # keep s with key >= threshold

        # Pass 2 (top-k): largest key with count(key >= t) >= k, i.e. the k-th largest value.
        top_k = tl.load(top_k_ptr + row)
        if (top_k > 0) & (top_k < vocab):
            threshold = _search_threshold(
                work_row_ptr,
                vocab,
                temperature,
                s_max,
                threshold,
                key_hi,
                top_k.to(tl.float32),
                False,
                BLOCK,
                SPLITS,
            )

        # Pass 3 (top-p): largest key whose tail mass reaches p of the mass top-k left.
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1.0:
            total = tl.zeros([], tl.float32)
            for start in range(0, vocab, BLOCK):
                idx, valid, x, s, key = _scaled_tile(work_row_ptr, start, vocab, temperature, BLOCK)
                total += tl.sum(tl.where(valid & (key >= threshold), tl.exp(s - s_max), 0.0), 0)
            threshold = _search_threshold(
                work_row_ptr, vocab, temperature, s_max, threshold, key_hi, top_p * total, True, BLOCK, SPLITS
            )

        # Pass 4: exponential race with Philox noise, key (seed) and counter (token, offset, 0).
        min_p = tl.load(min_p_ptr + row)
        seed = tl.load(seed_ptr + row)
        offset = tl.load(offset_ptr + row)
        k0 = seed.to(tl.uint32)  # int64 -> uint32 keeps the low word
        k1 = (seed >> 32).to(tl.uint32)
        best = tl.full([], -1.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            idx, valid, x, s, key = _scaled_tile(work_row_ptr, start, vocab, temperature, BLOCK)
            weight = tl.exp(s - s_max)  # [BLOCK] unnormalised probs
            keep = valid & (key >= threshold) & (weight >= min_p)
            c0 = idx.to(tl.uint32)
            zero = c0 * 0
            c1 = zero + offset.to(tl.uint32)
            c2 = zero + (offset >> 32).to(tl.uint32)
            bits, _, _, _ = tl.philox_impl(c0, c1, c2, zero, k0, k1)
            uniform = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
            score = tl.where(keep, weight / -tl.log(uniform), -1.0)
            tile_best = tl.max(score, 0)
            tile_arg = tl.argmax(score, 0).to(tl.int32) + start
            token = tl.where(tile_best > best, tile_arg, token)
            best = tl.maximum(best, tile_best)

    x_token = tl.load(row_ptr + token).to(tl.float32)  # the raw logit: logprobs are unpenalised
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, (x_token - m_raw) - tl.log(l_raw))


def fused_sample_triton(
    logits: torch.Tensor,  # [N, V]
    temperature: torch.Tensor,  # [N] float32
    top_k: torch.Tensor,  # [N] int32, 0 = off
    top_p: torch.Tensor,  # [N] float32, 1 = off
    min_p: torch.Tensor,  # [N] float32, 0 = off
    seeds: torch.Tensor,  # [N] int64
    offsets: torch.Tensor,  # [N] int64
    greedy: torch.Tensor,  # [N] bool
    repetition_penalty: torch.Tensor | None = None,  # [N] float32
    seen_mask: torch.Tensor | None = None,  # [N, V] bool
    frequency_penalty: torch.Tensor | None = None,  # [N] float32
    presence_penalty: torch.Tensor | None = None,  # [N] float32
    output_counts: torch.Tensor | None = None,  # [N, V] float32
    block: int | None = None,
    split_rows: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_ids [N] int64, logprobs [N] float32); no host syncs.

    Without penalties, rows go to the split-row path (kernels/triton_sampler_split.py), which
    keeps this kernel for the rows that need top-k or top-p; split_rows=False forces this kernel
    for every row (benchmarks and tests compare the two).
    """
    from compiled_serve.kernels.fused_sampling import check_penalty_inputs

    check_penalty_inputs(logits, repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts)
    num_rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    token_ids = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return token_ids, logprobs
    if block is None:
        block = min(1024, triton.next_power_of_2(vocab))  # [SPLITS, block] fits registers
    repetition = repetition_penalty is not None
    frequency = output_counts is not None
    if split_rows and not (repetition or frequency):
        from compiled_serve.kernels.triton_sampler_split import fused_sample_split_rows

        return fused_sample_split_rows(
            token_ids, logprobs, logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy, block=block
        )  # fmt: skip
    # Unused pointer arguments get a real tensor the kernel never reads.
    work = torch.empty(num_rows, vocab, dtype=torch.float32, device=logits.device) if repetition or frequency else logits
    seen = seen_mask.contiguous().view(torch.uint8) if repetition else logits
    counts = output_counts.float().contiguous() if frequency else logits
    _fused_sample_kernel[(num_rows,)](
        token_ids, logprobs, logits, work, temperature.float(), top_k.int(), top_p.float(), min_p.float(),
        seeds.long(), offsets.long(), greedy.to(torch.int8),
        repetition_penalty.float() if repetition else temperature,
        seen, frequency_penalty.float() if frequency else temperature,
        presence_penalty.float() if frequency else temperature, counts,
        vocab, logits.stride(0), work.stride(0), seen.stride(0), counts.stride(0),
        REPETITION=repetition, FREQUENCY=frequency, BLOCK=block, SPLITS=_SPLITS,
        num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    return token_ids, logprobs
