"""Philox4x32-10 counter-based noise in plain int64 torch arithmetic: the sampler's randomness.

Token t of a row gets Philox4x32-10 with key (seed_lo, seed_hi) and counter (t, offset_lo,
offset_hi, 0); the first output word r becomes u = ((r >> 9) + 0.5) * 2^-23, strictly inside
(0, 1) and exact in fp32, and E = -log(u). These are the bits of the Triton kernel's
`tl.philox_impl` (kernels/triton_sampler.py), so CPU and CUDA draw the same tokens up to fp32
rounding of near-ties. A row's noise depends on nothing but its own (seed, offset).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Philox4x32 round multipliers and Weyl key increments (Salmon et al., SC'11), as in Triton.
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

# Philox runs over column chunks of about this many elements: every temporary of the ~100 ops
# then stays in cache (whole [N, V] int64 temporaries made it ~100x slower on the CPU).
_PHILOX_CHUNK_ELEMENTS = 1 << 15


def _mul_wide(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a * b, for uint32 a and b held in int64.

    The constant a is split into 16-bit halves so that no intermediate leaves int64 (the plain
    product would): a * b = (a_hi * b) * 2^16 + a_lo * b, each partial product < 2^48.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    high_part = b * a_hi  # < 2^48
    low_sum = b * a_lo + ((high_part & 0xFFFF) << 16)  # < 2^49
    return (high_part >> 16) + (low_sum >> 32), low_sum & _MASK32


def philox_uint32(seeds: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """First Philox4x32-10 output word for key (seed) and counter (token, offset_lo, offset_hi, 0).

    seeds, offsets: [N] int64 -> [N, V] int64 holding uint32 values.
    """
    width = max(1, _PHILOX_CHUNK_ELEMENTS // max(1, len(seeds)))
    chunks = [_philox_columns(seeds, offsets, start, min(start + width, vocab_size))
              for start in range(0, vocab_size, width)]
    if not chunks:
        return torch.empty(len(seeds), 0, dtype=torch.int64, device=seeds.device)
    return torch.cat(chunks, dim=1)


def _philox_columns(seeds: torch.Tensor, offsets: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """`philox_uint32` for tokens [start, stop): [N, stop - start]."""
    device = seeds.device
    seeds, offsets = seeds.long()[:, None], offsets.long()[:, None]  # [N, 1]
    k0, k1 = seeds & _MASK32, (seeds >> 32) & _MASK32
    c0 = torch.arange(start, stop, dtype=torch.int64, device=device)[None, :].expand(len(seeds), -1)
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
