"""Batch buckets: the decode batch sizes that get a CUDA graph, and picking one for a step.

The compiled step keeps its token dimension dynamic (dynamo `dynamic=True`, see
passes/pipeline.py), so Inductor never recompiles for a new batch size: every step, of
MIN_STEP_TOKENS tokens or more, runs the one dynamic graph. Buckets exist for CUDA graphs,
which replay fixed shapes: a decode batch of n sequences is padded up to the smallest bucket
>= n, and batches above the largest bucket run the dynamic graph without CUDA graphs.

Default decode buckets follow vLLM/nano-vllm: 2, 4, 8, then every multiple of 8 up to
`max_num_seqs` (which is always a bucket itself). On CUDA no step runs with fewer than
MIN_STEP_TOKENS tokens: dynamo specialises a size of 1 (and Inductor's view lowering guards on
it), so a one-token step would compile, and keep, a whole second graph; a lone decode is padded
to 2 (on the GPU it reads the same weights, so it costs about the same). On the CPU padding is not
free (MKL runs a two-row linear as a packing SGEMM instead of a GEMV, ~2x slower), so the CPU step
marks its token dimension unbacked instead (one graph, no size-1 specialisation) and pads nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from compiled_serve.errors import InvalidParameterError

BUCKET_STEP = 8
MIN_STEP_TOKENS = 2


def default_decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """2, 4, 8, 16, 24, ... up to and including `max_num_seqs` (at least MIN_STEP_TOKENS)."""
    if max_num_seqs < 1:
        raise InvalidParameterError("max_num_seqs", f"must be >= 1, got {max_num_seqs}")
    top = max(max_num_seqs, MIN_STEP_TOKENS)
    small = [b for b in (2, 4) if b < top]
    steps = list(range(BUCKET_STEP, top, BUCKET_STEP))
    return tuple(small + steps + [top])


def normalize_buckets(buckets: Iterable[int], max_num_seqs: int | None = None) -> tuple[int, ...]:
    """Sorted, deduplicated, validated, 1 raised to MIN_STEP_TOKENS; entries above `max_num_seqs`
    are dropped (never used), except that a minimum-size bucket always stays."""
    values = list(buckets)
    for b in values:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InvalidParameterError("cuda_graph_buckets", f"buckets must be positive ints, got {b!r}")
    values = sorted({max(b, MIN_STEP_TOKENS) for b in values})
    if max_num_seqs is not None:
        values = [b for b in values if b <= max(max_num_seqs, MIN_STEP_TOKENS)]
    if not values:
        raise InvalidParameterError("cuda_graph_buckets", "no bucket at or below max_num_seqs")
    return tuple(values)


def parse_buckets(text: str) -> tuple[int, ...]:
    """"2,4,8" or "2 4 8" -> (2, 4, 8), for the command line."""
    try:
        values = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise InvalidParameterError("buckets", f"expected integers like 2,4,8; got {text!r}") from None
    return normalize_buckets(values)


# Prefill and mixed steps up to this many tokens replay CUDA graphs (token buckets). Above it a
# step's device time dwarfs its host launch time, and padding to a bucket would cost more.
MIXED_GRAPH_MAX_TOKENS = 2048


def default_mixed_buckets(max_num_batched_tokens: int) -> tuple[int, ...]:
    """Token buckets for mixed-step graphs: 32, 64, ..., 1024, then 1536, 2048, capped at the budget."""
    top = min(max_num_batched_tokens, MIXED_GRAPH_MAX_TOKENS)
    values = [b for b in (32, 64, 128, 256, 512, 1024, 1536, 2048) if b <= top]
    return tuple(values) if values else (MIN_STEP_TOKENS,)


def pick_bucket(buckets: Sequence[int], n: int) -> int | None:
    """Smallest bucket >= n (buckets sorted ascending), or None if n is above the largest."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def resolve_decode_buckets(configured: Sequence[int] | None, max_num_seqs: int) -> tuple[int, ...]:
    """The engine's decode buckets: the configured list (capped at max_num_seqs) or the default."""
    if configured is None:
        return default_decode_buckets(max_num_seqs)
    return normalize_buckets(configured, max_num_seqs)
