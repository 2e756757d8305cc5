"""The logits head over the GGUF file's own Q8_0 token table on the CPU (kernels/cpu_q8_head.c).

The embedded model's token table (49,152 x 576, tied: the embedding and the head) is Q8_0 in the
file. The head has run on a bf16 copy through oneDNN, 57 MB a decode step. For a few rows this
runs it as llama.cpp does: the input rows quantized to int8 per block of 32, one VNNI integer dot
product per block against the file's codes (28 MB), scaled by both block scales in fp32. Its
error against the fp32 dequantized head is the activations' 8-bit rounding (relative ~2^-8 per
element, as bf16's 8-bit mantissa); the weights are exact, where the bf16 copy rounds them.
`q8_0_matmul_reference` is the same arithmetic in torch, for the tests.

Taken only where the CPU has VNNI (AVX512-VNNI or AVX-VNNI); otherwise, or for more than
`MAX_ROWS` rows, or with COMPILED_SERVE_CPU_KERNELS=torch, callers keep the bf16 head.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from compiled_serve.kernels.cpu_c_library import load_c_library

MAX_ROWS = 4  # the C kernel's switch over M
QBLOCK = 32

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "cs_q8_head_supported": ([], ctypes.c_int),
    "cs_quantize_rows_q8": ([_ptr, _i64, _i64, _ptr, _ptr], None),
    "cs_q8_0_matmul": ([_ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, ctypes.c_int], ctypes.c_int),
}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = load_c_library("cpu_q8_head", _SIGNATURES)
    return lib if lib is not None and lib.cs_q8_head_supported() else None


def available() -> bool:
    return _library() is not None


def codes_fit(codes: torch.Tensor) -> bool:
    """Codes the kernel takes: int8 in [-127, 127] (ggml's Q8_0 quantizer never writes -128)."""
    return codes.dtype == torch.int8 and bool(codes.min() > -128)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (codes [M, K] int8, scales [M, K/32] float32), per block of 32."""
    blocks = x.float().view(x.shape[0], -1, QBLOCK)
    scale = blocks.abs().amax(dim=-1) / 127.0
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    codes = (blocks * inv[..., None]).round().clamp(-127, 127).to(torch.int8)
    return codes.view(x.shape), scale


def q8_0_matmul_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What the kernel computes: [M, N] = sum over blocks of (int dot of codes) * w_scale * x_scale."""
    qx, dx = quantize_rows_reference(x)
    m, k = qx.shape
    dots = torch.einsum("mbi,nbi->mnb", qx.view(m, -1, QBLOCK).double(), codes.view(codes.shape[0], -1, QBLOCK).double())
    return (dots * (scales.double()[None] * dx.double()[:, None])).sum(-1).float()


def q8_0_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] -> [M, N] float32 over Q8_0 `codes` [N, K] int8 (see `codes_fit`) and `scales`
    [N, K/32] float32; None where the kernel does not apply (no VNNI or compiler, too many rows)."""
    lib = _library()
    m, k = x.shape
    if lib is None or m > MAX_ROWS or k % QBLOCK or codes.dtype != torch.int8 or scales.dtype != torch.float32:
        return None
    x = x.float().contiguous()
    qx = torch.empty((m, k), dtype=torch.int8)
    dx = torch.empty((m, k // QBLOCK), dtype=torch.float32)
    lib.cs_quantize_rows_q8(x.data_ptr(), m, k, qx.data_ptr(), dx.data_ptr())
    out = torch.empty((m, codes.shape[0]), dtype=torch.float32)
    rc = lib.cs_q8_0_matmul(qx.data_ptr(), dx.data_ptr(), m, k, codes.data_ptr(), scales.data_ptr(), codes.shape[0],
                            out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None
