"""The CPU decode step's paged attention as one C call a layer (kernels/cpu_decode_attention.c).

A single-stream decode step on the 2-core machine spent ~40 us a layer in `paged_attention_cpu`,
of which ~12 us was SDPA itself and the rest torch glue: the block gather's copy, views, the KV
write's stack and scatter, dtype casts, each a dispatch of a few microseconds (docs/perf-notes.md).
Here one foreign call writes the step's K/V and attends through the block tables in place.

The C source is compiled once per machine (kernels/cpu_c_library.py). Without a compiler, or with
`COMPILED_SERVE_CPU_KERNELS=torch`, `available()` is False and the torch path runs instead.

Only float32 decode-only steps (every sequence one new token, no padding rows) come here; the
reference is `paged_attention_reference`, which the tests hold this against.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch

from compiled_serve.kernels.cpu_c_library import load_c_library

_c_int64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_ARGTYPES = [_ptr, _c_int64, _ptr, _c_int64, _ptr, _c_int64, _ptr, _c_int64, _ptr, _ptr, _c_int64, _ptr, _ptr,
             _c_int64, _c_int64, _c_int64, _c_int64, _c_int64, ctypes.c_float, _c_int64, ctypes.c_int]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return load_c_library("cpu_decode_attention", {"cs_decode_attention_f32": (_ARGTYPES, ctypes.c_int)})


def available() -> bool:
    return _library() is not None


class DecodeStep(NamedTuple):
    """The step's share of the kernel's arguments, the same for every layer: found once a step."""

    slots: int  # data pointers of the step's int64 slot mapping, int32 block tables and seq lens
    tables: int
    table_stride: int
    seq_lens: int
    num_seqs: int
    max_ctx: int
    threads: int


def plan_step(slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
              max_seq_len: int) -> DecodeStep | None:
    """The step's arguments, or None when the C kernel cannot take it (no compiler, other dtypes).
    The caller keeps the tensors alive for the step (the forward context holds them)."""
    if _library() is None or slot_mapping.dtype != torch.int64 or block_tables.dtype != torch.int32:
        return None
    if seq_lens.dtype != torch.int32 or not (slot_mapping.is_contiguous() and block_tables.is_contiguous()
                                             and seq_lens.is_contiguous()):
        return None
    return DecodeStep(slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(),
                      seq_lens.shape[0], max_seq_len, torch.get_num_threads())


def _row_stride(x: torch.Tensor) -> int | None:
    """The stride between tokens of a [T, heads, D] view whose heads are D apart and D is contiguous."""
    _, h, d = x.shape
    st = x.stride()
    return st[0] if st[2] == 1 and st[1] == d else None


def decode_attention(
    q: torch.Tensor,  # [S, H, D] float32
    k: torch.Tensor,  # [S, KVH, D]
    v: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D] float32, contiguous
    step: DecodeStep,  # every slot a real one, one new token per sequence (the caller checked)
    scale: float,
) -> torch.Tensor | None:
    """Writes k/v at the step's slots, then one-token causal attention per sequence: [S, H, D].

    None when the inputs are outside what the C kernel takes (the caller runs the torch path)."""
    f32 = torch.float32
    if q.dtype != f32 or k.dtype != f32 or v.dtype != f32 or kv_cache.dtype != f32 or q.dim() != 3:
        return None
    qs, ks, vs = _row_stride(q), _row_stride(k), _row_stride(v)
    if qs is None or ks is None or vs is None or q.shape[0] != step.num_seqs or not kv_cache.is_contiguous():
        return None
    out = torch.empty_like(q)  # the op's declared output (its fake); the kernel writes it contiguous
    if not out.is_contiguous():
        return None
    _, nb, bs, kvh, _ = kv_cache.shape
    s, h, d = q.shape
    rc = _library().cs_decode_attention_f32(
        q.data_ptr(), qs, k.data_ptr(), ks, v.data_ptr(), vs, kv_cache.data_ptr(), nb * bs, step.slots, step.tables,
        step.table_stride, step.seq_lens, out.data_ptr(), s, h, kvh, d, bs, scale, step.max_ctx, step.threads)
    return out if rc == 0 else None
