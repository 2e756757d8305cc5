"""The logits tail's two non-elementwise stages as custom ops, so the unfused tail is a real graph.

`compiled_serve::sampling_filter(scaled, top_k, top_p, min_p)` masks (to -inf) what top-k, then
top-p, then min-p exclude from temperature-scaled logits [N, V]; `compiled_serve::philox_exponential(
seeds, offsets, skip, vocab_size)` is the Exp(1) noise [N, V] of the exponential race (rows with
`skip` set, the greedy ones, get 1.0: they never read it, and Philox is the costly part). Both are
pure torch and not worth matching as aten chains: they are what `FusedSamplingPass`
(passes/fused_sampling.py) looks for and folds into one `compiled_serve::fused_sample`.
"""

from __future__ import annotations

import torch

from compiled_serve.kernels.philox import philox_exponential


def filter_top_k_top_p_min_p(
    scaled: torch.Tensor,  # [N, V] float32, logits already divided by the temperature
    top_k: torch.Tensor,  # [N] int, <= 0 or >= V = off
    top_p: torch.Tensor,  # [N] float32, 1 = off
    min_p: torch.Tensor,  # [N] float32, 0 = off
) -> torch.Tensor:
    """[N, V] float32: `scaled` with -inf where top-k, then top-p, then min-p exclude a token.

    Semantics follow HF's warpers: top-k keeps ties with the k-th value; top-p keeps the
    smallest prefix of the descending distribution whose mass reaches p (the token crossing p
    is kept); min-p keeps tokens with prob >= min_p * max prob. Each sees the distribution
    renormalized after the previous one. A filter no row uses is skipped (a disabled value is an
    exact no-op); deciding that reads flags on the host, free on the CPU, where this runs.
    """
    logits = scaled.float()
    vocab = logits.shape[-1]
    top_k = top_k.long()
    top_k_on = (top_k > 0) & (top_k < vocab)  # [N]
    do_top_k, do_top_p, do_min_p = bool(top_k_on.any()), bool((top_p < 1.0).any()), bool((min_p > 0.0).any())
    if do_top_k or do_top_p:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [N, V] each
        if do_top_k:
            k = torch.where(top_k_on, top_k, vocab)
            kth = sorted_logits.gather(1, (k - 1)[:, None])  # [N, 1]
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if do_top_p:
            probs = sorted_logits.softmax(dim=-1)  # [N, V]
            mass_before = probs.cumsum(dim=-1) - probs  # [N, V] mass of strictly better tokens
            # mass_before is exactly 0 for the top token and top_p > 0, so one token always stays.
            drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)
    if do_min_p:
        probs = logits.softmax(dim=-1)  # [N, V]
        threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [N, 1]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


@torch.library.custom_op("compiled_serve::sampling_filter", mutates_args=())
def sampling_filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`filter_top_k_top_p_min_p` as one graph node."""
    filtered = filter_top_k_top_p_min_p(scaled, top_k, top_p, min_p)
    return filtered.clone() if filtered is scaled else filtered  # a custom op may not return its input


@sampling_filter.register_fake
def _(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    return scaled.new_empty(scaled.shape, dtype=torch.float32)


@torch.library.custom_op("compiled_serve::philox_exponential", mutates_args=())
def philox_exponential_noise(
    seeds: torch.Tensor, offsets: torch.Tensor, skip: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """seeds, offsets [N] int64, skip [N] bool -> Exp(1) noise [N, vocab_size] float32 (1.0 on skipped rows)."""
    noise = torch.ones(seeds.shape[0], vocab_size, dtype=torch.float32, device=seeds.device)
    rows = (~skip).nonzero()[:, 0]
    if rows.numel():
        noise[rows] = philox_exponential(seeds[rows], offsets[rows], vocab_size)
    return noise


@philox_exponential_noise.register_fake
def _(seeds: torch.Tensor, offsets: torch.Tensor, skip: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return seeds.new_empty((seeds.shape[0], vocab_size), dtype=torch.float32)
