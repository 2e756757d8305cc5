"""Weight-only quantized linear ops for the CPU: y = x @ dequantize(W).T, W never dequantized in full.

Three layouts, each with a pure-torch reference (dequantize in float32, then `F.linear`):

  int4  torch's CPU int4 layout: `packed` uint8 [N, K/2] (see `pack_int4_cpu`), groups of
        `group_size` along K with `scales_zeros` [K/g, N, 2]: w = (q - 8) * scale + zero, q in 0..15.
        Op `compiled_serve::int4_weight_linear` -> `torch._weight_int4pack_mm_for_cpu`.
  int8  per output channel: `weight` int8 [N, K], `scales` [N]: w = q * scale.
        Op `compiled_serve::int8_weight_linear` -> `torch._weight_int8pack_mm`.
  q8b   GGUF Q8_0 kept as it is: `codes` int8 [N, K], `scales` [N, K/32] float32: w = q * scale per
        block of 32. No custom op: `blockwise_int8_linear` is written in torch ops and traced into
        the graph, so Inductor generates the dequantize-and-matmul itself.
  fp8   CUDA: `weight` float8_e4m3fn [N, K], `scales` float32 [N] per output channel: w = q * scale;
        the activation is quantized per token at run time (`quantize_fp8_rowwise`). No custom op
        for the whole: `fp8_weight_linear` is torch ops (the quantize of x, the scales) around
        op `compiled_serve::fp8_mm` -> `torch._scaled_mm` with unit tensorwise scales (sm89+); on
        the CPU that op runs its reference (tests only: the engine refuses fp8 without CUDA).

Both torch kernels are vectorized for bf16 activations only (their float32 path is a scalar
loop, ~15x slower on the 2-core AVX-512 CPU, docs/perf-notes.md); the activation is computed in
the dtype of the scales, so bf16 scales mean a bf16 matmul, float32 scales the exact-scale one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: torch's CPU int4 layout tiles 64 output rows (N must be a multiple).
INT4_BLOCK_N = 64
Q8_BLOCK = 32
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def pack_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 (any int dtype) -> torch's CPU int4 layout, uint8 [N, K/2].

    The same bytes `torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)` returns (a test
    checks), built without an int32 copy: per tile of 64 rows and each k, 32 bytes whose low
    nibble is row j and high nibble row 32 + j.
    """
    n, k = codes.shape
    if n % INT4_BLOCK_N or k % 2:
        raise ValueError(f"int4 layout needs N % {INT4_BLOCK_N} == 0 and even K, got {n} x {k}")
    tiles = codes.to(torch.uint8).reshape(n // INT4_BLOCK_N, INT4_BLOCK_N, k).transpose(1, 2)  # [nb, K, 64]
    half = INT4_BLOCK_N // 2
    # contiguous: the kernel refuses strided B (the elementwise op keeps the transposed layout)
    return (tiles[..., :half] | (tiles[..., half:] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4_cpu(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_cpu`: uint8 [N, K/2] -> codes uint8 [N, K]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    tiles = packed.reshape(n // INT4_BLOCK_N, k, INT4_BLOCK_N // 2)  # [nb, K, 32]
    codes = torch.cat([tiles & 15, tiles >> 4], dim=-1)  # [nb, K, 64]
    return codes.transpose(1, 2).reshape(n, k)


def dequantize_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [N, K] from the int4 layout."""
    codes = unpack_int4_cpu(packed).float()  # [N, K]
    scales = scales_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)  # [N, K]
    zeros = scales_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (codes - 8) * scales + zeros


def int4_linear_reference(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    return F.linear(x.float(), dequantize_int4(packed, scales_zeros, group_size)).to(x.dtype)


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), weight.float() * scales.float()[:, None]).to(x.dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, K] -> [T, N] in x's dtype, computed in scales_zeros' dtype: torch's int4 kernel.

    What QuantizedLinearPass inserts: torch ops, so the compiled graph calls the aten kernel
    directly and Inductor fuses the casts into x's producer and the consumer (through the
    custom op below, each of a step's 120 calls paid ~15 us of Python dispatch: 1.8 of a 21 ms
    single-stream step, docs/perf-notes.md).
    """
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(scales_zeros.dtype), packed, group_size, scales_zeros)
    return out.to(x.dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> [T, N] in x's dtype, computed in scales' dtype: torch's int8 kernel (as `int4_linear`)."""
    return torch.ops.aten._weight_int8pack_mm(x.to(scales.dtype), weight, scales).to(x.dtype)


@torch.library.custom_op("compiled_serve::int4_weight_linear", mutates_args=())
def int4_weight_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """`int4_linear` as one op (eager callers and the op's tests)."""
    return int4_linear(x, packed, scales_zeros, group_size)


@int4_weight_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))


@torch.library.custom_op("compiled_serve::int8_weight_linear", mutates_args=())
def int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`int8_linear` as one op (eager callers and the op's tests)."""
    return int8_linear(x, weight, scales)


@int8_weight_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def blockwise_int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ (codes [N, K] int8 * scales [N, K/32] per block).T: torch ops for Inductor to fuse.

    Also the reference of the q8b layout (eager, it is exactly its definition).
    """
    n, k = codes.shape
    w = (codes.view(n, k // Q8_BLOCK, Q8_BLOCK).to(x.dtype) * scales.to(x.dtype)[..., None]).view(n, k)
    return F.linear(x, w)


def bf16_weight_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ weight [N, K] bf16 .T, computed in bf16, returned in x's dtype (torch ops)."""
    return F.linear(x.to(weight.dtype), weight).to(x.dtype)


#: A row at least this wide takes its absolute maximum in AMAX_SPLIT chunks (`row_amax`): on the H200 only
#: the down projection's 14,336-wide input gained (4,096-wide rows lost, bench/results/fp8/fp8_quantize_bench-*).
AMAX_SPLIT_MIN = 8192
AMAX_SPLIT = 16


def row_amax(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] -> [..., 1]: the absolute maximum of each row, exactly `t.abs().amax(-1, keepdim=True)`.

    A wide row is reduced in two steps, chunks of C / AMAX_SPLIT first, so that Inductor emits a
    reduction with AMAX_SPLIT programs a row instead of one program looping over the row (the
    14,336-wide input of the down projection at one row: 5.3 -> 4.2 us on the H200 in
    bench/fp8_quantize_bench.py). A maximum of maxima is the maximum: on a given tensor the result
    is bit-identical. (Fused into its producer, the activation itself may round differently once
    it is split across kernels: the benchmark's codes differ between the two forms.)
    """
    c = t.shape[-1]
    if c < AMAX_SPLIT_MIN or c % AMAX_SPLIT:
        return t.abs().amax(dim=-1, keepdim=True)
    return t.reshape(*t.shape[:-1], AMAX_SPLIT, c // AMAX_SPLIT).abs().amax(dim=-1).amax(dim=-1, keepdim=True)


def quantize_fp8_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (codes float8_e4m3fn [R, C], scales float32 [R, 1]): t ~= codes * scales.

    Each row's absolute maximum maps to FP8_MAX. The one quantize step of both sides: weights
    per output channel at load, activations per token in the op (the same code on CPU and CUDA).
    """
    amax = row_amax(t.detach()).float()
    scales = (amax / FP8_MAX).clamp(min=1e-12)
    codes = (t.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scales


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What the fp8 op computes, in float32: per-token fp8 x times per-channel fp8 w."""
    xq, xs = quantize_fp8_rowwise(x)
    return F.linear(xq.float() * xs, weight.float() * scales.float()[:, None]).to(x.dtype)


_UNIT_SCALES: dict[torch.device, torch.Tensor] = {}


def _unit_scale(device: torch.device) -> torch.Tensor:
    """A float32 1.0 on `device`, made once (before any CUDA-graph capture: the warm-up calls first)."""
    unit = _UNIT_SCALES.get(device)
    if unit is None:
        unit = _UNIT_SCALES[device] = torch.ones((), device=device, dtype=torch.float32)
    return unit


@torch.library.custom_op("compiled_serve::fp8_mm", mutates_args=())
def fp8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [T, K] e4m3 @ b [N, K] e4m3 .T -> [T, N] bfloat16, unscaled (fp32 accumulation).

    CUDA: `torch._scaled_mm` with unit tensorwise scales, cuBLASLt's FP8 GEMM, which at decode
    sizes streams the weights 1.6-1.9x faster than bf16 cuBLAS on the H200, where rowwise scales
    take a slower kernel (bench/results/fp8/fp8_gemm_bench-llama8b-nvidia-h200.json). CPU: its
    reference, float32 math (tests only: the engine refuses fp8 without CUDA).
    """
    if a.device.type != "cuda":
        return (a.float() @ b.float().t()).to(torch.bfloat16)
    unit = _unit_scale(a.device)
    # b.t() is [K, N] column-major, the layout _scaled_mm wants for its second operand.
    return torch._scaled_mm(a, b.t(), scale_a=unit, scale_b=unit, out_dtype=torch.bfloat16)


@fp8_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.bfloat16)


def fp8_weight_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> [T, N] in x's dtype; weight [N, K] e4m3, scales [N] float32: `fp8_linear_reference`.

    Written in torch ops around the one opaque GEMM, so that Inductor fuses the per-token quantize
    of x into the kernel that produces x (a norm, SiLU-mul), and both scales, applied to the
    unscaled product (x @ w.T = xs[t] * ws[n] * (xq @ wq.T)), into the kernel that consumes it.
    """
    xq, xs = quantize_fp8_rowwise(x)  # [T, K] e4m3, [T, 1]
    acc = torch.ops.compiled_serve.fp8_mm(xq, weight)
    return (acc.float() * xs * scales.float()).to(x.dtype)
