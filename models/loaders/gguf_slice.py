"""One GGUF tensor read lazily, as a safetensors slice is: a tensor-parallel rank dequantizes only
the rows or columns it indexes, never the whole tensor, wherever the layout allows it.

A GGUF matrix [out, in] is stored row-major, each row (`in` values) quantized on its own into
blocks of `block_size` values (32 for Q8_0/Q4_0, 256 for the K-quants; 1 for F32/F16):

  rows  [a, b)  (column-parallel: q/k/v, gate/up, vocabulary)  one contiguous byte range; only it
                is dequantized -> float [b - a, in]
  cols  [a, b)  (row-parallel: o_proj, down_proj)  a byte range of every row. Block-aligned
                (a and b multiples of block_size): only those blocks are dequantized ->
                [out, b - a]. Not aligned (Q4_K rows of 576 over 3 ranks, say): no block holds
                exactly the rank's values, so rows are dequantized whole, `CHUNK_BYTES` of
                float at a time, and the rank's columns kept: it holds [out, b - a] plus one chunk.

What a rank holds is its shard (plus a chunk); what it reads from the memory map is its byte
ranges. For column slices of rows shorter than a page the page cache still brings in whole rows:
that is the OS's, shared by every rank, not the rank's memory.

llama.cpp permutes q/k rows within each head (`gguf_file.unpermute_rope_rows`); a row slice of
whole heads (what TP takes) is unpermuted on its own. Anything else falls back to the whole tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: The most float32 bytes an unaligned column read dequantizes at once.
CHUNK_BYTES = 64 << 20


def _dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(data, qtype)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class GGUFSlice:
    """`get_shape()` and `[a:b]` / `[:, a:b]` / `[:]` over one GGUF tensor, in Hugging Face's
    [out, in] layout, as float32 (what `models/tp_weights.py` reads a rank's shard through)."""

    def __init__(self, tensor: Any, rope_heads: int | None = None):
        self.tensor, self.rope_heads = tensor, rope_heads
        self.shape = [int(n) for n in reversed(tensor.shape)]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        rows = index[0]
        cols = index[1] if len(index) > 1 else slice(None)
        if len(index) > 2 or not all(isinstance(s, slice) and s.step in (None, 1) for s in (rows, cols)):
            raise IndexError(f"GGUFSlice takes row or column ranges, not {index}")
        r0, r1, _ = rows.indices(self.shape[0])
        if len(self.shape) == 1:
            return self._whole()[r0:r1]
        c0, c1, _ = cols.indices(self.shape[1])
        if (c0, c1) == (0, self.shape[1]):
            return self._rows(r0, r1)
        if (r0, r1) == (0, self.shape[0]) and self.rope_heads is None:
            return self._cols(c0, c1)
        return self._whole()[r0:r1, c0:c1]

    def _whole(self) -> torch.Tensor:
        from compiled_serve.models.loaders.gguf_file import dequantize, unpermute_rope_rows

        w = _tensor(dequantize(self.tensor))
        return unpermute_rope_rows(w, self.rope_heads) if self.rope_heads else w

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        from compiled_serve.models.loaders.gguf_file import unpermute_rope_rows

        per_head = self.shape[0] // self.rope_heads if self.rope_heads else 1
        if r0 % per_head or r1 % per_head:  # not whole heads: the permutation spans the cut
            return self._whole()[r0:r1]
        data = self.tensor.data[r0:r1]  # [rows, row_bytes]: contiguous in the file
        w = _tensor(_dequantize(data, self.tensor.tensor_type).reshape(r1 - r0, self.shape[1]))
        return unpermute_rope_rows(w, (r1 - r0) // per_head) if self.rope_heads else w

    def _cols(self, c0: int, c1: int) -> torch.Tensor:
        import gguf

        qtype = self.tensor.tensor_type
        data = self.tensor.data
        out, width = self.shape
        if data.dtype != np.uint8:  # F32/F16 (typed): a strided view, dequantized column-wise
            return _tensor(_dequantize(data[:, c0:c1], qtype))
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if c0 % block == 0 and c1 % block == 0:  # only the rank's blocks of every row
            blocks = np.ascontiguousarray(data[:, c0 // block * block_bytes: c1 // block * block_bytes])
            return _tensor(_dequantize(blocks, qtype).reshape(out, c1 - c0))
        shard = torch.empty(out, c1 - c0)
        step = max(1, CHUNK_BYTES // (4 * width))
        for start in range(0, out, step):
            rows = _dequantize(data[start:start + step], qtype).reshape(-1, width)
            shard[start:start + rows.shape[0]] = torch.from_numpy(rows[:, c0:c1])
        return shard
