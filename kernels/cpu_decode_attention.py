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


def _row_stride(x: torch.Tensor) -> int | None:
    """The stride between tokens of a [T, heads, D] view whose heads are D apart and D is contiguous."""
    if x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        return None
    return x.stride(0)


def decode_attention(
    q: torch.Tensor,  # [S, H, D] float32
    k: torch.Tensor,  # [S, KVH, D]
    v: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D] float32, contiguous
    slot_mapping: torch.Tensor,  # [S] int64, every entry a real slot
    block_tables: torch.Tensor,  # [S, max_blocks] int32 contiguous
    seq_lens: torch.Tensor,  # [S] int32
    max_seq_len: int,
    scale: float,
) -> torch.Tensor | None:
    """Writes k/v at slot_mapping, then one-token causal attention per sequence: [S, H, D].

    None when the inputs are outside what the C kernel takes (the caller runs the torch path)."""
    lib = _library()
    if lib is None or q.dtype != torch.float32 or kv_cache.dtype != torch.float32 or k.dtype != torch.float32:
        return None
    qs, ks, vs = _row_stride(q), _row_stride(k), _row_stride(v)
    if qs is None or ks is None or vs is None or not kv_cache.is_contiguous() or not block_tables.is_contiguous():
        return None
    if (slot_mapping.dtype != torch.int64 or block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32
            or not slot_mapping.is_contiguous() or not seq_lens.is_contiguous()):
        return None
    s, h, d = q.shape
    out = torch.empty_like(q)  # the op's declared output (its fake); the kernel writes it contiguous
    if not out.is_contiguous():
        return None
    kvh, bs = kv_cache.shape[3], kv_cache.shape[2]
    rc = lib.cs_decode_attention_f32(
        q.data_ptr(), qs, k.data_ptr(), ks, v.data_ptr(), vs, kv_cache.data_ptr(), kv_cache.shape[1] * bs,
        slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(), out.data_ptr(),
        s, h, kvh, d, bs, scale, max_seq_len, torch.get_num_threads())
    return out if rc == 0 else None
