"""The logits tail as one op: temperature, top-k, top-p, min-p and a seeded sample per row.

`compiled_serve::fused_sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)
-> (token_ids, logprobs)` takes the already penalised logits [N, V] and returns one token per row
and its log-prob under log_softmax(logits). Filtering is `apply_top_k_top_p_min_p` of the
pure-torch sampler (compiled_serve/engine/sampler.py), sampling its exponential race
`argmax(probs / E)`; greedy rows (and rows with temperature <= 0) take the argmax of the logits.

Randomness is counter-based, so a row's draw depends on nothing but its own (seed, offset): the
engine passes the request's seed and the step index. Token t of a row gets Philox4x32-10 with key
(seed_lo, seed_hi) and counter (t, offset_lo, offset_hi, 0); the first output word r becomes
u = ((r >> 9) + 0.5) * 2^-23, strictly inside (0, 1) and exact in fp32, and E = -log(u). The
reference below computes the same Philox bits in int64 torch arithmetic as the Triton kernel's
`tl.philox_impl` (kernels/triton_sampler.py), so CPU and CUDA draw the same tokens up to fp32
rounding of near-ties. Parameter conventions: top_k <= 0 or >= V is off, top_p in (0, 1] with 1
off, min_p in [0, 1] with 0 off.

CUDA runs the Triton kernel (imported lazily so CPU installs need no Triton); every other device
runs the reference.
"""

from __future__ import annotations

import torch

from compiled_serve.engine.sampler import SamplingBatch, apply_top_k_top_p_min_p

_MASK32 = 0xFFFFFFFF
# Philox4x32 round multipliers and Weyl key increments (Salmon et al., SC'11), as in Triton.
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mul_wide(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a * b, for uint32 a and b held in int64.

    Split into 16-bit halves so that no intermediate leaves int64 (the plain product would).
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low_product = a_lo * b_lo
    middle = a_hi * b_lo + a_lo * b_hi + (low_product >> 16)  # < 2^34
    low = ((middle & 0xFFFF) << 16) | (low_product & 0xFFFF)
    return a_hi * b_hi + (middle >> 16), low


def philox_uint32(seeds: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """First Philox4x32-10 output word for key (seed) and counter (token, offset_lo, offset_hi, 0).

    seeds, offsets: [N] int64 -> [N, V] int64 holding uint32 values.
    """
    device = seeds.device
    seeds, offsets = seeds.long()[:, None], offsets.long()[:, None]  # [N, 1]
    k0, k1 = seeds & _MASK32, (seeds >> 32) & _MASK32
    c0 = torch.arange(vocab_size, dtype=torch.int64, device=device)[None, :].expand(len(seeds), -1)
    c1, c2 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c3 = torch.zeros_like(c1)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_wide(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_wide(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _MASK32, (k1 + PHILOX_KEY_B) & _MASK32
    return c0


def philox_exponential(seeds: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [N, V] float32, a pure function of each row's (seed, offset); never 0 or inf."""
    bits = philox_uint32(seeds, offsets, vocab_size)  # [N, V]
    uniform = ((bits >> 9).float() + 0.5) * 2.0**-23  # (0, 1), exact in fp32
    return -torch.log(uniform)


def sampling_rows(
    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    greedy: torch.Tensor, vocab_size: int,
) -> SamplingBatch:  # fmt: skip
    """The op's per-row tensors as the pure-torch sampler's `SamplingBatch` (no host sync)."""
    greedy = greedy.bool() | (temperature <= 0)
    top_k = top_k.long()
    return SamplingBatch(
        vocab_size=vocab_size,
        temperature=torch.where(greedy, 1.0, temperature.float()),
        top_k=torch.where((top_k > 0) & (top_k < vocab_size), top_k, vocab_size),
        top_p=top_p.float(),
        min_p=min_p.float(),
        greedy=greedy,
        generators=[None] * len(greedy),
        # Disabled values are no-ops in apply_top_k_top_p_min_p, so every filter may run.
        do_top_k=True,
        do_top_p=True,
        do_min_p=True,
    )


def filter_logits_reference(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p: [N, V] -> scaled logits, -inf where excluded."""
    return apply_top_k_top_p_min_p(logits.float() / batch.temperature[:, None], batch)


def fused_sample_reference(
    logits: torch.Tensor,  # [N, V] float
    temperature: torch.Tensor,  # [N] float32
    top_k: torch.Tensor,  # [N] int32, 0 = off
    top_p: torch.Tensor,  # [N] float32, 1 = off
    min_p: torch.Tensor,  # [N] float32, 0 = off
    seeds: torch.Tensor,  # [N] int64
    offsets: torch.Tensor,  # [N] int64
    greedy: torch.Tensor,  # [N] bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_ids [N] int64, logprobs [N] float32): the pure-torch sampler with Philox noise."""
    logits = logits.float()
    batch = sampling_rows(temperature, top_k, top_p, min_p, greedy, logits.shape[-1])
    probs = filter_logits_reference(logits, batch).softmax(dim=-1)  # [N, V]
    noise = philox_exponential(seeds, offsets, logits.shape[-1])  # [N, V]
    sampled = (probs / noise).argmax(dim=-1)  # [N]
    token_ids = torch.where(batch.greedy, logits.argmax(dim=-1), sampled)
    logprobs = logits.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]
    return token_ids, logprobs


@torch.library.custom_op("compiled_serve::fused_sample", mutates_args=())
def fused_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] and [N] per-row settings -> (token_ids [N] int64, logprobs [N] float32)."""
    return fused_sample_reference(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)


@fused_sample.register_kernel("cuda")
def _(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    return fused_sample_triton(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)


@fused_sample.register_fake
def _(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows = logits.shape[0]
    return logits.new_empty((num_rows,), dtype=torch.int64), logits.new_empty(
        (num_rows,), dtype=torch.float32
    )
