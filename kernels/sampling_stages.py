"""The logits tail's two non-elementwise stages as custom ops, so the unfused tail is a real graph.

`compiled_serve::sampling_filter(scaled, top_k, top_p, min_p)` masks (to -inf) what top-k, then
top-p, then min-p exclude from temperature-scaled logits [N, V]; `compiled_serve::philox_exponential(
seeds, offsets, vocab_size)` is the Exp(1) noise [N, V] of `fused_sample`'s exponential race. Both
are pure torch (the sampler's sort-based filter, the Philox reference): not worth matching as aten
chains, they are what `FusedSamplingPass` (passes/fused_sampling.py) looks for and folds into one
`compiled_serve::fused_sample`, and what the rewritten graph is checked against.
"""

from __future__ import annotations

import torch

from compiled_serve.engine.sampler import apply_top_k_top_p_min_p
from compiled_serve.kernels.fused_sampling import philox_exponential, sampling_rows


@torch.library.custom_op("compiled_serve::sampling_filter", mutates_args=())
def sampling_filter(
    scaled: torch.Tensor,  # [N, V] float32, logits already divided by the temperature
    top_k: torch.Tensor,  # [N] int32, <= 0 or >= V = off
    top_p: torch.Tensor,  # [N] float32, 1 = off
    min_p: torch.Tensor,  # [N] float32, 0 = off
) -> torch.Tensor:
    """[N, V] float32: `scaled` with -inf where top-k / top-p / min-p exclude a token."""
    num_rows, vocab = scaled.shape
    no_temperature = torch.ones(num_rows, dtype=torch.float32, device=scaled.device)
    not_greedy = torch.zeros(num_rows, dtype=torch.bool, device=scaled.device)
    batch = sampling_rows(no_temperature, top_k, top_p, min_p, not_greedy, vocab)
    filtered = apply_top_k_top_p_min_p(scaled.float(), batch)
    return filtered.clone() if filtered is scaled else filtered  # a custom op may not return its input


@sampling_filter.register_fake
def _(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    return scaled.new_empty(scaled.shape, dtype=torch.float32)


@torch.library.custom_op("compiled_serve::philox_exponential", mutates_args=())
def philox_exponential_noise(seeds: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds, offsets [N] int64 -> Exp(1) noise [N, vocab_size] float32, a function of (seed, offset) per row."""
    return philox_exponential(seeds, offsets, vocab_size)


@philox_exponential_noise.register_fake
def _(seeds: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return seeds.new_empty((seeds.shape[0], vocab_size), dtype=torch.float32)
