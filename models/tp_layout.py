"""Which rows or columns of each weight one tensor-parallel rank owns: the arithmetic only.

Shared by `TensorParallelPass` (passes/tensor_parallel.py), which rewrites the graph around the
shards, and by the per-rank weight loader (models/tp_weights.py), which reads only those shards,
so the two can never disagree about a slice. Nothing here knows about graphs, processes or files.

For TP size N and rank r:
  - attention heads: rank r owns q heads [r*H/N, (r+1)*H/N). KV heads split the same way when
    KVH >= N; with fewer KV heads than ranks (GQA), each KV head is replicated on N/KVH ranks and
    rank r keeps head r*KVH//N, the one its q heads read (as vLLM does).
  - packed projections (qkv_proj, gate_up_proj) are split per section, never naively: rank r's
    packed weight is [q_r; k_r; v_r] (or [gate_r; up_r]), so the model's own split/chunk of the
    output still finds its parts.
  - row-parallel weights (o_proj, down_proj) split their input dimension evenly.
  - vocabulary-parallel tables (embedding, lm_head) split the vocabulary evenly.
Anything that does not divide raises `ShardingError`, naming the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiled_serve.errors import CompilationError

Range = tuple[int, int]  # (start, size)


class ShardingError(CompilationError):
    """A model cannot be split over the asked number of ranks (heads or sizes do not divide)."""


def even_range(size: int, rank: int, world_size: int, what: str) -> Range:
    """Rank r's [start, size) of `size` split evenly."""
    if size % world_size:
        raise ShardingError(
            f"tensor parallel: {what} ({size}) is not divisible by tensor_parallel_size {world_size}")
    part = size // world_size
    return rank * part, part


@dataclass(frozen=True)
class HeadSplit:
    """What one rank owns of an attention layer."""

    num_heads: int  # q heads on this rank
    num_kv_heads: int  # kv heads on this rank (1 when replicated)
    head_start: int  # first q head
    kv_head_start: int  # first kv head


def head_split(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadSplit:
    head_start, heads = even_range(num_heads, rank, world_size, "num_heads")
    if num_kv_heads >= world_size:
        kv_start, kv = even_range(num_kv_heads, rank, world_size, "num_kv_heads")
    else:
        if world_size % num_kv_heads:
            raise ShardingError(
                f"tensor parallel: num_kv_heads ({num_kv_heads}) < tensor_parallel_size {world_size} "
                f"needs tensor_parallel_size to be a multiple of num_kv_heads to replicate them")
        kv_start, kv = rank * num_kv_heads // world_size, 1
    group = num_heads // num_kv_heads  # q heads per kv head
    if not (kv_start * group <= head_start and head_start + heads <= (kv_start + kv) * group):
        raise ShardingError(  # only reachable with inconsistent head counts
            f"tensor parallel: rank {rank}'s q heads do not map onto its kv heads")
    return HeadSplit(heads, kv, head_start, kv_start)


def qkv_row_ranges(num_heads: int, num_kv_heads: int, head_dim: int, rank: int, world_size: int) -> list[Range]:
    """Rows of the full packed [q; k; v] weight rank r keeps, in order (q, k, v)."""
    s = head_split(num_heads, num_kv_heads, rank, world_size)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    return [(s.head_start * head_dim, s.num_heads * head_dim),
            (q_size + s.kv_head_start * head_dim, s.num_kv_heads * head_dim),
            (q_size + kv_size + s.kv_head_start * head_dim, s.num_kv_heads * head_dim)]


def section_row_ranges(sections: list[int], rank: int, world_size: int, what: str) -> list[Range]:
    """Rows of a packed weight whose sections each split evenly (gate/up)."""
    ranges, start = [], 0
    for i, size in enumerate(sections):
        s, n = even_range(size, rank, world_size, f"{what} section {i}")
        ranges.append((start + s, n))
        start += size
    return ranges
