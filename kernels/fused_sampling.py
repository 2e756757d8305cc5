"""The logits tail as one op: penalties, temperature, top-k, top-p, min-p and a seeded sample per row.

`compiled_serve::fused_sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,
repetition_penalty=None, seen_mask=None, frequency_penalty=None, presence_penalty=None,
output_counts=None) -> (token_ids, logprobs)` takes logits [N, V] (logit bias and min-tokens
suppression already applied: they are sparse exact edits) and returns one token per row and its
log-prob under log_softmax(logits), the unpenalised distribution. Penalties are `apply_penalties`
of the pure-torch sampler (compiled_serve/engine/sampler.py): HF repetition penalty over
`seen_mask` (token in prompt or output), then OpenAI frequency/presence over `output_counts`;
each group is given whole or not at all (None when no row uses it). Filtering is
`apply_top_k_top_p_min_p`, sampling its exponential race `argmax(probs / E)`; greedy rows (and
rows with temperature <= 0) take the argmax of the penalised logits.

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

from compiled_serve.engine.sampler import SamplingBatch, apply_penalties, apply_top_k_top_p_min_p

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


def sampling_rows(
    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    greedy: torch.Tensor, vocab_size: int,
) -> SamplingBatch:  # fmt: skip
    """The op's per-row tensors as the pure-torch sampler's `SamplingBatch`.

    A filter runs only when some sampled row uses it (a disabled value is an exact no-op in
    `apply_top_k_top_p_min_p`, so skipping it changes nothing); deciding that reads the flags on
    the host, which is free on the CPU, where this reference is the implementation.
    """
    greedy = greedy.bool() | (temperature <= 0)
    top_k = top_k.long()
    top_k = torch.where((top_k > 0) & (top_k < vocab_size), top_k, vocab_size)
    sampled = ~greedy
    return SamplingBatch(
        vocab_size=vocab_size,
        temperature=torch.where(greedy, 1.0, temperature.float()),
        top_k=top_k,
        top_p=top_p.float(),
        min_p=min_p.float(),
        greedy=greedy,
        generators=[None] * len(greedy),
        all_greedy=bool(greedy.all()),
        do_top_k=bool((sampled & (top_k < vocab_size)).any()),
        do_top_p=bool((sampled & (top_p < 1.0)).any()),
        do_min_p=bool((sampled & (min_p > 0.0)).any()),
    )


def filter_logits_reference(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p: [N, V] -> scaled logits, -inf where excluded."""
    return apply_top_k_top_p_min_p(logits.float() / batch.temperature[:, None], batch)


def check_penalty_inputs(
    logits: torch.Tensor,
    repetition_penalty: torch.Tensor | None,
    seen_mask: torch.Tensor | None,
    frequency_penalty: torch.Tensor | None,
    presence_penalty: torch.Tensor | None,
    output_counts: torch.Tensor | None,
) -> None:
    """Each penalty group comes whole or not at all, with [N] factors and [N, V] token tables."""
    groups = {
        "repetition_penalty, seen_mask": (repetition_penalty, seen_mask),
        "frequency_penalty, presence_penalty, output_counts": (frequency_penalty, presence_penalty, output_counts),
    }
    for names, group in groups.items():
        if any(t is None for t in group) and not all(t is None for t in group):
            raise ValueError(f"fused_sample: pass all of ({names}) or none of them")
    rows = logits.shape[:1]
    for name, t, shape in (
        ("repetition_penalty", repetition_penalty, rows), ("frequency_penalty", frequency_penalty, rows),
        ("presence_penalty", presence_penalty, rows), ("seen_mask", seen_mask, logits.shape),
        ("output_counts", output_counts, logits.shape),
    ):  # fmt: skip
        if t is not None and t.shape != shape:
            raise ValueError(f"fused_sample: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if seen_mask is not None and seen_mask.dtype != torch.bool:
        raise ValueError(f"fused_sample: seen_mask must be bool, got {seen_mask.dtype}")


def penalise_reference(
    logits: torch.Tensor,  # [N, V] float32
    repetition_penalty: torch.Tensor | None = None,  # [N] float32
    seen_mask: torch.Tensor | None = None,  # [N, V] bool
    frequency_penalty: torch.Tensor | None = None,  # [N] float32
    presence_penalty: torch.Tensor | None = None,  # [N] float32
    output_counts: torch.Tensor | None = None,  # [N, V] float32
) -> torch.Tensor:
    """`apply_penalties` of the pure-torch sampler on the dense penalty inputs: [N, V] -> [N, V]."""
    as_float = lambda t: None if t is None else t.float()  # noqa: E731
    unused = logits.new_empty(0)  # apply_penalties reads only the penalty fields
    batch = SamplingBatch(
        vocab_size=logits.shape[-1], temperature=unused, top_k=unused, top_p=unused, min_p=unused,
        greedy=unused, generators=[], repetition_penalty=as_float(repetition_penalty), seen_mask=seen_mask,
        frequency_penalty=as_float(frequency_penalty), presence_penalty=as_float(presence_penalty),
        output_counts=as_float(output_counts),
    )  # fmt: skip
    return apply_penalties(logits, batch)


def fused_sample_reference(
    logits: torch.Tensor,  # [N, V] float
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_ids [N] int64, logprobs [N] float32): the pure-torch sampler with Philox noise."""
    penalties = (repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts)
    check_penalty_inputs(logits, *penalties)
    logits = logits.float()
    penalised = penalise_reference(logits, *penalties)  # [N, V]
    batch = sampling_rows(temperature, top_k, top_p, min_p, greedy, logits.shape[-1])
    token_ids = penalised.argmax(dim=-1)  # [N], kept on greedy rows
    if not batch.all_greedy:
        probs = filter_logits_reference(penalised, batch).softmax(dim=-1)  # [N, V]
        # Noise for the sampled rows only: greedy rows ignore it, and Philox is the costly part.
        noise = torch.ones_like(probs)
        rows = (~batch.greedy).nonzero()[:, 0]
        noise[rows] = philox_exponential(seeds[rows], offsets[rows], logits.shape[-1])
        sampled = (probs / noise).argmax(dim=-1)  # [N]
        token_ids = torch.where(batch.greedy, token_ids, sampled)
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
    repetition_penalty: torch.Tensor | None = None,
    seen_mask: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] and [N] per-row settings -> (token_ids [N] int64, logprobs [N] float32)."""
    return fused_sample_reference(
        logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,
        repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts,
    )  # fmt: skip


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
    repetition_penalty: torch.Tensor | None = None,
    seen_mask: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    return fused_sample_triton(
        logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,
        repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts,
    )  # fmt: skip


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
    repetition_penalty: torch.Tensor | None = None,
    seen_mask: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_penalty_inputs(logits, repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts)
    num_rows = logits.shape[0]
    return logits.new_empty((num_rows,), dtype=torch.int64), logits.new_empty(
        (num_rows,), dtype=torch.float32
    )
