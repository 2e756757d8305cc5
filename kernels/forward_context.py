"""Per-step metadata that reaches the attention ops without threading it through the model.

The runner enters `forward_context(meta)` around each model call; the paged-attention op reads
`current_forward_context()`. Nesting is refused: a step never runs inside another step.

It lives in kernels/, the bottom layer, because the ops read it and the engine sets it: the
engine imports it from here, and nothing here imports the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch._dynamo


@dataclass
class AttentionMetadata:
    """Everything the paged-attention op needs for one step.

    Tokens of all scheduled sequences are laid out back to back (a "flat" batch).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset); -1 = padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32; unused entries are 0
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new tokens)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: offsets of each sequence's new tokens
    max_query_len: int
    max_seq_len: int
    kv_caches: list[torch.Tensor]  # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
    # Host copies for the pure-torch reference (it loops over sequences); kernels ignore them.
    seq_lens_host: list[int] | None = None
    query_start_loc_host: list[int] | None = None
    # Step-level plan of the CPU attention path, built by the first layer (False: none needed).
    cpu_decode_plan: object | None = None
    # Whether every slot_mapping entry is a real slot (no padding), found by the first layer's CPU KV write.
    cpu_slots_valid: bool | None = None
    # The C decode kernel's per-step arguments (kernels/cpu_decode_attention.py), found by the first
    # layer; False: the step is not decode-only with real slots, or the kernel is unavailable.
    cpu_decode_step: object | None = None


_current: AttentionMetadata | None = None


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    global _current
    if _current is not None:
        raise RuntimeError("forward_context is already set: steps cannot nest")
    mark_kv_cache_shapes(meta.kv_caches)
    _current = meta
    try:
        yield meta
    finally:
        _current = None


def mark_kv_cache_shapes(caches: list[torch.Tensor]) -> None:
    """Tell dynamo how the caches' shapes vary before it first sees them as graph inputs.

    The compiled step takes the caches as inputs (passes/pipeline.py). Their dims other than
    num_blocks are the model's and never change: static, so none of them shares a symbol with the
    token count (dynamo's duck sizing would tie a 128-token step to head_dim 128). num_blocks
    differs between the scratch cache of the capture measurement and the real one: unbacked, so
    neither a one-block cache nor an equal token count specialises it, and nothing recompiles.
    Marked once per tensor.
    """
    for cache in caches:
        if not getattr(cache, "_compiled_serve_shapes_marked", False):
            torch._dynamo.mark_static(cache, [0, 2, 3, 4])
            torch._dynamo.decorators.mark_unbacked(cache, 1)
            cache._compiled_serve_shapes_marked = True  # type: ignore[attr-defined]


def in_forward_context() -> bool:
    """True inside an engine step."""
    return _current is not None


def current_forward_context() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError(
            "paged_attention ran outside forward_context(); the runner must set step metadata"
        )
    return _current
